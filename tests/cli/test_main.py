"""`knots-jax` end to end: the embedded demo, overrides, help, and refusals."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import knots_jax
from knots_jax.cli import main
from knots_jax.io import config_args
from knots_jax.methods.options import MergeConfig
from knots_jax.pipeline.config import JobConfig

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")
MERGE_CONFIG = os.path.join(REPO, "configs", "merge.py")


def test_demo_command_end_to_end(tmp_path):
  """The README's first command, as a user runs it (a fresh process, no x64)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_ENABLE_X64")}
  proc = subprocess.run(
      [sys.executable, "-m", "knots_jax.cli.main", "merge", "--config", DEMO_CONFIG,
       f"--config.output={tmp_path / 'out'}", "--config.progress=false"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for field in ("adapters", "method", "kept components", "merged adapter", "time", "output"):
    assert field in proc.stdout
  out = tmp_path / "out"
  assert sorted(os.listdir(out)) == [".knots_jax_output.json", "adapter", "knots_config.json",
                                     "merged_weights"]
  summary = json.loads((out / "knots_config.json").read_text())
  assert summary["config"]["method"] == "knots_ties"
  # The written adapter is the merge the library computes.
  import knots_jax
  config = main.load_config(["--config", DEMO_CONFIG])
  adapters = knots_jax.load_adapters(config_args.split_list(config.adapters))
  result = knots_jax.merge(adapters, "knots_ties", scaling=config.scaling, top_k=config.top_k)
  tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
  module = result.module_names[0]
  key = f"base_model.model.{module}"
  np.testing.assert_allclose(tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"],
                             result.delta(module), rtol=1e-4, atol=1e-6)


def test_overrides_reach_the_merge(tmp_path, capsys):
  demo = main.load_config(["--config", DEMO_CONFIG])
  argv = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
          "--config.method=knots_dare_ties", "--config.top_k=100", "--config.drop_rate=0.1",
          "--config.scaling=0.6", "--config.rank=4", f"--config.output={tmp_path / 'o'}",
          "--config.progress=false"]
  assert main.run(argv) == 0
  summary = json.loads((tmp_path / "o" / "knots_config.json").read_text())
  assert summary["config"]["method"] == "knots_dare_ties"
  assert summary["config"]["scaling"] == 0.6 and summary["adapter"]["rank"] == 4
  assert "truncated" in capsys.readouterr().out


def test_method_options_reach_the_merge(tmp_path, capsys):
  """--config.tsv_keep reaches TSV-M: the written adapter equals merge(..., tsv_keep=1);
  an option of another method is refused before anything is written."""
  demo = main.load_config(["--config", DEMO_CONFIG])
  base = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
          "--config.progress=false"]
  assert main.run(base + ["--config.method=tsv_m", "--config.tsv_keep=1",
                         f"--config.output={tmp_path / 'o'}"]) == 0
  assert "tsv_keep=1" in capsys.readouterr().out
  written = knots_jax.load_adapters([str(tmp_path / "o" / "adapter")])
  adapters = knots_jax.load_adapters(config_args.split_list(demo.adapters))
  want = knots_jax.merge(adapters, "tsv_m", tsv_keep=1)
  default = knots_jax.merge(adapters, "tsv_m")
  for m in adapters.module_names:
    got = written.factors(m)[0].delta()
    np.testing.assert_allclose(got, want.delta(m), atol=1e-5 * np.abs(want.delta(m)).max())
  assert any(np.abs(default.delta(m) - want.delta(m)).max() > 1e-3 for m in adapters.module_names)
  assert main.run(base + ["--config.method=ties", "--config.eta=0.5",
                         f"--config.output={tmp_path / 'p'}"]) == 2
  assert "eta=0.5 applies to sftm" in capsys.readouterr().err
  assert not (tmp_path / "p").exists()


