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
import contextlib
import os
import sys
import textwrap
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags
import ml_collections

from knots_jax import adapters as adapters_lib
from knots_jax import backbone
from knots_jax import checkpoint
from knots_jax import config as config_lib
from knots_jax import export
from knots_jax import merging as merge_lib
from knots_jax import outputs
from knots_jax import sharding

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
  width = max(len(name) for name in merge_lib.METHODS)
  return "\n".join(f"{name:<{width}}  {m.reference}" for name, m in merge_lib.METHODS.items())


BENCHMARK_CONFIG = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "offline_benchmark.py"))


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


def _enable_x64_if_needed(config) -> None:
  if config.dtype == "float64":
    import jax
    jax.config.update("jax_enable_x64", True)


def _make_mesh(mode: str):
  """`none` -> None; `auto` -> sharding.initialize() then a mesh over every device."""
  if mode in ("", "none"):
    return None
  if mode != "auto":
    raise ValueError(f"mesh must be `none` or `auto`, got `{mode}`")
  sharding.initialize()
  return sharding.make_mesh()


def _restore_cache(cache: str, paths, names, config, mesh):
  """The cached alignment, after checking it was made from these adapters and settings."""
  from knots_jax import ingredients  # Orbax: imported only when a cache is used
  meta = ingredients.read_meta(cache)
  saved_paths = [a["path"] for a in meta["adapters"]]
  wanted = [os.path.abspath(p) for p in paths]
  if [os.path.abspath(p) for p in saved_paths] != wanted:
    raise ValueError(f"alignment_cache `{cache}` was computed from other adapters "
                     f"({', '.join(saved_paths)}); use another directory or delete it")
  if names and [a["name"] for a in meta["adapters"]] != list(names):
    raise ValueError(f"alignment_cache `{cache}` has adapter names "
                     f"{[a['name'] for a in meta['adapters']]}, not {list(names)}")
  wanted_settings = dict(path=config.path, concat=config.concat, tol=float(config.tol),
                         dtype=config.dtype)
  saved = {k: meta["settings"].get(k) for k in wanted_settings}
  if saved != wanted_settings:
    raise ValueError(f"alignment_cache `{cache}` was computed with {saved}, this run asks for "
                     f"{wanted_settings}; use another directory or delete it")
  return ingredients.restore_alignment(cache, mesh=mesh)


FULL_MODEL_FORMATS = ("safetensors", "orbax", "both")


def _check_full_model(config) -> None:
  """Refuses full-model options that cannot be written, before any work is done."""
  if config.full_model and not config.base_model:
    raise ValueError("full_model needs the base model: set --config.base_model=path/to/hf_model")
  if config.full_model_format not in FULL_MODEL_FORMATS:
    raise ValueError(f"full_model_format must be one of {', '.join(FULL_MODEL_FORMATS)}; got "
                     f"`{config.full_model_format}`")
  if config.full_model and config.full_model_format != "safetensors":
    import jax
    if jax.process_count() > 1:   # every process writes its own output directory here
      raise ValueError("full_model_format=orbax from the command line runs on one process; on "
                       "several, call model_checkpoint.save_merged_model_orbax on every "
                       "process with a shared output path (docs/running.md)")


def _write_full_model(result, config, out_dir: str, mesh,
                      model_writer: backbone.MergedModelWriter | None) -> dict:
  """merged_model/ (safetensors, by `model_writer`) and/or merged_model_orbax/ (Orbax)."""
  written = {}
  if model_writer is not None:
    report = model_writer.finish(result)
    written["safetensors"] = {k: v for k, v in report.items() if k != "path"}
  if config.full_model_format in ("orbax", "both"):
    from knots_jax import model_checkpoint  # Orbax: imported only when asked for
    report = model_checkpoint.save_merged_model_orbax(
        result, config.base_model, os.path.join(out_dir, "merged_model_orbax"), mesh=mesh,
        progress=config.progress)
    written["orbax"] = {k: v for k, v in report.items() if k != "path"}
  return written


