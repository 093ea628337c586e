"""The Orbax full-model writer: its progress bar and its failures (round trips are in
tests/export/test_full_model.py)."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import knots_jax
from knots_jax.cli import main
from knots_jax.export import orbax_model
from knots_jax.io import config_args, hf_checkpoint

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")


@pytest.fixture(scope="module")
def demo():
  config = main.load_config(["--config", DEMO_CONFIG])
  result = knots_jax.merge(knots_jax.load_adapters(config_args.split_list(config.adapters)),
                           "knots_ties", top_k=30)
  return config.base_model, result


def test_the_progress_bar_counts_the_bytes_of_the_whole_model(demo, tmp_path, monkeypatch):
  base, result = demo
  bars = []
  real = orbax_model.sharding_lib.progress_bar

  def progress_bar(*args, **kwargs):
    bars.append(real(*args, **kwargs))
    return bars[-1]

  monkeypatch.setattr(orbax_model.sharding_lib, "progress_bar", progress_bar)
  report = orbax_model.save_merged_model_orbax(result, base, str(tmp_path / "m"), progress=True)
  nbytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
               for _, shape, dtype in hf_checkpoint.header(base).values())
  assert len(bars) == 1 and bars[0].unit == "B" and bars[0].total == nbytes == bars[0].n
  assert report["total_size"] == nbytes


def test_a_failed_write_is_one_oserror_and_nothing_else(demo, tmp_path):
  """A real failed write (files may not grow past 4 KiB: EFBIG) through Orbax's asynchronous
  save: one OSError naming the directory and the OS error, nothing on stderr (no Orbax logs,
  no `Event loop is closed`), and no directory or temporary left."""
  base, _ = demo
  out = tmp_path / "merged"
  script = f"""
import json, os, resource, signal, sys
sys.path.insert(0, {os.path.abspath(REPO)!r})
import knots_jax
from knots_jax.export import orbax_model
from knots_jax.io import config_args
from knots_jax.cli import main
config = main.load_config(["--config", {DEMO_CONFIG!r}])
result = knots_jax.merge(knots_jax.load_adapters(config_args.split_list(config.adapters)),
                         "knots_ties", top_k=30)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
  orbax_model.save_merged_model_orbax(result, {base!r}, {str(out)!r})
except OSError as e:
  print(json.dumps([type(e).__name__, e.errno, str(e.strerror), e.filename]))
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  for noise in ("Traceback", "Event loop is closed", "ERROR", "exception was never retrieved"):
    assert noise not in proc.stderr, proc.stderr
  assert json.loads(proc.stdout) == [
      "OSError", errno.EFBIG, f"cannot write output `{out}`: {os.strerror(errno.EFBIG)}", str(out)]
  assert os.listdir(tmp_path) == []
