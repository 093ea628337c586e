"""What a merge job reads and writes: `JobConfig`, and the flat config of `knots-jax merge`.

A job is a `MergeConfig` (what to merge, `methods.options`) plus a `JobConfig`
(the adapters, the output and what goes in it, the base model, the alignment
cache, the mesh). Config files (`configs/*.py`) and `--config.<option>=value`
flags set both in one flat ConfigDict (`merge_config()`), split again by
`job_from_configdict`; `--help` and the summary are generated from the two
declarations. Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

from knots_jax import checks
from knots_jax.methods.options import MergeConfig, option, validate_fields

FULL_MODEL_FORMATS = ("safetensors", "orbax", "both")


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything of a merge job but the merge itself, validated when made."""
  adapters: tuple[str, ...] = option(
      (), "Comma-separated adapters: PEFT directories (adapter_config.json + "
      "adapter_model.safetensors or .bin), or .pt / .safetensors state dicts with lora_A/lora_B "
      "keys (the reference implementation's files).", checks.strings)
  names: tuple[str, ...] = option(
      (), "Optional comma-separated names for the adapters (default: directory names).",
      checks.strings)
  check_base_model: bool = option(
      True, "Refuse adapters whose base_model_name_or_path differ.", checks.boolean)
  output: str = option(
      "", "Output directory, written atomically: adapter/ (a PEFT adapter), merged_weights/ or "
      "merged_model/ (with base_model), knots_config.json. Empty: nothing is written (say "
      "dry_run=true to only check the inputs).", checks.text)
  overwrite: bool = option(
      False, "Replace an existing output directory that knots_jax wrote (only once the new one "
      "is complete).", checks.boolean)
  rank: int = option(
      0, "Truncate the written adapter to this rank (SVD of the merged update, from the "
      "factors); 0 writes it exactly. Dense merges (ties, dare...) need it.",
      checks.non_negative_int)
  base_model: str = option(
      "", "Hugging Face model directory (safetensors). If set, the adapters are checked against "
      "its shapes and merged dense weights are written.", checks.text)
  full_model: bool = option(
      False, "With base_model: write the whole merged model (every tensor, HF safetensors "
      "shards + index + config.json, loadable with from_pretrained) to merged_model/ instead of "
      "only the adapted modules' weights to merged_weights/.", checks.boolean)
  full_model_format: str = option(
      "safetensors", "With full_model: `safetensors` (HF shards in merged_model/), `orbax` (an "
      "Orbax CheckpointManager directory merged_model_orbax/: step 0, item `weights` = {HF "
      "tensor name: array}, config.json beside it; restore with "
      "knots_jax.export.orbax_model.restore_merged_model(dir, mesh=...)), or `both`. See "
      "docs/backbone.md.", checks.one_of(FULL_MODEL_FORMATS))
  alignment_cache: str = option(
      "", "KnOTS methods only: a directory holding the saved decomposition "
      "(knots_jax.alignment.cache, Orbax). If it exists and was made from the same adapter "
      "contents and path/concat/tol/dtype, the alignment is restored from it; otherwise it is "
      "computed and saved there. Empty: no cache.", checks.text)
  mesh: str = option(
      "none", "`none` (one device) or `auto`: shard the merge over every device "
      "(sharding.initialize() for multi-host, then sharding.make_mesh()); see docs/sharding.md.",
      checks.one_of(("none", "auto")))
  progress: bool = option(
      True, "Show progress bars (alignment; writing the full model). On several processes every "
      "host shows its own; the full-model bars are labelled `host i/n`.", checks.boolean)
  compile_cache: str = option(
      "", "Directory of JAX's persistent compilation cache, so that the next run on this "
      "machine does not compile again; empty: $KNOTS_JAX_COMPILE_CACHE, else "
      "~/.cache/knots_jax/jax; `off`: no cache.", checks.text)
  dry_run: bool = option(
      False, "Print the resolved configuration, check the adapters (and the base model) and stop "
      "before merging: nothing is computed or written.", checks.boolean)

  def __post_init__(self):
    validate_fields(self)
    if not self.adapters:
      raise ValueError("no adapters given: set --config.adapters=dir1,dir2,...")
    if self.names and len(self.names) != len(self.adapters):
      raise ValueError(f"names: {len(self.names)} name(s) for {len(self.adapters)} adapter(s)")
    if self.full_model and not self.base_model:
      raise ValueError("full_model needs the base model: set --config.base_model=path/to/hf_model")
    if self.overwrite and not self.output:
      raise ValueError("overwrite=true without output: set --config.output=DIR")


MERGE_FIELDS = tuple(f.name for f in dataclasses.fields(MergeConfig))
JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobConfig))


def _flat_default(field: dataclasses.Field) -> Any:
  """The ConfigDict default of a field: lists as comma-separated strings (flags take them so)."""
  return ",".join(field.default) if isinstance(field.default, tuple) else field.default


def merge_config():
  """A ConfigDict with every option of a merge job at its default (what configs/*.py start from)."""
  import ml_collections
  fields = dataclasses.fields(MergeConfig) + dataclasses.fields(JobConfig)
  return ml_collections.ConfigDict({f.name: _flat_default(f) for f in fields})


def job_from_configdict(config: Any, source: str = "config") -> tuple[JobConfig, MergeConfig]:
  """Splits a flat ConfigDict (or dict) into the validated `JobConfig` and `MergeConfig`.

  Raises ValueError naming `source` and the option: unknown names (with the
  valid ones), values of the wrong type or out of range, options of another method.
  """
  values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  unknown = sorted(k for k in values if k not in MERGE_FIELDS + JOB_FIELDS)
  if unknown:
    raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}; `knots-jax merge "
                     "--help` lists the options")
  try:
    job = JobConfig(**{k: values[k] for k in JOB_FIELDS if k in values})
    merge = MergeConfig(**{k: values[k] for k in MERGE_FIELDS if k in values})
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  return job, merge


def help_text() -> str:
  """`knots-jax merge --help`: every option with its default and help, from the declarations."""
  lines = ["usage: knots-jax merge --config CONFIG.py[:key=value,...] [--config.<option>=<value> ...]",
           "", "Merges LoRA adapters and writes the result. Options (default in brackets):"]
  for title, record in (("What to merge", MergeConfig), ("What to read and write", JobConfig)):
    lines += ["", f"{title}:"]
    for f in dataclasses.fields(record):
      lines.append(f"  --config.{f.name}  [{_flat_default(f)!r}]")
      lines.extend(textwrap.wrap(f.metadata["help"], 76, initial_indent="      ",
                                 subsequent_indent="      "))
  lines += ["", "Example:", "  knots-jax merge --config configs/merge.py --config.adapters=a/,b/,c/ \\",
            "      --config.method=knots_ties --config.scaling=0.6 --config.top_k=20 "
            "--config.output=merged/"]
  return "\n".join(lines)
