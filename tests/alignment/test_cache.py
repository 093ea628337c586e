"""Save the alignment once (Orbax), restore it, merge: the same result as the original."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import knots_jax
from knots_jax.alignment import cache as cache_lib
from knots_jax.cli import main
from knots_jax.parallel import sharding
from tests import synthetic

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")
MERGE_CONFIG = os.path.join(REPO, "configs", "merge.py")
NLI_CONFIG = os.path.join(REPO, "configs", "llama3_8b_nli.py")


def _assert_same(a, b):
  assert a.module_names == b.module_names
  for x, y in zip(a.stacks, b.stacks):
    np.testing.assert_array_equal(np.asarray(x.b), np.asarray(y.b))
    np.testing.assert_array_equal(np.asarray(x.a), np.asarray(y.a))


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(2, 3, 4), seed=3)


@pytest.mark.parametrize("concat", ["columns", "rows"])
def test_restored_alignment_merges_like_the_original(adapters, concat, tmp_path):
  original = knots_jax.align(adapters, concat=concat)
  cache_lib.save_alignment(original, tmp_path / "ck")
  restored = cache_lib.restore_alignment(tmp_path / "ck")
  assert restored.settings == original.settings and restored.mesh is None
  assert restored.adapters.names == adapters.names
  for s, t in zip(original.aligned, restored.aligned):
    assert s.modules == t.modules and s.transposed == t.transposed
    for k in ("u", "s", "rep", "valid"):
      np.testing.assert_array_equal(np.asarray(getattr(s, k)), np.asarray(getattr(t, k)))
  for method, kw in [("knots_ties", dict(top_k=20, scaling=0.6)),
                     ("knots_dare_ties", dict(top_k=100, drop_rate=0.3, seed=7))]:
    _assert_same(knots_jax.merge(original, method, **kw), knots_jax.merge(restored, method, **kw))
  # The rebuilt adapters carry the same task updates (scale folded into b).
  for m in adapters.module_names:
    for f, g in zip(adapters.factors(m), restored.adapters.factors(m)):
      np.testing.assert_allclose(f.delta(), g.delta(), rtol=1e-5, atol=1e-6)  # scale folded in float32


def test_restore_onto_a_mesh(adapters, tmp_path):
  mesh = sharding.make_mesh(knots_jax.merging.orchestrate.jax.devices()[:1])
  original = knots_jax.align(adapters, mesh=mesh)
  cache_lib.save_alignment(original, tmp_path / "ck")
  restored = cache_lib.restore_alignment(tmp_path / "ck", mesh=mesh)
  assert restored.mesh is mesh
  assert restored.aligned[0].rep.sharding.spec == sharding.stack_spec(4)
  _assert_same(knots_jax.merge(original, "knots_ties", top_k=20),
               knots_jax.merge(restored, "knots_ties", top_k=20))
  # and the same checkpoint without a mesh
  _assert_same(knots_jax.merge(original, "knots_ties", top_k=20),
               knots_jax.merge(cache_lib.restore_alignment(tmp_path / "ck"), "knots_ties",
                               top_k=20))


def test_not_a_checkpoint_is_refused(adapters, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(cache_lib.NotAnAlignmentCheckpoint, match="not a knots_jax alignment"):
    cache_lib.restore_alignment(tmp_path / "empty")
  (tmp_path / "fake" / "meta").mkdir(parents=True)
  (tmp_path / "fake" / "arrays").mkdir()
  with pytest.raises(ValueError, match="not a knots_jax alignment"):
    cache_lib.restore_alignment(tmp_path / "fake")
  with pytest.raises(ValueError, match="already exists"):
    cache_lib.save_alignment(knots_jax.align(adapters), tmp_path / "empty")


def test_cli_alignment_cache_computes_then_restores(tmp_path, capsys):
  demo = main.load_config(["--config", DEMO_CONFIG])
  cache = tmp_path / "cache"
  base = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
          "--config.progress=false", f"--config.alignment_cache={cache}", "--config.top_k=20"]
  assert main.run(base + [f"--config.output={tmp_path / 'o1'}"]) == 0
  out = capsys.readouterr().out
  assert "computed, saved to" in out and cache.is_dir()
  assert main.run(base + [f"--config.output={tmp_path / 'o2'}"]) == 0
  assert f"restored from {cache}" in capsys.readouterr().out
  summary = json.loads((tmp_path / "o2" / "knots_config.json").read_text())
  assert summary["alignment_cache"]["source"] == "restored"
  first = load_file(str(tmp_path / "o1" / "adapter" / "adapter_model.safetensors"))
  second = load_file(str(tmp_path / "o2" / "adapter" / "adapter_model.safetensors"))
  assert first.keys() == second.keys()
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
  # other settings than the cache's are refused; a non-knots method too
  assert main.run(base + ["--config.concat=rows"]) == 2
  assert "was computed with" in capsys.readouterr().err
  assert main.run(base + ["--config.method=ties"]) == 2
  assert "knots_* methods" in capsys.readouterr().err
  (tmp_path / "junk").mkdir()
  assert main.run(base[:-2] + [f"--config.alignment_cache={tmp_path / 'junk'}"]) == 2
  assert "not a knots_jax alignment checkpoint" in capsys.readouterr().err


def test_cli_mesh_auto(tmp_path, capsys):
  demo = main.load_config(["--config", DEMO_CONFIG])
  argv = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
          "--config.progress=false", "--config.mesh=auto"]
  assert main.run(argv) == 0
  assert "mesh" in capsys.readouterr().out
  assert main.run(argv[:-1] + ["--config.mesh=bogus"]) == 2
  assert "mesh must be" in capsys.readouterr().err


def test_llama3_nli_config(tmp_path, capsys):
  config = main.load_config(["--config", f"{NLI_CONFIG}:root=/ckpt"])
  tasks = ["snli", "mnli", "sick", "qnli", "rte", "scitail"]
  assert config.adapters.split(",") == [f"/ckpt/{t}" for t in tasks]
  assert config.names.split(",") == tasks
  assert config.method == "knots_ties" and config.top_k == 30.0
  dare = main.load_config(["--config", f"{NLI_CONFIG}:root=/ckpt,method=knots_dare_ties"])
  assert dare.method == "knots_dare_ties" and dare.top_k == 100.0 and dare.drop_rate == 0.1
  given = main.load_config(["--config", f"{NLI_CONFIG}:root=/c,suffix=.pt,method=knots_dare_ties,"
                                       "top_k=50"])
  assert given.top_k == 50.0 and given.adapters.startswith("/c/snli.pt,")
  assert main.run(["merge", "--config", NLI_CONFIG]) == 2
  err = capsys.readouterr().err
  assert "set root" in err and "root=/path/to/adapters" in err


def test_the_cache_is_keyed_on_the_adapters_content(tmp_path, capsys):
  """An adapter file replaced at the same path makes the cache stale: refused, not reused."""
  demo = main.load_config(["--config", DEMO_CONFIG])
  paths = demo.adapters.split(",")
  copies = []
  for i, p in enumerate(paths):
    copies.append(str(tmp_path / f"adapter{i}"))
    shutil.copytree(p, copies[-1])
  cache = tmp_path / "cache"
  base = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={','.join(copies)}",
          "--config.progress=false", f"--config.alignment_cache={cache}"]
  assert main.run(base) == 0 and cache.is_dir()
  capsys.readouterr()
  assert main.run(base) == 0
  assert "restored from" in capsys.readouterr().out
  # the same path, other content: the second adapter's file is now the third's
  shutil.rmtree(copies[1])
  shutil.copytree(paths[2], copies[1])
  assert main.run(base) == 2
  err = capsys.readouterr().err
  assert "cannot be used: the adapters' contents differ" in err and str(cache) in err


def test_restoring_raises_no_orbax_warnings(adapters, tmp_path, caplog):
  cache_lib.save_alignment(knots_jax.align(adapters), tmp_path / "ck")
  with caplog.at_level(logging.WARNING):
    cache_lib.restore_alignment(tmp_path / "ck")
  assert "could not be restored" not in caplog.text, caplog.text


def _entries(directory) -> list[str]:
  return sorted(os.listdir(directory))


def test_the_cache_is_written_atomically(adapters, tmp_path, monkeypatch):
  """A save that fails after Orbax wrote everything, or a process killed there, leaves no
  cache directory: a later run computes the alignment instead of reading half a cache."""
  import errno
  import signal
  import subprocess
  import sys
  alignment = knots_jax.align(adapters)
  saved = cache_lib.ocp.Checkpointer.save

  def save_then_fail(self, *args, **kwargs):
    saved(self, *args, **kwargs)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(cache_lib.ocp.Checkpointer, "save", save_then_fail)
  with pytest.raises(OSError, match=f"cannot write output `{tmp_path / 'ck'}`: No space left"):
    cache_lib.save_alignment(alignment, tmp_path / "ck")
  assert _entries(tmp_path) == []
  monkeypatch.undo()

  # SIGKILL once the checkpoint is complete but not yet renamed into place
  script = f"""
