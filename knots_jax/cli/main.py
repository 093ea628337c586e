"""`knots-jax`: merge PEFT LoRA adapters from the command line.

  knots-jax benchmark           # the offline ViT benchmark on the shipped assets (minutes, CPU)
  knots-jax benchmark --config configs/offline_benchmark.py:quick
  knots-jax evaluate --config configs/vit_b32_8tasks.py:root=/data/knots   # the paper's ViT setting
  knots-jax evaluate --config configs/llama3_8b_nli_eval.py:root=/data/knots
  knots-jax merge --config configs/demo.py
  knots-jax merge --config configs/merge.py --config.adapters=a/,b/ --config.output=out/
  knots-jax merge --help        # every option, with its default
  knots-jax methods             # the merging methods and their papers
  knots-jax presets             # the papers' settings: --config configs/merge.py:<preset>

The config file is an ml_collections config (`get_config(arg)` returning a
ConfigDict); `--config.<option>=<value>` overrides one option.
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from typing import Sequence

from knots_jax.methods import registry
from knots_jax.pipeline import config as job_config

USAGE = __doc__


def methods_table() -> str:
  width = max(len(name) for name in registry.METHODS)
  return "\n".join(f"{name:<{width}}  {m.reference}" for name, m in registry.METHODS.items())


BENCHMARK_CONFIG = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "offline_benchmark.py"))


def _config_file_given(argv: Sequence[str]) -> bool:
  return any(a == "--config" or a.startswith("--config=") for a in argv)


def _overrides(argv: Sequence[str]) -> list[str]:
  """The option names of `--config.<option>=<value>` arguments."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _unknown_option_message(argv: Sequence[str], known: Sequence[str]) -> str:
  unknown = [o for o in _overrides(argv) if o.split(".")[0] not in known]
  if not unknown:
    return "unknown option; `knots-jax <command> --help` lists the options"
  name = unknown[0]
  close = difflib.get_close_matches(name, known, n=1)
  hint = f"; did you mean `{close[0]}`?" if close else ""
  return (f"unknown option `{name}` (--config.{name}){hint} `knots-jax <command> --help` lists "
          "the options")


def load_config(argv: Sequence[str], default: str | None = None):
  """Parses `--config FILE[:arg]` (or `default` when absent) and `--config.key=value` overrides.

  Raises ValueError with one line for every mistake a user makes here: no
  config file, a file that does not exist, an unknown option (with the closest
  name), a value that does not parse.
  """
  from absl import flags   # only the commands that read a config file need these
  from ml_collections import config_flags
  if default is not None and not _config_file_given(argv):
    argv = ["--config", default, *argv]
  if not _config_file_given(argv):
    raise ValueError("--config is required, e.g. --config configs/merge.py (then "
                     "--config.<option>=<value> overrides)")
  path = _config_path(argv, None)
  if path and not os.path.isfile(path):
    raise ValueError(f"config file `{path}` does not exist")
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "merge config file", flag_values=values,
                                  lock_config=True)
  # config_flags finds the `--config.<option>` overrides in sys.argv, not in
  # the list it is given: parse with sys.argv set to this command line.
  saved, sys.argv = sys.argv, ["knots-jax"] + list(argv)
  try:
    values(sys.argv)
  except (AttributeError, KeyError):  # an override of an option that does not exist
    known = list(_loaded_keys(path))
    raise ValueError(_unknown_option_message(argv, known)) from None
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:  # get_config raised: keep its message
      message = message.split(":", 1)[0] + ": " + message.strip().splitlines()[-1]
    raise ValueError(" ".join(message.split())) from None
  finally:
    sys.argv = saved
  return values.config


