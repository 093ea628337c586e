"""`pipeline.run`: the library function behind `knots-jax merge`, against the public API."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import knots_jax
from knots_jax.pipeline import inputs
from knots_jax.pipeline.config import JobConfig
from knots_jax.pipeline.run import run

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "demo")
ADAPTERS = tuple(os.path.join(DEMO, "adapters", n) for n in ("task_a", "task_b", "task_c"))


def test_a_job_writes_what_the_library_calls_write(tmp_path):
  config = knots_jax.MergeConfig(method="knots_ties", scaling=0.8, top_k=20)
  job = JobConfig(adapters=ADAPTERS, output=str(tmp_path / "out"), progress=False,
                  base_model=os.path.join(DEMO, "base"))
  summary = run(job, config)
  merged = knots_jax.merge(knots_jax.load_adapters(list(ADAPTERS)), config=config)
  knots_jax.save_peft_adapter(merged, str(tmp_path / "direct"))
  written = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
  direct = load_file(str(tmp_path / "direct" / "adapter_model.safetensors"))
  assert written.keys() == direct.keys()
  for key in written:
    np.testing.assert_array_equal(written[key], direct[key], err_msg=key)
  record = json.loads((tmp_path / "out" / "knots_config.json").read_text())
  assert record["config"] == summary["config"] == inputs.resolved(job, config)
  assert record["config"]["top_k"] == 20.0 and "drop_rate" not in record["config"]
  assert sorted(os.listdir(tmp_path / "out" / "merged_weights")) == [
      ".knots_jax_output.json", "knots_config.json", "model.safetensors"]


def test_a_dry_run_reads_and_checks_but_computes_and_writes_nothing(tmp_path):
  config = knots_jax.MergeConfig(method="ta")
  job = JobConfig(adapters=ADAPTERS, output=str(tmp_path / "out"), dry_run=True)
  summary = run(job, config)
  assert summary["modules"] == 8 and set(summary["adapters"]) == {"task_a", "task_b", "task_c"}
  assert "stats" not in summary and not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="alignment_cache is for the knots_\\* methods"):
    run(JobConfig(adapters=ADAPTERS, alignment_cache=str(tmp_path / "c"), dry_run=True), config)


def test_weights_from_the_command_line_reach_the_merge(tmp_path, capsys):
  """`--config.weights=0.5,1.0,0.7`: parsed once (checks.number_list), checked against the
  number of adapters before anything is read, and written to knots_config.json."""
  out = tmp_path / "out"
  config = knots_jax.MergeConfig(method="knots_ta", weights="0.5, 1.0, 0.7")
  from knots_jax.cli import main
  configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "merge.py")
  assert main.run(["merge", "--config", configs, f"--config.adapters={','.join(ADAPTERS)}",
                   "--config.method=knots_ta", "--config.weights=0.5,1.0,0.7",
                   f"--config.output={out}", "--config.progress=false"]) == 0
  assert "weights" in capsys.readouterr().out
  record = json.loads((out / "knots_config.json").read_text())
  assert record["config"]["weights"] == [0.5, 1.0, 0.7]
  merged = knots_jax.merge(knots_jax.load_adapters(list(ADAPTERS)), "ta", weights=(0.5, 1, 0.7))
  unweighted = knots_jax.merge(knots_jax.load_adapters(list(ADAPTERS)), "ta")
  written = knots_jax.load_adapters([str(out / "adapter")])
  for m in written.module_names:
    delta = written.adapters[0].modules[m].delta()
    np.testing.assert_allclose(delta, merged.delta(m), rtol=1e-4, atol=1e-4 * np.abs(
        merged.delta(m)).max())
    assert np.abs(delta - unweighted.delta(m)).max() > 1e-3
  with pytest.raises(ValueError, match=r"weights: 2 weight\(s\) for 3 adapter\(s\)"):
    run(JobConfig(adapters=ADAPTERS, dry_run=True), config.replace(weights=(1.0, 2.0)))