import json, os, sys, time
sys.path.insert(0, {os.path.abspath(REPO)!r})
os.environ["JAX_PLATFORMS"] = "cpu"
import knots_jax
from knots_jax.alignment import cache
from knots_jax.io import output_dir
from tests import synthetic
alignment = knots_jax.align(synthetic.adapter_set(ranks=(2, 3, 4), seed=3))
def stop(tmp):
  print(json.dumps(sorted(os.listdir(tmp))), flush=True)
  time.sleep(600)
output_dir._write_manifest = stop
cache.save_alignment(alignment, {str(tmp_path / "ck")!r})
"""
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  try:
    assert json.loads(proc.stdout.readline()) == [
        "_CHECKPOINT_METADATA", "arrays", "commit_success.txt", "meta"]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  left = _entries(tmp_path)
  assert len(left) == 1 and left[0].startswith("ck.tmp-")    # no `ck`: nothing to read
  with pytest.raises(cache_lib.NotAnAlignmentCheckpoint):
    cache_lib.restore_alignment(tmp_path / "ck")
  cache_lib.save_alignment(alignment, tmp_path / "ck")           # and removes the leftover
  assert _entries(tmp_path) == ["ck"]
  assert _entries(tmp_path / "ck") == [".knots_jax_output.json", "_CHECKPOINT_METADATA",
                                       "arrays", "commit_success.txt", "meta"]
  _assert_same(knots_jax.merge(alignment, "knots_ties", top_k=20),
               knots_jax.merge(cache_lib.restore_alignment(tmp_path / "ck"), "knots_ties",
                               top_k=20))


def test_overwrite_replaces_only_a_cache_knots_jax_wrote(adapters, tmp_path):
  alignment = knots_jax.align(adapters)
  cache_lib.save_alignment(alignment, tmp_path / "ck")
  cache_lib.save_alignment(knots_jax.align(adapters, concat="rows"), tmp_path / "ck",
                           overwrite=True)
  assert cache_lib.read_meta(tmp_path / "ck")["settings"]["concat"] == "rows"
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(ValueError, match="no .knots_jax_output.json"):
    cache_lib.save_alignment(alignment, tmp_path / "mine", overwrite=True)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
  assert _entries(tmp_path) == ["ck", "mine"]