def _loaded_keys(path: str | None) -> list[str]:
  """The option names of a config file (for the closest-name hint)."""
  import importlib.util
  if not path:
    return []
  try:
    spec = importlib.util.spec_from_file_location("_knots_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.get_config().keys())
  except Exception:  # noqa: BLE001 - only a hint
    return list(job_config.MERGE_FIELDS + job_config.JOB_FIELDS)


def format_summary(summary: dict) -> str:
  """The summary of `pipeline.run.run`, a row per line."""
  cfg, stats = summary["config"], summary.get("stats", {})
  options = " ".join(f"{k}={cfg[k]}" for k in job_config.MERGE_FIELDS
                     if k in cfg and k not in ("method", "path", "concat", "tol"))
  rows = [("adapters", ", ".join(f"{n} (r={'/'.join(map(str, r))})"
                                for n, r in stats["ranks"].items())),
          ("modules", str(stats["modules"])),
          ("method", f"{cfg['method']}  {options}")]
  if "kept_components" in stats:
    kept = stats["kept_components"]
    rows.append(("kept components", f"min {kept['min']}, mean {kept['mean']:.1f}, "
                                    f"max {kept['max']} per module ({cfg['path']} path)"))
  if "modules_to_save" in stats:
    extra = stats["modules_to_save"]
    rows.append(("modules_to_save", f"{len(extra['tensors'])} tensor(s) ({extra['mode']}): "
                                    + ", ".join(extra["tensors"][:3])
                                    + (" ..." if len(extra["tensors"]) > 3 else "")))
  if "threshold" in stats:
    rows.append(("TIES thresholds", ", ".join(f"{t:.3g}" for t in stats["threshold"])))
  adapter = summary.get("adapter")
  if adapter:
    rank = f"rank {adapter['rank']}"
    if adapter.get("max_rel_error") is not None and cfg["rank"]:
      rank += f", truncated: max relative error {adapter['max_rel_error']:.3g}"
    rows.append(("merged adapter", rank))
  elif "output_rank" in stats:
    rows.append(("merged rank", str(stats["output_rank"])))
  cache = summary.get("alignment_cache")
  if cache:
    rows.append(("alignment", f"restored from {cache['path']}" if cache["source"] == "restored"
                  else f"computed, saved to {cache['path']}"))
  if summary.get("mesh"):
    rows.append(("mesh", f"{summary['mesh']['devices']} device(s)"))
  full = summary.get("full_model")
  if full:
    rows.append(("full model", "; ".join(
        f"merged_model/ ({w['shards']} safetensors shard(s))" if kind == "safetensors" else
        f"merged_model_orbax/ (Orbax step {w['step']})" for kind, w in full.items())))
  rows.append(("time", ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items())))
  rows.append(("output", os.path.abspath(cfg["output"]) if cfg["output"] else "(none)"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _config_path(argv: Sequence[str], default: str | None) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return default


def run_evaluation_command(command: str, argv: Sequence[str]) -> int:
  """`knots-jax benchmark` (the offline benchmark, docs/offline_benchmark.md) and
  `knots-jax evaluate` (the paper's settings, docs/paper_settings.md): a config
  file in, the result tables printed and written to its workdir."""
  default = BENCHMARK_CONFIG if command == "benchmark" else None
  if "-h" in argv or "--help" in argv:
    path = _config_path(argv, default)
    print(f"usage: knots-jax {command} {'[' if default else ''}--config CONFIG.py[:preset,...]"
          f"{']' if default else ''} [--config.<field>=<value> ...]\n")
    if path and os.path.isfile(path):
      with open(path) as f:
        print(ast.get_docstring(ast.parse(f.read())))
    return 0
  try:
    config = load_config(argv, default=default)
    if command == "benchmark":   # flax/optax only imported by these commands
      from knots_jax.experiments.offline import benchmark
      benchmark.run_benchmark(config)
    elif config.get("setting") == "nli":
      from knots_jax.experiments import nli
      nli.run_paper_nli(config)
    else:
      from knots_jax.experiments import paper
      paper.run_paper_vision(config)
  except _expected_errors() as e:
    print(f"knots-jax: error: {_error_line(e)}", file=sys.stderr)
    return 2
  return 0


def format_dry_run(summary: dict) -> str:
  rows = [("adapters", ", ".join(f"{n} ({p})" for n, p in summary["adapters"].items())),
          ("modules", str(summary["modules"]))]
  rows += [(k, repr(v)) for k, v in summary["config"].items()]
  width = max(len(k) for k, _ in rows)
  return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] +
                   ["dry run: the inputs are valid; nothing was merged or written"])


# The failures a user can cause or meet (a bad option or file, a full or read-only
# disk, a corrupt checkpoint): one line and exit code 2, never a traceback.
def _expected_errors() -> tuple[type[BaseException], ...]:
  errors: list[type[BaseException]] = [ValueError, KeyError, OSError]
  try:
    from safetensors import SafetensorError
    errors.append(SafetensorError)
  except ImportError:  # pragma: no cover - safetensors is a dependency
    pass
  return tuple(errors)


def _error_line(e: BaseException) -> str:
  """One line: the message, and for an OSError its file(s) unless the message names them
  (or the directory they are in), without Python's `[Errno N]` prefix."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  if isinstance(e, OSError):
    text = e.strerror or text
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    if names and not any(n in text or (os.path.dirname(n) and os.path.dirname(n) in text)
                         for n in names):
      text = f"{' -> '.join(names)}: {text}"
  return " ".join(str(text).split())


def run_merge_command(argv: Sequence[str]) -> int:
  """`knots-jax merge`: flags in, one library call (`pipeline.run.run`), a summary out."""
  if "-h" in argv or "--help" in argv:
    print(job_config.help_text())
    return 0
  try:
    job, merge_config = job_config.job_from_configdict(load_config(argv))
    if not job.output and not job.dry_run:
      print("knots-jax: note: no --config.output: the merge runs but nothing is written "
            "(--config.dry_run=true only checks the inputs)", file=sys.stderr)
    if job.dry_run:
      from knots_jax.pipeline import inputs
      summary = inputs.dry_run(job, merge_config)
    else:
      from knots_jax.pipeline import run as pipeline_run   # imports JAX
      summary = pipeline_run.run(job, merge_config)
  except _expected_errors() as e:
    print(f"knots-jax: error: {_error_line(e)}", file=sys.stderr)
    return 2
  print(format_dry_run(summary) if job.dry_run else format_summary(summary))
  return 0


def _dispatch(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command == "methods":
    print(methods_table())
    return 0
  if command == "presets":
    from knots_jax.methods import presets
    print(presets.presets_table())
    return 0
  if command in ("benchmark", "evaluate"):
    return run_evaluation_command(command, rest)
  if command == "merge":
    return run_merge_command(rest)
  print(f"knots-jax: unknown command `{command}`; commands: benchmark, evaluate, merge, "
        "methods, presets", file=sys.stderr)
  return 2


def run(argv: Sequence[str] | None = None) -> int:
  """The `knots-jax` entry point; returns the exit code."""
  try:
    code = _dispatch(list(sys.argv[1:] if argv is None else argv))
    sys.stdout.flush()   # inside the try: a closed pipe fails here, not at exit
    return code
  except BrokenPipeError:   # e.g. `knots-jax merge --help | head`: the reader left
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
  sys.exit(run())
