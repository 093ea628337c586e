"""Atomic output directories, checked against the file system's real state and real processes.

Processes that are killed, signalled or run side by side load `output_dir.py`
by its path (it needs only NumPy), so each starts in a fraction of a second.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading

import pytest

from knots_jax.io import output_dir

MODULE = os.path.join(os.path.dirname(__file__), "..", "..", "knots_jax", "io", "output_dir.py")
LOAD = f"""
import importlib.util, json, os, signal, sys, time, warnings
spec = importlib.util.spec_from_file_location("output_dir", {os.path.abspath(MODULE)!r})
output_dir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(output_dir)
"""


def tree(root) -> dict[str, str]:
  """Every path under `root` with its content ('<dir>' for a directory), read by os.walk."""
  found = {}
  for directory, dirs, files in os.walk(root):
    rel = os.path.relpath(directory, root)
    for d in dirs:
      found[os.path.normpath(os.path.join(rel, d))] = "<dir>"
    for f in files:
      with open(os.path.join(directory, f)) as fh:
        found[os.path.normpath(os.path.join(rel, f))] = fh.read()
  return found


def write_output(path, tag: str = "x", overwrite: bool = False) -> None:
  with output_dir.atomic_output_dir(str(path), overwrite=overwrite) as tmp:
    with open(os.path.join(tmp, "a.txt"), "w") as f:
      f.write(tag)
    os.makedirs(os.path.join(tmp, "sub"))
    output_dir.write_json(os.path.join(tmp, "sub", "b.json"), {"tag": tag})


# ------------------------------------------------------------ overwrite (item 4)


def test_overwrite_refuses_a_directory_knots_jax_did_not_write(tmp_path):
  project = tmp_path / "project"
  (project / "src").mkdir(parents=True)
  (project / "README.md").write_text("mine")
  (project / "src" / "code.py").write_text("print(1)")
  before = tree(project)
  for check in (lambda: output_dir.check_output_dir(str(project), overwrite=True),
                lambda: write_output(project, overwrite=True)):
    with pytest.raises(ValueError, match=r"(?s)project`.*no \.knots_jax_output\.json.*"
                                         r"delete it by hand"):
      check()
  assert tree(project) == before and os.listdir(tmp_path) == ["project"]
  # An empty directory is no output of the package either.
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .knots_jax_output.json"):
    write_output(tmp_path / "empty", overwrite=True)
  assert os.path.isdir(tmp_path / "empty")


def test_overwrite_replaces_only_an_output_that_holds_nothing_foreign(tmp_path):
  out = tmp_path / "out"
  write_output(out, "first")
  manifest = json.loads((out / output_dir.MANIFEST).read_text())
  on_disk = tree(out)
  del on_disk[output_dir.MANIFEST]
  assert sorted(manifest["entries"]) == sorted(p + "/" if v == "<dir>" else p
                                               for p, v in on_disk.items())

  (out / "notes.txt").write_text("mine")
  (out / "sub" / "mine.txt").write_text("mine too")
  (out / "data").mkdir()
  (out / "data" / "big.bin").write_text("0")
  before = tree(out)
  with pytest.raises(ValueError, match=r"out`.*`data/`, `notes.txt`, `sub/mine.txt`\).*Move"):
    write_output(out, "second", overwrite=True)
  assert tree(out) == before

  for extra in ("notes.txt", "sub/mine.txt", "data/big.bin", "data"):
    path = out / extra
    path.rmdir() if path.is_dir() else path.unlink()
  (out / "a.txt").unlink()               # entries of the output that are gone are no problem
  write_output(out, "second", overwrite=True)
  assert (out / "a.txt").read_text() == "second"
  assert json.loads((out / "sub" / "b.json").read_text()) == {"tag": "second"}
  assert sorted(os.listdir(tmp_path)) == ["out"]

  # A manifest that is not ours is refused like a missing one.
  (out / output_dir.MANIFEST).write_text("[1, 2]")
  with pytest.raises(ValueError, match="not a knots_jax output manifest"):
    write_output(out, "third", overwrite=True)
  assert (out / "a.txt").read_text() == "second"


# ------------------------------------------------------------ signals and leftovers (item 6)


def test_sigterm_cleans_up_like_ctrl_c_and_restores_the_handler(tmp_path):
  out = tmp_path / "out"
  write_output(out, "old")
  before = tree(out)
  child = subprocess.Popen([sys.executable, "-c", LOAD + f"""
