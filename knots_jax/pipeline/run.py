"""A merge job from files to files: load, check, align (or restore the cache), merge, write.

`run(job, config)` is what `knots-jax merge` calls; it returns the summary the
command prints and writes as `knots_config.json` beside the outputs:

  >>> job, config = job_from_configdict(get_config())      # configs/merge.py
  >>> summary = run(job, config)
"""

from __future__ import annotations

import contextlib
import os
import time

import jax

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.alignment import decompose
from knots_jax.export import full_model as full_model_lib
from knots_jax.export import merged_weights, peft_adapter
from knots_jax.io import output_dir
from knots_jax.merging import orchestrate
from knots_jax.merging.result import KNOTS_CONFIG, MergeResult
from knots_jax.methods.options import MergeConfig
from knots_jax.parallel import programs, sharding
from knots_jax.pipeline import inputs
from knots_jax.pipeline.config import JobConfig


def _make_mesh(mode: str):
  """`none` -> None; `auto` -> sharding.initialize() then a mesh over every device."""
  if mode == "none":
    return None
  sharding.initialize()
  return sharding.make_mesh()


def _check_processes(job: JobConfig) -> None:
  if job.full_model and job.full_model_format != "safetensors" and jax.process_count() > 1:
    raise ValueError("full_model_format=orbax from the command line runs on one process; on "
                     "several, call orbax_model.save_merged_model_orbax on every process with a "
                     "shared output path (docs/running.md)")


def _cached_alignment(job: JobConfig, config: MergeConfig, adapters: AdapterSet, mesh,
                      times: dict) -> tuple[decompose.Alignment, str]:
  """The alignment from `job.alignment_cache` when it was made from these adapters' contents
  and settings; computed and saved there when it does not exist; refused otherwise."""
  from knots_jax.alignment import cache as cache_lib  # Orbax: imported only when a cache is used
  path = job.alignment_cache
  settings = dict(path=config.path, concat=config.concat, tol=config.tol, dtype=config.dtype)
  if os.path.exists(path):
    stale = cache_lib.stale_reason(path, adapters, settings)
    if stale is not None:
      raise ValueError(f"alignment_cache `{path}` cannot be used: {stale}; use another "
                       "directory or delete it")
    start = time.perf_counter()
    alignment = cache_lib.restore_alignment(path, mesh=mesh)
    times["restore_alignment"] = time.perf_counter() - start
    return alignment, "restored"
  output_dir.check_writable(path)           # fail before aligning, not after
  alignment = decompose.align(adapters, **settings, progress=job.progress, mesh=mesh)
  start = time.perf_counter()
  cache_lib.save_alignment(alignment, path)
  times["save_alignment"] = time.perf_counter() - start
  return alignment, "computed"


def _write_full_model(result: MergeResult, job: JobConfig, out_dir: str, mesh,
                      model_writer: full_model_lib.MergedModelWriter | None) -> dict:
  """merged_model/ (safetensors, by `model_writer`) and/or merged_model_orbax/ (Orbax)."""
  written = {}
  if model_writer is not None:
    report = model_writer.finish(result)
    written["safetensors"] = {k: v for k, v in report.items() if k != "path"}
  if job.full_model_format in ("orbax", "both"):
    from knots_jax.export import orbax_model  # Orbax: imported only when asked for
    report = orbax_model.save_merged_model_orbax(
        result, job.base_model, os.path.join(out_dir, "merged_model_orbax"), mesh=mesh,
        progress=job.progress)
    written["orbax"] = {k: v for k, v in report.items() if k != "path"}
  return written


def _write_outputs(result: MergeResult, job: JobConfig, tmp: str, mesh, model_writer,
                   summary: dict) -> None:
  """The adapter, the merged weights or full model, and knots_config.json, into `tmp`."""
  report = peft_adapter.save_peft_adapter(result, os.path.join(tmp, "adapter"),
                                          rank=job.rank or None)
  summary["adapter"] = {k: v for k, v in report.items() if k != "path"}
  if job.base_model and job.full_model:
    summary["full_model"] = _write_full_model(result, job, tmp, mesh, model_writer)
  elif job.base_model:
    merged_weights.save_merged_weights(result, job.base_model, os.path.join(tmp, "merged_weights"))


def _model_writer(job: JobConfig, tmp: str | None, adapters: AdapterSet, mesh, stack):
  """The full model's writer, opened before the merge so that it can copy the base tensors the
  merge leaves alone beside it (`MergedModelWriter`; on the CPU backend after the merge)."""
  if not (tmp and job.base_model and job.full_model
          and job.full_model_format in ("safetensors", "both")):
    return None
  return stack.enter_context(full_model_lib.MergedModelWriter(
      job.base_model, os.path.join(tmp, "merged_model"),
      changed=full_model_lib.changed_keys(adapters), mesh=mesh, progress=job.progress))


def run(job: JobConfig, config: MergeConfig) -> dict:
  """Loads, merges and writes as `job` and `config` say; returns the summary.

  With `job.dry_run`, only loads and checks the inputs and returns the
  resolved configuration. Nothing is written unless `job.output` is set; the
  output directory appears only once it is complete.
  """
  if config.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  if job.dry_run:
    return inputs.dry_run(job, config)
  programs.enable_compile_cache(job.compile_cache or None)
  times: dict = {}
  inputs.check_job(job, config)
  mesh = _make_mesh(job.mesh)
  _check_processes(job)   # after the mesh: it needs the process count
  start = time.perf_counter()
  adapters = inputs.load_checked(job)
  times["load"] = time.perf_counter() - start
  summary: dict = {"config": inputs.resolved(job, config)}
  with contextlib.ExitStack() as stack:
    tmp = (stack.enter_context(output_dir.atomic_output_dir(job.output, overwrite=job.overwrite))
           if job.output else None)
    model_writer = _model_writer(job, tmp, adapters, mesh, stack)
    source, cache_source = adapters, None
    if job.alignment_cache:
      source, cache_source = _cached_alignment(job, config, adapters, mesh, times)
      summary["alignment_cache"] = {"path": os.path.abspath(job.alignment_cache),
                                    "source": cache_source}
    result = orchestrate.merge(source, config=config, progress=job.progress, mesh=mesh)
    times["align"] = 0.0 if cache_source == "restored" else result.stats.get("align_seconds", 0.0)
    times["merge"] = result.stats["merge_seconds"]
    summary["stats"] = dict(result.stats)
    if mesh is not None:
      summary["mesh"] = {"devices": int(mesh.devices.size)}
    if tmp:
      start = time.perf_counter()
      _write_outputs(result, job, tmp, mesh, model_writer, summary)
      times["write"] = time.perf_counter() - start
      summary["seconds"] = times
      output_dir.write_json(os.path.join(tmp, KNOTS_CONFIG), summary)
  summary["seconds"] = times
  return summary