def run_merge(config: ml_collections.ConfigDict) -> dict:
  """Loads, merges and writes as `config` says; returns the summary."""
  _enable_x64_if_needed(config)
  paths = config_lib.split_list(config.adapters)
  if not paths:
    raise ValueError("no adapters given: set --config.adapters=dir1,dir2,...")
  names = config_lib.split_list(config.names) or None
  times = {}

  mesh = _make_mesh(config.mesh)
  _check_full_model(config)   # after the mesh: it needs the process count
  knots = merge_lib.get_method(config.method).knots
  cache = config.alignment_cache
  if cache and not knots:
    raise ValueError(f"alignment_cache is for the knots_* methods; `{config.method}` does not "
                     "align (unset --config.alignment_cache)")
  alignment_source = None
  start = time.perf_counter()
  if cache and os.path.exists(cache):
    alignment = _restore_cache(cache, paths, names, config, mesh)
    adapters = alignment.adapters
    alignment_source = "restored"
  else:
    adapters = adapters_lib.load_adapters(paths, names, check_base_model=config.check_base_model)
  if config.base_model:
    adapters_lib.check_against_base(adapters, checkpoint.weight_shapes(config.base_model))
  times["load"] = time.perf_counter() - start

  with contextlib.ExitStack() as stack:
    # The output directory and the full model's files are opened before the merge, so
    # the model writer can copy the base tensors the merge leaves alone beside it
    # (backbone.MergedModelWriter; on the CPU backend the copy starts after the merge).
    tmp = (stack.enter_context(outputs.atomic_output_dir(config.output,
                                                         overwrite=config.overwrite))
           if config.output else None)
    model_writer = None
    if (tmp and config.base_model and config.full_model
        and config.full_model_format in ("safetensors", "both")):
      model_writer = stack.enter_context(backbone.MergedModelWriter(
          config.base_model, os.path.join(tmp, "merged_model"),
          changed=backbone.changed_keys(adapters), mesh=mesh, progress=config.progress))

    if cache and alignment_source is None:
      alignment = merge_lib.align(adapters, path=config.path, concat=config.concat,
                                  tol=config.tol, dtype=config.dtype, progress=config.progress,
                                  mesh=mesh)
      start = time.perf_counter()
      from knots_jax import ingredients
      ingredients.save_alignment(alignment, cache)
      times["save_alignment"] = time.perf_counter() - start
      alignment_source = "computed"
    result = merge_lib.merge(
        alignment if cache else adapters, config.method, scaling=config.scaling,
        top_k=config.top_k, drop_rate=config.drop_rate, seed=config.seed,
        top_k_scope=config.top_k_scope, modules_to_save=config.modules_to_save,
        path=config.path, concat=config.concat, tol=config.tol, dtype=config.dtype,
        progress=config.progress, mesh=mesh, common_fraction=config.common_fraction,
        tsv_keep=config.tsv_keep, output_rank=config.output_rank, eta=config.eta)
    times["align"] = (0.0 if alignment_source == "restored"
                      else result.stats.get("align_seconds", 0.0))
    times["merge"] = result.stats["merge_seconds"]

    summary = {"config": config.to_dict(), "stats": dict(result.stats)}
    if cache:
      summary["alignment_cache"] = {"path": os.path.abspath(cache), "source": alignment_source}
    if mesh is not None:
      summary["mesh"] = {"devices": int(mesh.devices.size)}
    start = time.perf_counter()
    if tmp:
      report = export.save_peft_adapter(result, os.path.join(tmp, "adapter"),
                                        rank=config.rank or None)
      summary["adapter"] = {k: v for k, v in report.items() if k != "path"}
      if config.base_model and config.full_model:
        summary["full_model"] = _write_full_model(result, config, tmp, mesh, model_writer)
      elif config.base_model:
        export.save_merged_weights(result, config.base_model, os.path.join(tmp, "merged_weights"))
      times["write"] = time.perf_counter() - start
      summary["seconds"] = times
      outputs.write_json(os.path.join(tmp, "knots_config.json"), summary)
  summary["seconds"] = times
  return summary


def format_summary(summary: dict) -> str:
  cfg, stats = summary["config"], summary["stats"]
  options = "".join(f" {k}={cfg[k]}" for k, (_, users) in merge_lib.METHOD_OPTIONS.items()
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
      from knots_jax.offline import benchmark
      benchmark.run_benchmark(config)
    elif config.get("setting") == "nli":
      from knots_jax.evaluation import nli
      nli.run_paper_nli(config)
    else:
      from knots_jax.evaluation import paper
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
    summary = run_merge(load_config(rest))
  except (ValueError, KeyError, FileNotFoundError) as e:
    print(f"knots-jax: error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(run())