with output_dir.atomic_output_dir({str(tmp_path / "done")!r}) as tmp:
  pass
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
with output_dir.atomic_output_dir({str(out)!r}, overwrite=True) as tmp:
  with output_dir.atomic_output_dir(os.path.join(tmp, "nested")) as inner:
    open(os.path.join(inner, "half"), "w").write("x" * 100000)
    print("ready", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    lines = [child.stdout.readline().split() for _ in range(2)]
    assert lines == [["restored", "True"], ["ready"]], child.stderr.read()
    assert len(os.listdir(tmp_path)) == 3          # done, out and out's temporary directory
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
  finally:
    child.kill()
    child.wait()
  assert sorted(os.listdir(tmp_path)) == ["done", "out"]
  assert tree(out) == before

  # With no atomic directory open, SIGTERM kills as it always did.
  idle = subprocess.Popen([sys.executable, "-c", LOAD + "print('ready', flush=True); "
                           "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
  try:
    assert idle.stdout.readline() == "ready\n"
    idle.send_signal(signal.SIGTERM)
    assert idle.wait(timeout=30) == -signal.SIGTERM
  finally:
    idle.kill()
    idle.wait()


def _exited_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_next_write_removes_leftovers_of_killed_runs_of_this_host(tmp_path):
  out = tmp_path / "out"
  child = subprocess.Popen([sys.executable, "-c", LOAD + f"""
with output_dir.atomic_output_dir({str(out)!r}) as tmp:
  open(os.path.join(tmp, "half"), "w").write("x")
  print("ready", flush=True)
  time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == "ready\n"
    child.kill()                                    # SIGKILL: no cleanup can run
  finally:
    child.wait()
  (killed,) = os.listdir(tmp_path)                 # named by its owner: host and pid
  host, pid, _ = killed.removeprefix("out.tmp-").rsplit("-", 2)
  assert host and "-" not in host and pid == str(child.pid)

  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    dead = _exited_pid()
    stale = [f"out.old-{host}-{dead}-0a1b2c3d"]
    kept = [f"out.tmp-{host}-{sleeper.pid}-00ff00ff",      # a run still writing
            f"out.tmp-otherhost-{dead}-00ff00ff",          # another host's
            "out.tmp-k2v9x_q1"]                            # an older version's
    for name in stale + kept:
      (tmp_path / name).mkdir()
      (tmp_path / name / "f").write_text("x")
    (tmp_path / "outer.tmp-x").mkdir()                     # another output's name
    with pytest.warns(UserWarning, match=r"left 3 temporary output directories of `out` alone"):
      write_output(out)
  finally:
    sleeper.kill()
    sleeper.wait()
  assert sorted(os.listdir(tmp_path)) == sorted(["out", "outer.tmp-x"] + kept)

  # A leftover of an earlier process that had this process's pid (containers reuse pids).
  mine = tmp_path / f"again.tmp-{host}-{os.getpid()}-12345678"
  mine.mkdir()
  write_output(tmp_path / "again")
  assert not mine.exists() and (tmp_path / "again" / "a.txt").exists()


# ------------------------------------------------------------ concurrency (item 7)

WRITER = """
warnings.simplefilter("ignore")
out, wid, writers, writes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
open(out + ".ready-" + wid, "w").close()
parent = os.path.dirname(out)
while sum(n.startswith("out.ready-") for n in os.listdir(parent)) < writers:
  time.sleep(0.001)
failures = []
for i in range(writes):
  tag = wid + "-" + str(i)
  try:
    with output_dir.atomic_output_dir(out, overwrite=True) as tmp:
      for name in ("a", "b", "c"):
        open(os.path.join(tmp, name), "w").write(tag)
      os.mkdir(os.path.join(tmp, "sub"))
      open(os.path.join(tmp, "sub", "d"), "w").write(tag)
  except Exception as e:
    failures.append(type(e).__name__ + ": " + str(e))
print(json.dumps(failures))
"""


def test_concurrent_overwrites_each_replace_the_output_whole(tmp_path):
  out, writers, writes = str(tmp_path / "out"), 4, 40
  procs = [subprocess.Popen([sys.executable, "-c", LOAD + WRITER, out, str(w), str(writers),
                             str(writes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for w in range(writers)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr
    assert json.loads(stdout) == [], stdout
  for w in range(writers):
    os.remove(f"{out}.ready-{w}")
  assert os.listdir(tmp_path) == ["out"]           # no tmp-, old- or lock file left
  final = tree(out)
  manifest = json.loads(final.pop(output_dir.MANIFEST))
  assert sorted(manifest["entries"]) == ["a", "b", "c", "sub/", "sub/d"]
  tags = {v for v in final.values() if v != "<dir>"}
  assert len(tags) == 1 and tags.pop().split("-")[1] == str(writes - 1)   # one writer's last


@pytest.mark.filterwarnings("ignore:.*temporary output director")   # the other threads' own
def test_threads_write_outputs_without_touching_signals(tmp_path):
  handler = signal.getsignal(signal.SIGTERM)
  errors = []

  def write(i: int) -> None:
    try:
      for _ in range(5):
        write_output(tmp_path / "shared", str(i), overwrite=True)
    except BaseException as e:                     # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == [] and signal.getsignal(signal.SIGTERM) is handler
  assert os.listdir(tmp_path) == ["shared"]
  assert (tmp_path / "shared" / "a.txt").read_text() in {"0", "1", "2"}


# ------------------------------------------------------------ modes (item 8)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_modes_follow_the_umask(tmp_path, umask):
  previous = os.umask(umask)
  try:
    os.makedirs(tmp_path / "reference" / "sub")
    open(tmp_path / "reference" / "file", "w").close()
    for overwrite in (False, True):
      write_output(tmp_path / "out", overwrite=overwrite)
  finally:
    os.umask(previous)

  def mode(*parts) -> int:
    return stat.S_IMODE(os.stat(os.path.join(tmp_path, *parts)).st_mode)

  assert mode("reference") == 0o777 & ~umask and mode("reference", "file") == 0o666 & ~umask
  for directory in (("out",), ("out", "sub")):
    assert mode(*directory) == mode("reference")
  for file in (("out", "a.txt"), ("out", "sub", "b.json"), ("out", output_dir.MANIFEST)):
    assert mode(*file) == mode("reference", "file")


def test_write_json_keeps_the_mode_of_the_file_it_replaces(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("{}")
  os.chmod(path, 0o640)
  output_dir.write_json(str(path), {"a": 1})
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["config.json"]


# ------------------------------------------------------------ bad parents


def test_a_file_as_parent_is_named_and_nothing_is_left(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"`.*file` is a file, not a directory"):
    write_output(tmp_path / "file" / "deeper" / "out")
  assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"

  # Parents the write created are removed again when it fails.
  with pytest.raises(RuntimeError, match="boom"):
    with output_dir.atomic_output_dir(str(tmp_path / "new" / "deeper" / "out")) as tmp:
      open(os.path.join(tmp, "half"), "w").write("x")
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == ["file"]


def test_a_read_only_parent_is_named_and_nothing_is_left(tmp_path):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  os.chmod(tmp_path, 0o755)
  os.chmod(read_only, 0o555)
  prefix = []
  if os.geteuid() == 0:                            # root ignores permissions: drop that power
    setpriv = shutil.which("setpriv")
    if setpriv is None:
      pytest.skip("running as root without setpriv: cannot make a directory read-only")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
  code = f"""
for out in ({str(read_only / "out")!r}, {str(read_only / "a" / "out")!r}):
  try:
    with output_dir.atomic_output_dir(out) as tmp:
      pass
  except PermissionError as e:
    print(json.dumps(str(e)))
"""
  proc = subprocess.run(prefix + [sys.executable, "-c", LOAD + code], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  messages = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(messages) == 2
  for message in messages:
    assert "read_only" in message and "choose a writable location" in message
  assert os.listdir(read_only) == []
  os.chmod(read_only, 0o755)


# ---------------------------------------------------- OS failures inside the block (#7 item 9)


def _raised_in_block(path, error, nested: str | None = None):
  """What `atomic_output_dir(path)` raises when `error(tmp)` is raised inside it (inside a
  second atomic directory `nested` under it, when given)."""
  with pytest.raises(BaseException) as info:
    with output_dir.atomic_output_dir(str(path)) as tmp:
      open(os.path.join(tmp, "half"), "w").write("x")
      if nested is None:
        raise error(tmp)
      with output_dir.atomic_output_dir(os.path.join(tmp, nested)) as inner:
        raise error(inner)
  return info.value


def test_os_errors_inside_the_block_name_the_output_and_the_os_error(tmp_path):
  out = tmp_path / "out"
  full = lambda tmp: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # os.pwrite: no file
  e = _raised_in_block(out, full)
  assert type(e) is OSError and e.errno == errno.ENOSPC and e.filename == str(out)
  assert e.strerror == f"cannot write output `{out}`: No space left on device"
  # a file in the temporary directory is named where it would have been
  denied = lambda tmp: PermissionError(errno.EACCES, "Permission denied",
                                       os.path.join(tmp, "sub", "a.bin"))
  e = _raised_in_block(out, denied)
  assert isinstance(e, PermissionError) and e.filename == str(out / "sub" / "a.bin")
  assert e.strerror == f"cannot write `{out / 'sub' / 'a.bin'}`: Permission denied"
  # nested outputs (the adapter inside --config.output) name the final nested path
  e = _raised_in_block(out, full, nested="adapter")
  assert e.strerror == f"cannot write output `{out / 'adapter'}`: No space left on device"
  # native writers: safetensors' serializer and tensorstore (Orbax) carry the errno in text
  safetensors_error = lambda tmp: RuntimeError(
      "Error while serializing: I/O error: No space left on device (os error 28)")
  tensorstore_error = lambda tmp: ValueError(
      f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{tmp}/0.'
      f'orbax-checkpoint-tmp/": Failed writing: "{tmp}/d/5855": Failed to write 113933 bytes '
      "to file 14: No space left on device [os_error_code='28']")
  for native in (safetensors_error, tensorstore_error):
    e = _raised_in_block(out, native, nested="merged_model_orbax")
    assert type(e) is OSError and e.errno == errno.ENOSPC
    assert str(e.strerror) == (f"cannot write output `{out / 'merged_model_orbax'}`: "
                               "No space left on device")
    assert "tmp-" not in str(e) and "orbax-checkpoint" not in str(e)
  assert os.listdir(tmp_path) == []


def test_other_errors_inside_the_block_are_raised_as_they_are(tmp_path):
  base = tmp_path / "base.safetensors"
  errors = [OSError("disk full"),                                       # no errno: worded
            ValueError("a bad value"),
            PermissionError(errno.EACCES, "Permission denied", str(base)),   # a read elsewhere
            NotADirectoryError(errno.ENOTDIR, f"cannot write output `{tmp_path}/c`: a file"),
            RuntimeError("Error while deserializing header: HeaderTooLarge (os error 5)")]
  for error in errors:
    assert _raised_in_block(tmp_path / "out", lambda tmp: error) is error
  assert os.listdir(tmp_path) == []


def test_quiet_async_failures_waits_for_the_write_and_reports_only_its_exception(tmp_path,
                                                                              caplog):
  """What Orbax does on a failed save: an exception while its threads still write files and
  log, and late `Event loop is closed` unraisables. Only the exception comes out, once the
  writes have stopped; on success the held log records are passed on."""
  import logging
  directory = tmp_path / "ckpt"
  directory.mkdir()
  seen = []
  previous_hook = sys.unraisablehook

  def late_writer():
    import time
    for i in range(5):
      time.sleep(0.05)
      (directory / f"late{i}").write_text("x")
    logging.getLogger("absl").error("save failed in %s", directory)
    sys.unraisablehook(type("U", (), {"exc_type": RuntimeError, "object": None, "err_msg": None,
                                     "exc_value": RuntimeError("Event loop is closed"),
                                     "exc_traceback": None})())

  sys.unraisablehook = lambda u: seen.append(u.exc_value)
  try:
    with caplog.at_level(logging.ERROR):
      with pytest.raises(OSError, match="boom"):
        with output_dir.quiet_async_failures(str(directory)):
          threading.Thread(target=late_writer).start()
          logging.getLogger("asyncio").error("Task exception was never retrieved")
          raise OSError(errno.ENOSPC, "boom")
      assert sorted(os.listdir(directory)) == [f"late{i}" for i in range(5)]   # all written
      assert seen == [] and caplog.records == []
      sys.unraisablehook(type("U", (), {"exc_type": RuntimeError, "object": None, "err_msg": None,
                                       "exc_value": RuntimeError("other"),
                                       "exc_traceback": None})())
      assert [str(e) for e in seen] == ["other"]              # other unraisables pass on
      with output_dir.quiet_async_failures(str(tmp_path / "ok")):
        logging.getLogger("absl").error("a logged error of a save that succeeds")
        assert caplog.records == []
      assert [r.getMessage() for r in caplog.records] == ["a logged error of a save that succeeds"]
  finally:
    sys.unraisablehook = previous_hook
