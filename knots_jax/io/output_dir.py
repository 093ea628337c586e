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
* directories and files get the modes `os.makedirs` / `open()` give (umask);
* a write that fails on the disk (full, read-only) raises one OSError naming
  the output's final path and the OS error, and leaves nothing; around Orbax
  writes, `quiet_async_failures` keeps Orbax's own reports of that failure
  (logs, "Event loop is closed") off stderr and waits for the write to stop.

`shared_atomic_output_dir` is `atomic_output_dir` for writers that every JAX
process calls (imports JAX only when called).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
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


def check_writable(path: str) -> None:
  """Raises the OSError a write of output `path` would meet in making its directory (a
  parent that is a file, a read-only or missing-and-uncreatable parent), before any work
  is done for it: creates and removes a probe directory where the output would go."""
  path = os.path.normpath(os.path.abspath(os.fspath(path)))
  parent, name = os.path.split(path)
  created = _make_parents(path, parent)
  try:
    tmp = _make_temp_dir(path, parent, name, created)
    with _open_paths_lock:
      _open_paths.discard(tmp)
    os.rmdir(tmp)
  finally:
    _remove_dirs(created)


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


# safetensors: "Error while serializing: I/O error: No space left on device (os error 28)";
# tensorstore (Orbax): "... Failed writing: \"<file>\": ... [os_error_code='28']".
_SAFETENSORS_ERRNO = re.compile(r"Error while serializing\b.*\(os error (\d+)\)", re.S)
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


def _inside(filename: str, directory: str) -> bool:
  return filename == directory or filename.startswith(directory + os.sep)


