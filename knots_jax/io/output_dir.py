"""Atomic output directories that never lose the user's files.

`atomic_output_dir(path)` yields a temporary sibling `<name>.tmp-<host>-<pid>-<random>`
that is renamed to `path` only when the block exits normally. On one file
system a rename is atomic, so a reader sees either no output (or the old one)
or the complete new one, never a half-written directory. What it guarantees
(docs/reliability.md, "Outputs"):

* a manifest, `.knots_jax_output.json`, written last in every directory it
  makes, lists what that directory held when it was finished; `overwrite`
  replaces only a directory whose manifest covers every entry in it, so files
  the package never wrote are never deleted;
* SIGTERM (timeout, Slurm, Kubernetes) cleans up as Ctrl-C does while a
  directory is open in the main thread, and the leftovers of runs killed
  outright (SIGKILL) are removed by the next write to the same place;
* the final check and swap hold a lock (`<parent>/.<name>.lock`), so
  concurrent writers of one output each either replace it whole or are refused;
* directories and files get the modes `os.makedirs` / `open()` give (umask).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import warnings
from typing import Any, Iterator, Mapping

import numpy as np

try:
  import fcntl
except ImportError:          # not POSIX: no lock (the swap is still checked)
  fcntl = None

MANIFEST = ".knots_jax_output.json"
MANIFEST_FORMAT = "knots_jax output"
MANIFEST_VERSION = 1
_SHOWN = 5                   # foreign entries named in an error


class Terminated(SystemExit):
  """SIGTERM while an atomic output directory was open: unwinds like Ctrl-C, exits 128 + 15."""


# ---------------------------------------------------------------- owners and names


def _host_tag() -> str:
  """This host's name as it appears in temporary names (no '-', at most 40 characters)."""
  host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40]
  return host or "host"