def test_help_explains_every_option(capsys):
  assert main.run(["merge", "--help"]) == 0
  text = capsys.readouterr().out
  for field in dataclasses.fields(MergeConfig) + dataclasses.fields(JobConfig):
    assert f"--config.{field.name}" in text and field.metadata["help"].split()[0] in text
  assert main.run(["methods"]) == 0
  assert "knots_dare_ties" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--config.nope=1"], "unknown option"),
    (["--config.top_k=abc"], "top_k"),
    (["--config.adapters="], "no adapters"),
    (["--config.adapters=/does/not/exist"], "/does/not/exist"),
])
def test_bad_command_lines_are_refused(args, match, capsys, tmp_path):
  code = main.run(["merge", "--config", MERGE_CONFIG, f"--config.output={tmp_path / 'o'}"] + args)
  assert code == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_failed_run_leaves_no_output(tmp_path, capsys):
  demo = main.load_config(["--config", DEMO_CONFIG])
  # A dense TIES merge cannot be written as an exact LoRA (rank 0): the run fails while writing.
  code = main.run(["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
                  "--config.method=ties", f"--config.output={tmp_path / 'o'}",
                  "--config.progress=false"])
  assert code == 2 and "rank" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_modules_to_save_are_refused_then_merged_as_asked(llama_family, tmp_path, capsys):
  from tests import peft_factory
  base_dir, _ = llama_family
  paths = []
  for i in range(2):
    path = peft_factory.make_lora_adapter(base_dir, str(tmp_path / f"head{i}"), seed=20 + i,
                                          r=4, modules_to_save=["lm_head"])
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] += i + 1.0  # the trained heads differ
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    paths.append(path)
  argv = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={','.join(paths)}",
          "--config.progress=false", f"--config.output={tmp_path / 'o'}"]
  assert main.run(argv) == 2
  assert "lm_head.weight" in capsys.readouterr().err and not (tmp_path / "o").exists()

  assert main.run(argv + ["--config.modules_to_save=mean"]) == 0
  assert "modules_to_save  1 tensor(s) (mean): lm_head.weight" in capsys.readouterr().out
  heads = [load_file(os.path.join(p, "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
           for p in paths]
  written = load_file(str(tmp_path / "o" / "adapter" / "adapter_model.safetensors"))
  np.testing.assert_allclose(written["base_model.model.lm_head.weight"], np.mean(heads, axis=0),
                             rtol=1e-6)


def test_full_model_output_is_base_plus_merge(tmp_path):
  demo = main.load_config(["--config", DEMO_CONFIG])
  argv = ["merge", "--config", DEMO_CONFIG, f"--config.output={tmp_path / 'o'}",
          "--config.full_model=true", "--config.progress=false"]
  assert main.run(argv) == 0
  out = tmp_path / "o" / "merged_model"
  assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
  import knots_jax
  result = knots_jax.merge(knots_jax.load_adapters(config_args.split_list(demo.adapters)),
                           "knots_ties", scaling=demo.scaling, top_k=demo.top_k)
  written = load_file(str(out / "model.safetensors"))
  base = load_file(os.path.join(demo.base_model, "model.safetensors"))
  assert set(written) == set(base)  # every tensor of the model, under the base's names
  for module in result.module_names:
    np.testing.assert_allclose(written[f"{module}.weight"],
                               base[f"{module}.weight"] + result.delta(module), atol=1e-5)
  untouched = "model.embed_tokens.weight"
  np.testing.assert_array_equal(written[untouched], base[untouched])
  assert main.run(argv[:-2] + [f"--config.output={tmp_path / 'p'}", "--config.base_model=",
                              "--config.full_model=true"]) == 2


def test_full_model_format_orbax_and_both(tmp_path, capsys):
  """--config.full_model_format: the Orbax checkpoint holds the same model as the shards."""
  from knots_jax.export import orbax_model
  demo = main.load_config(["--config", DEMO_CONFIG])
  argv = ["merge", "--config", DEMO_CONFIG, "--config.full_model=true", "--config.progress=false"]
  assert main.run(argv + [f"--config.output={tmp_path / 'o'}", "--config.full_model_format=both"]) == 0
  assert "merged_model_orbax/ (Orbax step 0)" in capsys.readouterr().out
  out = tmp_path / "o"
  assert {"merged_model", "merged_model_orbax"} <= set(os.listdir(out))
  assert "config.json" in os.listdir(out / "merged_model_orbax")
  summary = json.loads((out / "knots_config.json").read_text())
  assert set(summary["full_model"]) == {"safetensors", "orbax"}
  shards = load_file(str(out / "merged_model" / "model.safetensors"))
  restored = orbax_model.restore_merged_model(str(out / "merged_model_orbax"))
  base = load_file(os.path.join(demo.base_model, "model.safetensors"))
  assert set(restored) == set(shards) == set(base)
  for key, value in restored.items():
    np.testing.assert_array_equal(np.asarray(value), shards[key], err_msg=key)
  assert any(not np.array_equal(shards[k], base[k]) for k in base)   # the merge is in it

  assert main.run(argv + [f"--config.output={tmp_path / 'p'}", "--config.full_model_format=orbax"]) == 0
  assert sorted(os.listdir(tmp_path / "p")) == [".knots_jax_output.json", "adapter",
                                                  "knots_config.json",
                                                  "merged_model_orbax"]
  assert main.run(argv + [f"--config.output={tmp_path / 'q'}",
                         "--config.full_model_format=pickle"]) == 2
  assert "full_model_format must be one of safetensors, orbax, both" in capsys.readouterr().err
  assert not (tmp_path / "q").exists()


def test_benchmark_and_evaluate_commands_dispatch_and_explain(capsys):
  root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
  assert main.run(["benchmark", "--help"]) == 0
  assert "offline benchmark" in capsys.readouterr().out
  # The paper settings name every path still to be given, per setting.
  assert main.run(["evaluate", "--config", os.path.join(root, "vit_b32_8tasks.py")]) == 2
  err = capsys.readouterr().err
  assert "paths not set" in err and "datasets.cars.path" in err
  assert main.run(["evaluate", "--config", os.path.join(root, "llama3_8b_nli_eval.py")]) == 2
  err = capsys.readouterr().err
  assert "paths not set" in err and "datasets.scitail.path" in err
  assert main.run(["evaluate"]) == 2
  assert "--config is required" in capsys.readouterr().err
  assert main.run(["nope"]) == 2
  assert "benchmark, evaluate, merge, methods" in capsys.readouterr().err


def test_new_user_mistakes_get_one_clear_line(capsys, tmp_path):
  assert main.run(["merge", "--config", MERGE_CONFIG, "--config.topk=20"]) == 2
  err = capsys.readouterr().err
  assert "unknown option `topk`" in err and "did you mean `top_k`?" in err and "\\n" not in err
  assert main.run(["merge", "--config", str(tmp_path / "nope.py")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nope.py` does not exist" in err
  assert main.run(["merge", "--config.adapters=a/"]) == 2
  assert "--config is required" in capsys.readouterr().err
  assert main.run(["merge", "--config", MERGE_CONFIG, "--config.adapters=a/",
                   "--config.seed=4294967296"]) == 2
  assert "seed must be an integer in [0, 2**32)" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config_and_writes_nothing(capsys, tmp_path):
  out = tmp_path / "o"
  demo = main.load_config(["--config", DEMO_CONFIG])
  argv = ["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
          f"--config.output={out}", "--config.method=knots_ta", "--config.dry_run=true"]
  assert main.run(argv) == 0
  text = capsys.readouterr().out
  assert "dry run: the inputs are valid" in text and "method" in text and "knots_ta" in text
  assert "top_k" not in text and "drop_rate" not in text   # knots_ta reads neither
  assert not out.exists()
  assert main.run(argv[:-1] + ["--config.adapters=/does/not/exist", "--config.dry_run=true"]) == 2
  assert "/does/not/exist" in capsys.readouterr().err


def test_a_merge_without_output_says_nothing_is_written(capsys):
  demo = main.load_config(["--config", DEMO_CONFIG])
  assert main.run(["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
                   "--config.progress=false", "--config.method=ta"]) == 0
  captured = capsys.readouterr()
  assert "no --config.output" in captured.err and "(none)" in captured.out
  assert "top_k" not in captured.out.split("method", 1)[1].splitlines()[0]


def test_help_piped_into_a_closed_reader_ends_quietly():
  done = subprocess.run(f"{sys.executable} -m knots_jax.cli.main merge --help | head -1",
                        shell=True, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert done.stdout.startswith("usage: knots-jax merge")
  closed = subprocess.run(f"{sys.executable} -m knots_jax.cli.main merge --help | true",
                          shell=True, capture_output=True, text=True, cwd=REPO, timeout=120)
  for stderr in (done.stderr, closed.stderr):
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_corrupt_base_model_is_one_line_naming_the_file(capsys, tmp_path):
  demo = main.load_config(["--config", DEMO_CONFIG])
  base = tmp_path / "base"
  shutil.copytree(demo.base_model, base)
  weights = base / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])   # truncated: a corrupt header
  code = main.run(["merge", "--config", MERGE_CONFIG, f"--config.adapters={demo.adapters}",
                   f"--config.base_model={base}", f"--config.output={tmp_path / 'o'}"])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and str(weights) in err, err
  assert not (tmp_path / "o").exists()
