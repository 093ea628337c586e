"""`knots-jax`: merge PEFT LoRA adapters from the command line.

  knots-jax benchmark           # the offline ViT benchmark on the shipped assets (minutes, CPU)
  knots-jax benchmark --config configs/offline_benchmark.py:quick
  knots-jax evaluate --config configs/vit_b32_8tasks.py:root=/data/knots   # the paper's ViT setting
  knots-jax evaluate --config configs/llama3_8b_nli_eval.py:root=/data/knots
  knots-jax merge --config configs/demo.py
  knots-jax merge --config configs/merge.py --config.adapters=a/,b/ --config.output=out/
  knots-jax merge --help        # every option, with its default
  knots-jax methods             # the merging methods and their papers

The config file is an ml_collections config (`get_config(arg)` returning a
ConfigDict); `--config.<option>=<value>` overrides one option.
"""

from __future__ import annotations

import ast
import os
import sys
import textwrap
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from knots_jax import pipeline
from knots_jax.merging import config as config_lib
from knots_jax.methods import registry

USAGE = __doc__


def merge_help() -> str:
  lines = ["usage: knots-jax merge --config CONFIG.py[:key=value,...] [--config.<option>=<value> ...]",
           "", "Merges LoRA adapters and writes the result. Options (default in brackets):", ""]
  for name, (default, text) in config_lib.FIELDS.items():
    lines.append(f"  --config.{name}  [{default!r}]")
    lines.extend(textwrap.wrap(text, 76, initial_indent="      ", subsequent_indent="      "))
  lines += ["", "Example:", "  knots-jax merge --config configs/merge.py --config.adapters=a/,b/,c/ \\",
            "      --config.method=knots_ties --config.scaling=0.6 --config.top_k=20 "
            "--config.output=merged/"]
  return "\n".join(lines)


def methods_table() -> str:
  width = max(len(name) for name in registry.METHODS)
  return "\n".join(f"{name:<{width}}  {m.reference}" for name, m in registry.METHODS.items())


BENCHMARK_CONFIG = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "offline_benchmark.py"))


def load_config(argv: Sequence[str], default: str | None = None) -> ml_collections.ConfigDict:
  """Parses `--config FILE[:arg]` (or `default` when absent) and `--config.key=value` overrides."""
  if default is not None and not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv = ["--config", default, *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "merge config file", flag_values=values,
                                  lock_config=True)
  # config_flags finds the `--config.<option>` overrides in sys.argv, not in
  # the list it is given: parse with sys.argv set to this command line.
  saved, sys.argv = sys.argv, ["knots-jax"] + list(argv)
  try:
    values(sys.argv)
  except AttributeError as e:  # an override of an option that does not exist
    raise ValueError(f"unknown option {e}; `knots-jax <command> --help` lists the options") from None
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:  # get_config raised: keep its message
      message = message.split(":", 1)[0] + ": " + message.strip().splitlines()[-1]
    raise ValueError(message) from None
  finally:
    sys.argv = saved
  if values.config is None:
    raise ValueError("--config is required, e.g. --config configs/demo.py")
  return values.config


def format_summary(summary: dict) -> str:
  cfg, stats = summary["config"], summary["stats"]
  options = "".join(f" {k}={cfg[k]}" for k, (_, users) in registry.METHOD_OPTIONS.items()
                    if cfg["method"] in users)
  rows = [("adapters", ", ".join(f"{n} (r={'/'.join(map(str, r))})"
                                for n, r in stats["ranks"].items())),
          ("modules", str(stats["modules"])),
          ("method", f"{cfg['method']}  scaling={cfg['scaling']} top_k={cfg['top_k']} "
                     f"scope={cfg['top_k_scope']}" +
                     (f" drop_rate={cfg['drop_rate']} seed={cfg['seed']}"
                      if "dare" in cfg["method"] else "") + options)]
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
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"knots-jax: error: {e}", file=sys.stderr)
    return 2
  return 0


def run(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command == "methods":
    print(methods_table())
    return 0
  if command in ("benchmark", "evaluate"):
    return run_evaluation_command(command, rest)
  if command != "merge":
    print(f"knots-jax: unknown command `{command}`; commands: benchmark, evaluate, merge, "
          "methods",
          file=sys.stderr)
    return 2
  if "-h" in rest or "--help" in rest:
    print(merge_help())
    return 0
  try:
    summary = pipeline.run_merge(load_config(rest))
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"knots-jax: error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(run())
