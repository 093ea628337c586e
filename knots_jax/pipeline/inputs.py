"""A job's inputs, loaded and checked without JAX: what a dry run does, and the first step of a run."""

from __future__ import annotations

import dataclasses

from knots_jax.adapters import peft_files
from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.io import hf_checkpoint, output_dir
from knots_jax.methods.options import MergeConfig
from knots_jax.pipeline.config import JobConfig


def check_job(job: JobConfig, config: MergeConfig) -> None:
  """Refuses combinations that cannot run, before anything is read or computed."""
  if job.alignment_cache and not config.spec.knots:
    raise ValueError(f"alignment_cache is for the knots_* methods; `{config.method}` does not "
                     "align (unset --config.alignment_cache)")
  if config.weights and len(config.weights) != len(job.adapters):
    raise ValueError(f"weights: {len(config.weights)} weight(s) for {len(job.adapters)} "
                     f"adapter(s) ({', '.join(job.adapters)}); give one per adapter, in order")
  if job.output:
    output_dir.check_output_dir(job.output, overwrite=job.overwrite)
    output_dir.check_writable(job.output)   # a read-only parent fails now, not after the merge


def load_checked(job: JobConfig) -> AdapterSet:
  """The adapters, lined up with each other and (if given) with the base model."""
  adapters = peft_files.load_adapters(list(job.adapters), list(job.names) or None,
                                      check_base_model=job.check_base_model)
  if job.base_model:
    peft_files.check_against_base(adapters, hf_checkpoint.weight_shapes(job.base_model))
  return adapters


def resolved(job: JobConfig, config: MergeConfig) -> dict:
  """The configuration a job runs with (flat, as the flags name it): the job's options and
  the options its method reads."""
  job_options = {k: ",".join(v) if isinstance(v, tuple) else v
                 for k, v in dataclasses.asdict(job).items()}
  merge_options = {k: list(v) if isinstance(v, tuple) else v    # as JSON reads them back
                   for k, v in config.applicable().items()}
  return {**job_options, **merge_options}


def dry_run(job: JobConfig, config: MergeConfig) -> dict:
  """Checks the job and its inputs and returns the resolved configuration; computes nothing."""
  check_job(job, config)
  adapters = load_checked(job)
  return {"config": resolved(job, config),
          "adapters": {ad.name: ad.path for ad in adapters.adapters},
          "modules": len(adapters.module_names)}
