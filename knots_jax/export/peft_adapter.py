"""Writing a `MergeResult`: a PEFT LoRA adapter, or merged weights of the base model.

* `save_peft_adapter`: `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained` loads. A factored merge is written exactly
  (every module zero-padded to one rank R, `lora_alpha = R` so PEFT's scale is
  1); with `rank=` it is truncated to its best rank-r approximation
  (`lowrank`), and the relative error of every module is reported.
* `save_merged_weights`: base weight + merged update of every adapted module,
  in the base tensor's dtype and under the base model's key names.

Both write a `knots_config.json` that says how the output was made, and write
atomically (`output_dir.atomic_output_dir`).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import safetensors.numpy

from knots_jax.io import output_dir
from knots_jax.merging.result import MergeResult
from knots_jax.methods import truncated_svd

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "model.safetensors"
KNOTS_CONFIG = "knots_config.json"
PEFT_PREFIX = "base_model.model."
_METADATA = {"format": "pt"}   # what transformers / PEFT write; some loaders expect it

# Config fields reset for the written adapter: its weights are plain LoRA
# factors with scale 1, whatever initialisation or variant trained the inputs.
_RESET_FIELDS = {
    "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    "init_lora_weights": True, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "use_qalora": False, "lora_bias": False,
    "inference_mode": True,
}


# ---------------------------------------------------------------- PEFT adapter


def _adapter_config(template: Mapping[str, object], rank: int, modules: list[str],
                    extra: Mapping[str, np.ndarray]) -> dict:
  """The first input adapter's config with rank R, scale 1 and no per-module patterns."""
  config = dict(template)
  config.setdefault("peft_type", "LORA")
  if not config.get("target_modules"):
    config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in modules})
  config.update(_RESET_FIELDS, r=int(rank), lora_alpha=int(rank))
  if not extra:
    config["modules_to_save"] = None
  elif not config.get("modules_to_save"):
    config["modules_to_save"] = sorted({k.rsplit(".", 1)[0] for k in extra})
  return config


def _truncated_stacks(result: MergeResult, rank: int):
  """(stack, b_r, a_r, rel_err) of every stack, truncated to `rank`."""
  for stack in result.stacks:
    if stack.is_factored:
      yield (stack, *truncated_svd.truncate_factors(stack.b, stack.a, rank))
    else:
      yield (stack, *truncated_svd.truncate_dense(stack.delta, rank))


def _nonzero_components(stack) -> tuple[np.ndarray, np.ndarray]:
  """The stack's factors without the components that are zero in every module
  (padding of smaller ranks, KnOTS components under `tol`): b [L, out, k], a [L, k, in]."""
  b, a = np.asarray(stack.b), np.asarray(stack.a)
  used = np.any(b != 0, axis=(0, 1)) & np.any(a != 0, axis=(0, 2))
  return b[:, :, used], a[:, used, :]


def _exact_stacks(trimmed, rank: int):
  """(stack, b, a, zero errors) of every (stack, b, a) of `trimmed`, zero-padded to `rank`."""
  for stack, b, a in trimmed:
    extra = rank - b.shape[-1]
    b = np.pad(b, ((0, 0), (0, 0), (0, extra)))
    a = np.pad(a, ((0, 0), (0, extra), (0, 0)))
    yield stack, b, a, np.zeros(len(stack.modules))


def _lora_dtype(x: np.ndarray) -> np.dtype:
  """float32 for the written factors, except half-precision inputs that stay as they are."""
  return x.dtype if x.dtype.itemsize < 4 else np.dtype(np.float32)


def _check_result(result: MergeResult) -> None:
  if not result.stacks:
    raise ValueError("the merge result has no modules; nothing to write")
  for stack in result.stacks:
    if stack.is_factored and (stack.b is None or stack.a is None):
      raise ValueError(f"stack {stack.modules[:2]}... has neither factors nor a dense update")


def save_peft_adapter(result: MergeResult, out_dir: str, *, rank: int | None = None,
                      overwrite: bool = False) -> dict:
  """Writes `result` as a PEFT LoRA adapter in `out_dir`.

  Args:
    result: a merge; factored results are written exactly when `rank` is None.
    out_dir: the adapter directory (created atomically).
    rank: truncate every module to its best rank-`rank` approximation. Needed
      for dense results (TIES / DARE without KnOTS).
    overwrite: replace an existing `out_dir`.

  Returns:
    {"path", "rank", "truncated", "rel_errors" {module: float}, "max_rel_error"}.
  """
  _check_result(result)
  output_dir.check_output_dir(out_dir, overwrite)
  if rank is None and not result.is_factored:
    raise ValueError(
        f"the `{result.method}` merge is dense (full-rank updates, no LoRA factors): "
        "pass rank=... to save_peft_adapter for its best rank-r approximation "
        "(--config.rank), or write base + update with save_merged_weights "
        "(--config.base_model)")
  if rank is None:   # exact: every component used by some module of its stack
    trimmed = [(s, *_nonzero_components(s)) for s in result.stacks]
    out_rank = max(1, max(int(b.shape[-1]) for _, b, _ in trimmed))
    stacks = _exact_stacks(trimmed, out_rank)
  else:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
      raise ValueError(f"save_peft_adapter: rank must be a positive integer; got {rank!r}")
    out_rank = int(rank)
    stacks = _truncated_stacks(result, out_rank)

  tensors: dict[str, np.ndarray] = {}
  errors: dict[str, float] = {}
  for stack, b, a, err in stacks:
    b, a, err = np.asarray(b), np.asarray(a), np.asarray(err)
    dtype = _lora_dtype(b)
    for i, module in enumerate(stack.modules):
      tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[i], dtype)
      tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[i], dtype)
      errors[module] = float(err[i])
  # PEFT saves a modules_to_save tensor as base_model.model.<module>.weight (the
  # ".modules_to_save.default" of the wrapper is stripped) and restores it from there.
  for key, value in result.extra.items():
    tensors[PEFT_PREFIX + key] = np.ascontiguousarray(value)

  errors = dict(sorted(errors.items()))
  report = {"path": os.path.abspath(out_dir), "rank": out_rank, "truncated": rank is not None,
            "rel_errors": errors, "max_rel_error": max(errors.values(), default=0.0)}
  config = _adapter_config(result.peft_config, out_rank, result.module_names, result.extra)
  with output_dir.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata=_METADATA)
    output_dir.write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
    output_dir.write_json(os.path.join(tmp, KNOTS_CONFIG), _knots_config(
        result, export={k: v for k, v in report.items() if k != "path"}))
  return report


def _knots_config(result: MergeResult, **more: object) -> dict:
  """How an output was made: the merge's method, settings and statistics."""
  return {"method": result.method, "settings": dict(result.settings),
          "stats": dict(result.stats), "modules": len(result.module_names),
          "extra": sorted(result.extra), **more}


# ------------------------------------------------------------- merged weights


