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

import contextlib
import os
import time

import ml_collections

from knots_jax.adapters import peft_files
from knots_jax.alignment import decompose
from knots_jax.export import full_model as full_model_lib
from knots_jax.export import merged_weights as merged_weights_lib
from knots_jax.export import peft_adapter
from knots_jax.io import config_args, hf_checkpoint, output_dir
from knots_jax.merging import orchestrate
from knots_jax.methods import registry
from knots_jax.parallel import sharding


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
  from knots_jax.alignment import cache as cache_lib  # Orbax: imported only when a cache is used
  meta = cache_lib.read_meta(cache)
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
  return cache_lib.restore_alignment(cache, mesh=mesh)


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
                      model_writer: full_model_lib.MergedModelWriter | None) -> dict:
  """merged_model/ (safetensors, by `model_writer`) and/or merged_model_orbax/ (Orbax)."""
  written = {}
  if model_writer is not None:
    report = model_writer.finish(result)
    written["safetensors"] = {k: v for k, v in report.items() if k != "path"}
  if config.full_model_format in ("orbax", "both"):
    from knots_jax.export import orbax_model  # Orbax: imported only when asked for
    report = orbax_model.save_merged_model_orbax(
        result, config.base_model, os.path.join(out_dir, "merged_model_orbax"), mesh=mesh,
        progress=config.progress)
    written["orbax"] = {k: v for k, v in report.items() if k != "path"}
  return written


def run_merge(config: ml_collections.ConfigDict) -> dict:
  """Loads, merges and writes as `config` says; returns the summary."""
  _enable_x64_if_needed(config)
  paths = config_args.split_list(config.adapters)
  if not paths:
    raise ValueError("no adapters given: set --config.adapters=dir1,dir2,...")
  names = config_args.split_list(config.names) or None
  times = {}

  mesh = _make_mesh(config.mesh)
  _check_full_model(config)   # after the mesh: it needs the process count
  knots = registry.get_method(config.method).knots
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
    adapters = peft_files.load_adapters(paths, names, check_base_model=config.check_base_model)
  if config.base_model:
    peft_files.check_against_base(adapters, hf_checkpoint.weight_shapes(config.base_model))
  times["load"] = time.perf_counter() - start

  with contextlib.ExitStack() as stack:
    # The output directory and the full model's files are opened before the merge, so
    # the model writer can copy the base tensors the merge leaves alone beside it
    # (backbone.MergedModelWriter; on the CPU backend the copy starts after the merge).
    tmp = (stack.enter_context(output_dir.atomic_output_dir(config.output,
                                                         overwrite=config.overwrite))
           if config.output else None)
    model_writer = None
    if (tmp and config.base_model and config.full_model
        and config.full_model_format in ("safetensors", "both")):
      model_writer = stack.enter_context(full_model_lib.MergedModelWriter(
          config.base_model, os.path.join(tmp, "merged_model"),
          changed=full_model_lib.changed_keys(adapters), mesh=mesh, progress=config.progress))

    if cache and alignment_source is None:
      alignment = decompose.align(adapters, path=config.path, concat=config.concat,
                                  tol=config.tol, dtype=config.dtype, progress=config.progress,
                                  mesh=mesh)
      start = time.perf_counter()
      from knots_jax.alignment import cache as cache_lib
      cache_lib.save_alignment(alignment, cache)
      times["save_alignment"] = time.perf_counter() - start
      alignment_source = "computed"
    result = orchestrate.merge(
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
      report = peft_adapter.save_peft_adapter(result, os.path.join(tmp, "adapter"),
                                        rank=config.rank or None)
      summary["adapter"] = {k: v for k, v in report.items() if k != "path"}
      if config.base_model and config.full_model:
        summary["full_model"] = _write_full_model(result, config, tmp, mesh, model_writer)
      elif config.base_model:
        merged_weights_lib.save_merged_weights(result, config.base_model, os.path.join(tmp, "merged_weights"))
      times["write"] = time.perf_counter() - start
      summary["seconds"] = times
      output_dir.write_json(os.path.join(tmp, "knots_config.json"), summary)
  summary["seconds"] = times
  return summary
