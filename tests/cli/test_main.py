"""`knots-jax` end to end: the embedded demo, overrides, help, and refusals."""

import dataclasses
import errno
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


# ---------------------------------------------------- failures of the file system (#7 item 9)
#
# Each: exit code 2, one line `knots-jax: error: ...` naming the path and the problem, no
# traceback (nor Orbax's "Event loop is closed"), and nothing left beside the output.

RUN = "import sys; from knots_jax.cli import main; sys.exit(main.run(sys.argv[1:]))"
# Real failed writes through Orbax: files may not grow past LIMIT bytes from the moment the
# named writer starts (RLIMIT_FSIZE; the write gets EFBIG, "File too large").
LIMITED = """
import importlib, resource, signal, sys
module, name = sys.argv[1].rsplit(".", 1)
limit = 4096
module = importlib.import_module(module)
original = getattr(module, name)
def limited(*args, **kwargs):
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return original(*args, **kwargs)
setattr(module, name, limited)
del sys.argv[1]
"""


def _demo_argv(tmp_path, *more) -> list[str]:
  return ["merge", "--config", DEMO_CONFIG, "--config.progress=false",
          f"--config.output={tmp_path / 'out'}", *more]


def _assert_one_error_line(code: int, err: str, *named: str) -> None:
  assert code == 2, err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("knots-jax: error: "), err
  for text in named:
    assert text in lines[0], err


def _run_cli(argv, prefix=(), setup="") -> tuple[int, str]:
  """The command line in a fresh process (`prefix` before Python: setpriv)."""
  proc = subprocess.run([*prefix, sys.executable, "-c", setup + RUN, *argv], capture_output=True,
                        text=True, cwd=REPO, timeout=600)
  return proc.returncode, proc.stderr