_OWNED = re.compile(r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+")
# Temporary directories and asides this process has open (removed by no stale-sibling sweep).
_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


def _owned_name(parent: str, name: str, kind: str) -> str:
  """`<parent>/<name>.<kind>-<host>-<pid>-<random>`: the owner is readable from the name."""
  return os.path.join(parent, f"{name}.{kind}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_running(pid: int) -> bool:
  """Whether a process `pid` exists on this host (one of another user counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_siblings(parent: str, name: str) -> None:
  """Removes `<name>.tmp-*` / `<name>.old-*` of dead processes of this host; warns of others.

  A sibling of this process's own pid that it does not have open is a
  leftover of an earlier process with the same pid (containers reuse pids).
  """
  pattern = re.compile(re.escape(name) + r"\.(?:tmp|old)-(?P<owner>.+)")
  host, pid = _host_tag(), os.getpid()
  try:
    entries = sorted(os.listdir(parent))
  except OSError:
    return
  others = []
  with _open_paths_lock:
    for entry in entries:
      match = pattern.fullmatch(entry)
      if not match:
        continue
      full = os.path.join(parent, entry)
      owner = _OWNED.fullmatch(match["owner"])
      stale = (owner is not None and owner["host"] == host
               and (int(owner["pid"]) == pid and full not in _open_paths
                    or int(owner["pid"]) != pid and not _pid_running(int(owner["pid"]))))
      if stale:
        shutil.rmtree(full, ignore_errors=True)
        with contextlib.suppress(OSError):
          os.remove(full)                  # a stray file of that name
      else:
        others.append(entry)
  if others:
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    warnings.warn(
        f"{parent}: left {len(others)} temporary output director{'y' if len(others) == 1 else 'ies'} "
        f"of `{name}` alone ({shown}): each belongs to a process still running here, to another "
        f"host, or to a knots_jax older than owner names; delete them by hand once no run "
        f"writes `{name}`",
        stacklevel=4)


# ---------------------------------------------------------------- checks and manifest


def _tree_entries(root: str) -> list[str]:
  """Every path under `root`, relative, directories with a trailing '/' (the manifest excluded)."""
  found, todo = [], [("", root)]
  while todo:
    prefix, directory = todo.pop()
    with os.scandir(directory) as it:
      for entry in it:
        relative = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
          found.append(relative + "/")
          todo.append((relative + "/", entry.path))
        elif relative != MANIFEST:
          found.append(relative)
  return sorted(found)


def _write_manifest(directory: str) -> None:
  """The manifest of a finished `directory`: what it holds, written last (before the rename)."""
  write_json(os.path.join(directory, MANIFEST),
             {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
              "about": "written by knots_jax; --config.overwrite replaces this directory only "
                       "while it holds nothing but these entries",
              "entries": _tree_entries(directory)})


def _not_ours(path: str, why: str) -> ValueError:
  return ValueError(
      f"output directory `{path}` exists and {why}; overwrite replaces only outputs knots_jax "
      "wrote itself, so nothing was changed. If it is an old output, delete it by hand; "
      "otherwise choose another output directory")


def _check_replaceable(path: str) -> None:
  """Raises ValueError unless `path` is a knots_jax output holding nothing but its manifest's entries."""
  manifest_path = os.path.join(path, MANIFEST)
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise _not_ours(path, f"has no {MANIFEST}: knots_jax did not write it, or a version older "
                    "than the manifest did") from None
  except (OSError, ValueError) as e:
    raise _not_ours(path, f"its {MANIFEST} cannot be read ({e})") from None
  entries = manifest.get("entries") if isinstance(manifest, dict) else None
  if (not isinstance(entries, list) or manifest.get("format") != MANIFEST_FORMAT
      or not all(isinstance(e, str) for e in entries)):
    raise _not_ours(path, f"its {MANIFEST} is not a knots_jax output manifest")
  try:
    present = _tree_entries(path)
  except OSError as e:
    raise ValueError(f"output directory `{path}` cannot be listed to check it before "
                     f"overwriting ({e}); fix its permissions or choose another output") from None
  listed = set(entries)
  foreign = [e for e in present if e not in listed]
  if foreign:
    tops, inside = [], None                # a foreign directory stands for what it holds
    for e in foreign:                      # (sorted: a directory's entries follow it)
      if inside is None or not e.startswith(inside):
        tops.append(e)
        inside = e if e.endswith("/") else None
    shown = ", ".join(f"`{e}`" for e in tops[:_SHOWN])
    more = f" and {len(tops) - _SHOWN} more" if len(tops) > _SHOWN else ""
    raise ValueError(
        f"output directory `{path}` holds entries knots_jax did not write ({shown}{more}); "
        "overwrite replaces only outputs knots_jax wrote itself, so nothing was changed. Move "
        "those entries out of it, or choose another output directory")


def check_output_dir(path: str, overwrite: bool = False) -> None:
  """Raises ValueError if `path` may not be written: it exists and not `overwrite`, is a file,
  or (with `overwrite`) is not a knots_jax output or holds entries its manifest does not list."""
  _check_target(os.path.normpath(os.path.abspath(os.fspath(path))), overwrite)


def _check_target(path: str, overwrite: bool, locked: bool = False) -> None:
  """Refuses to write over an existing output unless asked to, and never over foreign files.

  Unless the caller holds the output's lock (`locked`), the manifest check
  takes it, so a concurrent writer's swap is not seen half done.
  """
  if not os.path.lexists(path):
    return
  if overwrite and not locked and os.path.isdir(path) and not os.path.islink(path):
    with _output_lock(*os.path.split(path), required=False):
      _check_target(path, overwrite, locked=True)
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise ValueError(f"output `{path}` exists and is not a directory; refusing to replace it "
                     "(choose another output)")
  if not overwrite:
    raise ValueError(f"output directory `{path}` already exists; pass overwrite=True "
                     "(--config.overwrite=True) to replace it")
  _check_replaceable(path)


# ---------------------------------------------------------------- making directories


def _reworded(e: OSError, message: str) -> OSError:
  """`e`'s own OSError subclass and errno, with a message that names the output and the fix."""
  error = type(e)(e.errno, message)
  error.filename = e.filename
  return error


def _make_parents(path: str, parent: str) -> list[str]:
  """Creates `parent` and its missing ancestors; returns those it created (outermost first)."""
  missing = []
  directory = parent
  while not os.path.isdir(directory):
    if os.path.lexists(directory):
      raise NotADirectoryError(
          errno.ENOTDIR, f"cannot write output `{path}`: `{directory}` is a file, not a "
          "directory; choose an output inside a directory")
    missing.append(directory)
    directory = os.path.dirname(directory)
  created = []
  for directory in reversed(missing):
    try:
      os.mkdir(directory, 0o777)
    except FileExistsError:
      if not os.path.isdir(directory):
        raise
      continue                             # made by another writer meanwhile
    except OSError as e:
      _remove_dirs(created)
      raise _reworded(e, f"cannot write output `{path}`: cannot create directory "
                      f"`{directory}` ({e.strerror}); choose a writable location") from None
    created.append(directory)
  return created


def _remove_dirs(created: list[str]) -> None:
  """Removes the directories in `created` that are still empty, innermost first."""
  for directory in reversed(created):
    with contextlib.suppress(OSError):
      os.rmdir(directory)


def _make_temp_dir(path: str, parent: str, name: str, created: list[str]) -> str:
  """A new owned `<name>.tmp-…` in `parent`, with the mode `os.mkdir` gives (umask applies)."""
  for _ in range(100):
    tmp = _owned_name(parent, name, "tmp")
    with _open_paths_lock:
      try:
        os.mkdir(tmp, 0o777)
      except FileExistsError:
        continue
      except FileNotFoundError:            # the parent was removed by a failed writer meanwhile
        created += _make_parents(path, parent)
        continue
      except OSError as e:
        raise _reworded(e, f"cannot write output `{path}`: cannot create a directory in "
                        f"`{parent}` ({e.strerror}); choose a writable location") from None
      _open_paths.add(tmp)
      return tmp
  raise FileExistsError(errno.EEXIST, f"cannot write output `{path}`: no free temporary "
                        f"name in `{parent}`")


# ---------------------------------------------------------------- signals


class _SigtermState:
  """The SIGTERM handler shared by every atomic directory open in the main thread."""
  lock = threading.Lock()
  depth = 0                 # atomic directories open in the main thread
  previous: Any = None      # the handler to restore, or None when none was installed
  terminating = False


def _on_sigterm(signum: int, frame: Any) -> None:
  """Raises Terminated in the main thread (once: a second SIGTERM does not cut the cleanup)."""
  if _SigtermState.depth == 0:             # left installed past its use: terminate as before
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  if _SigtermState.terminating:
    return
  _SigtermState.terminating = True
  raise Terminated(128 + signum)


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
  """While open in the main thread, SIGTERM raises Terminated (if SIGTERM had its default action).

  A handler the program installed itself, or SIG_IGN, is left alone; off the
  main thread nothing changes (signals are handled in the main thread only).
  """
  if not _in_main_thread():
    yield
    return
  with _SigtermState.lock:
    if _SigtermState.depth == 0:
      _SigtermState.previous = None
      if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        _SigtermState.previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _SigtermState.depth += 1
  try:
    yield
  finally:
    with _SigtermState.lock:
      _SigtermState.depth -= 1
      if _SigtermState.depth == 0:
        if (_SigtermState.previous is not None and _in_main_thread()
            and signal.getsignal(signal.SIGTERM) is _on_sigterm):
          signal.signal(signal.SIGTERM, _SigtermState.previous)
        _SigtermState.previous = None
        _SigtermState.terminating = False


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
  """SIGINT and SIGTERM wait (blocked) until the block ends: the swap is not cut in half."""
  if not (_in_main_thread() and hasattr(signal, "pthread_sigmask")):
    yield
    return
  old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------- lock and swap


@contextlib.contextmanager
def _output_lock(parent: str, name: str, required: bool = True) -> Iterator[None]:
  """An exclusive `flock` on `<parent>/.<name>.lock`, removed again on release.

  The file is unlinked while held; a waiter that then gets the lock on the
  unlinked file sees that the path no longer names it and tries again, so
  exactly one writer holds the lock of the file at that path. Not `required`
  (a check before writing), a lock file that cannot be made means no lock.
  """
  if fcntl is None:
    yield
    return
  lock_path = os.path.join(parent, f".{name}.lock")
  while True:
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
      if required:
        raise
      yield
      return
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      held = os.fstat(fd)
      try:
        current = os.stat(lock_path)
      except FileNotFoundError:
        current = None
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      warnings.warn(f"{lock_path}: this file system has no file locks ({e.strerror}); "
                    "concurrent writers of one output are not serialized", stacklevel=4)
      with contextlib.suppress(OSError):
        os.remove(lock_path)
      yield
      return
    except BaseException:
      os.close(fd)
      raise
    if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
      break
    os.close(fd)
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(lock_path)
    os.close(fd)


def _swap_in(tmp: str, path: str) -> str | None:
  """Moves the finished `tmp` to `path`; returns where the old `path` was put aside (or None).

  Called with the lock held and signals deferred: an old `path` is renamed
  aside, `tmp` renamed in, and the old one put back if that fails.
  """
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return None
  parent, name = os.path.split(path)
  aside = _owned_name(parent, name, "old")
  with _open_paths_lock:
    _open_paths.add(aside)
  os.rename(path, aside)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(aside, path)                 # put the old output back
    raise
  return aside


def _forget(*paths: str | None) -> None:
  with _open_paths_lock:
    _open_paths.difference_update(p for p in paths if p)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `path` when the block succeeds.

  Raises ValueError before anything is written if `path` exists and not
  `overwrite`, if it is a file, or (with `overwrite`) if it is not a knots_jax
  output or holds entries its manifest does not list; the same check is made
  again, under the lock, just before the swap. With `overwrite`, the old
  directory is replaced only once the new one is complete. On any exception
  (KeyboardInterrupt, and SIGTERM in the main thread, included) the temporary
  directory and the parents this call created are removed and `path` is left
  as it was. Leftovers of killed runs that wrote `path` from this host are
  removed first.
  """
  path = os.path.normpath(os.path.abspath(os.fspath(path)))
  _check_target(path, overwrite)
  parent, name = os.path.split(path)
  with _sigterm_unwinds():
    created: list[str] = []
    tmp = aside = None
    swapped = False
    try:
      created += _make_parents(path, parent)
      _remove_stale_siblings(parent, name)
      tmp = _make_temp_dir(path, parent, name, created)
      yield tmp
      _write_manifest(tmp)
      with _output_lock(parent, name):
        _check_target(path, overwrite, locked=True)   # something may have appeared meanwhile
        with _signals_deferred():
          aside = _swap_in(tmp, path)
          swapped = True
      if aside:
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
      if tmp and not swapped:
        shutil.rmtree(tmp, ignore_errors=True)
      if aside:
        shutil.rmtree(aside, ignore_errors=True)
      if not swapped:
        _remove_dirs(created)
      raise
    finally:
      _forget(tmp, aside)


# ---------------------------------------------------------------- files


def to_jsonable(obj: Any) -> Any:
  """Plain JSON values: NumPy / JAX scalars and arrays to Python, tuples and sets to lists,
  mapping keys to strings, NaN and ±inf to None (strict JSON has no NaN). The one
  sanitiser of the package (`write_json`, the alignment cache's metadata, the records)."""
  if isinstance(obj, np.generic):
    obj = obj.item()
  elif hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
    obj = np.asarray(obj).tolist()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (set, frozenset)):
    return [to_jsonable(v) for v in sorted(obj)]
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if obj is None or isinstance(obj, (str, bool, int, float)):
    return obj
  raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON (`to_jsonable`), replacing `path` atomically: the one
  JSON writer of the package.

  The file gets the mode `open(path, "w")` would give: the umask's for a new
  file, the old file's for a replaced one.
  """
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  for _ in range(100):
    tmp = _owned_name(directory, base, "tmp")
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
      break
    except FileExistsError:
      continue
  else:
    raise FileExistsError(errno.EEXIST, f"cannot write `{path}`: no free temporary name")
  try:
    with os.fdopen(fd, "w") as f:
      with contextlib.suppress(FileNotFoundError):
        old = os.stat(path)
        if stat.S_ISREG(old.st_mode):
          os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
      json.dump(to_jsonable(obj), f, indent=2, allow_nan=False)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def write_results(workdir: str, results: Any, text: str, overwrite: bool = False) -> None:
  """An evaluation's `results.json` (every number) and `results.md` (its tables), atomically."""
  with atomic_output_dir(workdir, overwrite=overwrite) as tmp:
    write_json(os.path.join(tmp, RESULTS_JSON), results)
    with open(os.path.join(tmp, RESULTS_MD), "w") as f:
      f.write(text)