def _output_error(e: Exception, tmp: str, path: str) -> OSError | None:
  """The OSError to raise for `e`, raised while the temporary `tmp` of output `path` was
  filled, or None to raise `e` as it is.

  An OSError with an errno about a file in `tmp` (or about no file: `os.pwrite`
  on a full disk) is reworded to name the file's final place under `path`. A
  native writer's failure that carries an errno (safetensors' serializer; a
  tensorstore write into `tmp`, whose message runs over many lines of
  internal paths) becomes an OSError of that errno naming `path` and the OS
  error's text. Anything else (a bad value, an error reading the base model)
  is left alone.
  """
  if isinstance(e, OSError):
    if e.errno is None:
      return None
    filename = e.filename if isinstance(e.filename, str) else None
    if filename is None and e.strerror not in (None, os.strerror(e.errno)):
      return None                          # worded by its raiser, who named what it meant
    if filename is not None and not _inside(filename, tmp):
      return None
    code, text = e.errno, e.strerror or os.strerror(e.errno)
  else:
    message = str(e)
    match = _SAFETENSORS_ERRNO.search(message)
    if match is None and tmp in message:
      match = _TENSORSTORE_ERRNO.search(message)
    if match is None:
      return None
    code, filename = int(match[1]), None
    text = os.strerror(code)
  text = text.replace(tmp, path)
  filename = path if filename is None else filename.replace(tmp, path)
  if path not in text:
    what = f"output `{path}`" if filename == path else f"`{filename}`"
    text = f"cannot write {what}: {text}"
  error = OSError(code, text)
  error.filename = filename
  return error


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

  An OS failure inside the block (a full or read-only disk: an OSError with an
  errno about a file in the temporary directory or about none, or a native
  writer's error that carries an errno, as safetensors' and tensorstore's do)
  is raised as an OSError of that errno whose message names `path` (not the
  temporary name, which is gone) and the OS error's text: `_output_error`.
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
      try:
        yield tmp
      except Exception as e:
        error = _output_error(e, tmp, path)
        if error is None:
          raise
        raise error from e
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


def _broadcast_path(path: str | None) -> str:
  """Process 0's `path` on every process (a temporary directory's random name)."""
  import jax
  from jax.experimental import multihost_utils
  buffer = np.zeros(4096, np.uint8)
  if jax.process_index() == 0:
    raw = np.frombuffer(path.encode(), np.uint8)
    if raw.size > buffer.size:
      raise ValueError(f"output path too long to share between processes: {path}")
    buffer[:raw.size] = raw
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(buffer[buffer != 0]).decode()


@contextlib.contextmanager
def shared_atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """`atomic_output_dir` made by JAX process 0, with its name given to every process.

  For writers that every process of a multi-host run calls (Orbax): each
  writes into the same temporary directory (which must therefore be on a
  file system all processes see), and process 0 renames it once every
  process has finished. On one process this is `atomic_output_dir`. Imports
  JAX only when called.
  """
  import jax
  if jax.process_count() == 1:
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
      yield tmp
    return
  from jax.experimental import multihost_utils
  if jax.process_index() == 0:
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
      _broadcast_path(tmp)
      yield tmp
      multihost_utils.sync_global_devices("knots_jax output written")
  else:
    tmp = _broadcast_path(None)
    yield tmp
    multihost_utils.sync_global_devices("knots_jax output written")
  multihost_utils.sync_global_devices("knots_jax output renamed")


# ---------------------------------------------------------------- native asynchronous writers
#
# Orbax writes through tensorstore from an asyncio loop that it closes as soon
# as the first write fails. The writes still pending then fail too, and each of
# their completions reports, on stderr: an unraisable `RuntimeError: Event loop
# is closed` (tensorstore calls `loop.call_soon_threadsafe` on the closed loop,
# PyErr_WriteUnraisable), `asyncio`'s "Task exception was never retrieved" and
# Orbax's own `absl` ERROR records, each with the whole failure again: dozens of
# tracebacks over the one exception that says what went wrong.

_LOGGERS = ("absl", "asyncio")


def _record_text(record: logging.LogRecord) -> str:
  try:
    text = record.getMessage()
  except Exception:  # noqa: BLE001 - a malformed record is shown as it is
    text = str(record.msg)
  if record.exc_info and record.exc_info[1] is not None:
    text += "\n" + str(record.exc_info[1])
  return text


class _AsyncFailureLogs(logging.Filter):
  """ERROR records of the `absl` and `asyncio` loggers: held while a `quiet_async_failures`
  block is open, dropped when they are about a write that failed."""

  def __init__(self) -> None:
    super().__init__()
    self.lock = threading.Lock()
    self.open: list[list[logging.LogRecord]] = []   # the records each open block holds
    self.failed: set[str] = set()                   # directories whose write failed

  def about_failed(self, record: logging.LogRecord) -> bool:
    text = _record_text(record)
    return any(directory in text for directory in self.failed)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    with self.lock:
      if self.failed and self.about_failed(record):
        return False
      for held in self.open:
        held.append(record)
      return not self.open


_async_logs = _AsyncFailureLogs()


def _quiet_unraisable(unraisable: Any) -> None:
  """sys.unraisablehook without tensorstore's late `RuntimeError: Event loop is closed`."""
  exc = unraisable.exc_value
  if (unraisable.object is None and isinstance(exc, RuntimeError)
      and str(exc) == "Event loop is closed"):
    return
  _quiet_unraisable.previous(unraisable)


_quiet_unraisable.previous = sys.__unraisablehook__


_SETTLE_S = 10.0   # the longest a failed write's threads, then its files, are waited for
_SETTLE_TICK_S = 0.05


def _tree_state(directory: str) -> frozenset:
  """(path, size, mtime) of everything under `directory` (empty if it is gone)."""
  state = []
  for root, dirs, files in os.walk(directory):
    for entry in dirs + files:
      with contextlib.suppress(OSError):
        info = os.lstat(os.path.join(root, entry))
        state.append((os.path.join(root, entry), info.st_size, info.st_mtime_ns))
  return frozenset(state)


def _settle(directory: str, before: set) -> None:
  """Waits for a failed write to stop: its threads (those not in `before`) to end, then the
  tree under `directory` to stay the same for two ticks; then collects its garbage, so that
  asyncio reports its tasks' unretrieved exceptions now (held back), not later."""
  deadline = time.monotonic() + _SETTLE_S
  for thread in set(threading.enumerate()) - before:
    if thread is not threading.current_thread():
      thread.join(max(0.0, deadline - time.monotonic()))
  deadline = time.monotonic() + _SETTLE_S
  state, still = _tree_state(directory), 0
  while still < 2 and time.monotonic() < deadline:
    time.sleep(_SETTLE_TICK_S)
    state, previous = _tree_state(directory), state
    still = still + 1 if state == previous else 0
  gc.collect()


@contextlib.contextmanager
def quiet_async_failures(directory: str) -> Iterator[None]:
  """Around a native asynchronous write into `directory` (Orbax): if it fails, the one
  exception it raises is all that is reported, and the write has stopped when it propagates.

  Orbax returns from a failed save while other parts of it still run: its
  threads for the other items, and tensorstore's pending writes, which create
  files (and directories) in `directory` after the exception. Before the
  exception leaves the block, the Python threads started in it are joined and
  the file tree under `directory` is waited on until it stops changing (at
  most `_SETTLE_S` seconds each), so that the caller's cleanup removes it for
  good (`atomic_output_dir`).

  While the block is open, ERROR records of the `absl` and `asyncio` loggers
  are held back; they are passed on when it succeeds and dropped when it
  raises, and so are those that come later and name `directory`. While it is
  open, and for good once it has failed, `sys.unraisablehook` ignores
  `RuntimeError: Event loop is closed` reported without an object (the
  completions of the writes that were still pending when Orbax closed its
  loop, some of them after the exception; nothing else reports that error
  so), passing every other unraisable exception on to the hook it replaced.
  """
  directory = os.path.abspath(os.fspath(directory))
  before = set(threading.enumerate())
  held: list[logging.LogRecord] = []
  with _async_logs.lock:
    for name in _LOGGERS:
      logger = logging.getLogger(name)
      if _async_logs not in logger.filters:
        logger.addFilter(_async_logs)
    _async_logs.open.append(held)
    installed = sys.unraisablehook is not _quiet_unraisable
    if installed:
      _quiet_unraisable.previous = sys.unraisablehook
      sys.unraisablehook = _quiet_unraisable
  failed = False
  try:
    yield
  except BaseException:
    failed = True
    with _async_logs.lock:
      _async_logs.failed.add(directory)
    _settle(directory, before)
    raise
  finally:
    with _async_logs.lock:
      _async_logs.open.remove(held)
      if installed and not failed and sys.unraisablehook is _quiet_unraisable:
        sys.unraisablehook = _quiet_unraisable.previous
      replay = [] if failed or _async_logs.open else [
          r for r in held if not _async_logs.about_failed(r)]
    for record in replay:   # past the filter: a logger's handlers, then its parents'
      logger = logging.getLogger(record.name)
      while logger is not None:
        for handler in logger.handlers:
          if record.levelno >= handler.level:
            handler.handle(record)
        logger = logger.parent if logger.propagate else None


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