def _unprivileged() -> list[str] | None:
  """A command prefix under which permissions bite ([] unless root; None: none available)."""
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which("setpriv")
  return None if setpriv is None else [
      setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.parametrize("option", ["output", "alignment_cache"])
def test_an_output_parent_that_is_a_file_is_one_line(option, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  target = tmp_path / "file" / "deeper" / option
  code = main.run(_demo_argv(tmp_path, f"--config.{option}={target}"))
  _assert_one_error_line(code, capsys.readouterr().err, f"cannot write output `{target}`",
                         f"`{tmp_path / 'file'}` is a file, not a directory")
  assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("option", ["output", "alignment_cache"])
def test_a_read_only_output_parent_is_one_line(option, tmp_path, capsys, monkeypatch):
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  target = read_only / option
  argv = _demo_argv(tmp_path, f"--config.{option}={target}")
  prefix = _unprivileged()
  os.chmod(read_only, 0o555)
  try:
    if prefix:                                   # root: a process without CAP_DAC_OVERRIDE
      code, err = _run_cli(argv, prefix)
    else:
      if prefix is None:                         # root without setpriv: the refusal simulated
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
          if os.path.dirname(os.path.abspath(path)) == str(read_only):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
          return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
      code, err = main.run(argv), capsys.readouterr().err
  finally:
    os.chmod(read_only, 0o755)
  _assert_one_error_line(code, err, f"cannot write output `{target}`",
                         f"in `{read_only}` (Permission denied)")
  assert os.listdir(read_only) == [] and os.listdir(tmp_path) == ["read_only"]


def _no_space():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_what_was_written(tmp_path, capsys, monkeypatch):
  """ENOSPC from the lowest write of each safetensors writer: the Rust serializer of the PEFT
  adapter (as safetensors words it), and os.pwrite / os.copy_file_range of the full model
  (after its first 4 KiB)."""
  import safetensors
  import safetensors.numpy

  def serialize_file(*args, **kwargs):
    raise safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")

  with monkeypatch.context() as patch:
    patch.setattr(safetensors.numpy, "serialize_file", serialize_file)
    code = main.run(_demo_argv(tmp_path))
  _assert_one_error_line(code, capsys.readouterr().err,
                         f"cannot write output `{tmp_path / 'out' / 'adapter'}`: "
                         "No space left on device")
  assert os.listdir(tmp_path) == []

  room = {"bytes": 4096}
  real_pwrite = os.pwrite

  def pwrite(fd, data, offset):
    room["bytes"] -= len(data)
    if room["bytes"] < 0:
      raise _no_space()
    return real_pwrite(fd, data, offset)

  def copy_file_range(*args):
    raise _no_space()

  with monkeypatch.context() as patch:
    patch.setattr(os, "pwrite", pwrite)
    patch.setattr(os, "copy_file_range", copy_file_range, raising=False)
    code = main.run(_demo_argv(tmp_path, "--config.full_model=true"))
  _assert_one_error_line(code, capsys.readouterr().err,
                         f"cannot write output `{tmp_path / 'out' / 'merged_model'}`: "
                         "No space left on device")
  assert room["bytes"] < 0 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("writer,option,written", [
    ("knots_jax.export.orbax_model.save_merged_model_orbax",
     ["--config.full_model=true", "--config.full_model_format=orbax"],
     "out/merged_model_orbax"),
    ("knots_jax.alignment.cache.save_alignment", ["--config.alignment_cache={cache}"], "cache"),
])
def test_a_failed_orbax_write_is_one_line_without_orbax_logs(writer, option, written, tmp_path):
  """A real failed write through Orbax's asynchronous machinery (file size limit: EFBIG). Orbax
  itself would print dozens of tracebacks and `Event loop is closed` over the real message."""
  argv = _demo_argv(tmp_path, *(o.format(cache=tmp_path / "cache") for o in option))
  code, err = _run_cli([writer] + argv, setup=LIMITED)
  _assert_one_error_line(code, err, f"cannot write output `{tmp_path / written}`: "
                                    f"{os.strerror(errno.EFBIG)}")
  assert os.listdir(tmp_path) == []


def test_an_unreadable_adapter_file_is_one_line(tmp_path):
  prefix = _unprivileged()
  if prefix is None:
    pytest.skip("running as root without setpriv: files cannot be made unreadable")
  demo = main.load_config(["--config", DEMO_CONFIG])
  adapter = tmp_path / "adapter"
  shutil.copytree(demo.adapters.split(",")[0], adapter)
  os.chmod(tmp_path, 0o755)
  argv = _demo_argv(tmp_path, f"--config.adapters={adapter},{demo.adapters.split(',')[1]}")
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    os.chmod(adapter / name, 0)
    try:
      code, err = _run_cli(argv, prefix)
    finally:
      os.chmod(adapter / name, 0o644)
    _assert_one_error_line(code, err, str(adapter / name))
    assert "Permission denied" in err   # safetensors alone says "No such file" for EACCES
  assert os.listdir(tmp_path) == ["adapter"]


@pytest.mark.parametrize("writer", [
    [], ["--config.full_model=true"],
    ["--config.full_model=true", "--config.full_model_format=orbax"]])
@pytest.mark.parametrize("damage", ["header", "data"])
def test_a_corrupt_base_model_is_one_line_for_every_writer(writer, damage, capsys, tmp_path):
  demo = main.load_config(["--config", DEMO_CONFIG])
  base = tmp_path / "base"
  shutil.copytree(demo.base_model, base)
  weights = base / "model.safetensors"
  raw = weights.read_bytes()
  weights.write_bytes(raw[:100] if damage == "header" else raw[:-1000])
  code = main.run(_demo_argv(tmp_path, f"--config.base_model={base}", *writer))
  _assert_one_error_line(code, capsys.readouterr().err, str(weights))
  assert os.listdir(tmp_path) == ["base"]


def test_python_dash_m_runs_the_command_line_without_warnings():
  """`python -m knots_jax.cli.main` runs main once (runpy warns when the package had
  imported it already)."""
  proc = subprocess.run([sys.executable, "-W", "error", "-m", "knots_jax.cli.main", "methods"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert "RuntimeWarning" not in proc.stderr and "knots_ties" in proc.stdout


def test_an_unwritable_alignment_cache_fails_before_aligning(tmp_path, capsys, monkeypatch):
  """The cache's directory is probed first: no alignment is computed for a cache that
  cannot be written (the refusal of mkdir in that parent simulated, as root may write)."""
  from knots_jax.alignment import decompose
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  target = read_only / "cache"
  real_mkdir, aligned = os.mkdir, []

  def mkdir(path, *args, **kwargs):
    if os.path.dirname(os.path.abspath(path)) == str(read_only):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return real_mkdir(path, *args, **kwargs)

  monkeypatch.setattr(os, "mkdir", mkdir)
  monkeypatch.setattr(decompose, "align", lambda *a, **k: aligned.append(1))
  code = main.run(_demo_argv(tmp_path, f"--config.alignment_cache={target}"))
  _assert_one_error_line(code, capsys.readouterr().err, f"cannot write output `{target}`",
                         f"in `{read_only}` (Permission denied)")
  assert aligned == [] and os.listdir(read_only) == []
  assert sorted(os.listdir(tmp_path)) == ["read_only"]


def test_check_writable_leaves_nothing(tmp_path):
  from knots_jax.io import output_dir
  output_dir.check_writable(tmp_path / "a" / "b" / "out")
  assert os.listdir(tmp_path) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    output_dir.check_writable(tmp_path / "file" / "out")
  assert os.listdir(tmp_path) == ["file"]
