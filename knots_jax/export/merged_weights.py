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
from typing import Iterable

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from knots_jax.export import full_model
from knots_jax.export.peft_adapter import _METADATA, MERGED_WEIGHTS, _check_result
from knots_jax.io import hf_checkpoint, output_dir
from knots_jax.merging.result import KNOTS_CONFIG, MergeResult


def read_base_weights(base_dir: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Reads only `keys` from a HF safetensors checkpoint (single file or sharded).

  Tensors keep their stored dtype (bf16 as `ml_dtypes.bfloat16`).
  """
  try:
    return hf_checkpoint.read_tensors(base_dir, keys)
  except KeyError as e:
    raise ValueError(f"base model: {e.args[0]}") from None


def _merged_weight(module: str, base: np.ndarray, delta: np.ndarray,
                   fan_in_fan_out: bool) -> np.ndarray:
  """base + delta in the base layout (delta transposed for Conv1D), in the base dtype."""
  if fan_in_fan_out:
    delta = delta.T
  if base.shape != delta.shape:
    layout = " (fan_in_fan_out: the update is transposed to [in, out])" if fan_in_fan_out else ""
    raise ValueError(f"module `{module}`: the base weight has shape {tuple(base.shape)} but the "
                     f"merged update has shape {tuple(delta.shape)}{layout}")
  return np.asarray(full_model.base_plus_update(jnp.asarray(base), jnp.asarray(delta), False))


def save_merged_weights(result: MergeResult, base_dir: str, out_dir: str, *,
                        overwrite: bool = False) -> dict:
  """Writes base weight + merged update of every adapted module to `out_dir/model.safetensors`.

  Keys are the base model's (`<module>.weight`), dtypes the base tensors'.
  Merged `extra` tensors (modules_to_save) are written under their own names,
  cast to the base tensor's dtype where the base has them. Only these tensors
  are written, not the whole model.

  Returns {"path", "tensors" (number written), "dtypes" {dtype: count}}.
  """
  _check_result(result)
  output_dir.check_output_dir(out_dir, overwrite)
  keys = [f"{m}.weight" for m in result.module_names]
  base = read_base_weights(base_dir, keys)
  present = set(hf_checkpoint.tensor_files(base_dir))
  base_extra = read_base_weights(base_dir, [k for k in result.extra if k in present])

  tensors: dict[str, np.ndarray] = {}
  for module, delta in result.deltas():
    key = f"{module}.weight"
    tensors[key] = _merged_weight(module, base.pop(key), delta, result.fan_in_fan_out)
  for key, value in result.extra.items():
    value = np.asarray(value)
    if key in base_extra:
      ref = base_extra[key]
      if ref.shape != value.shape:
        raise ValueError(f"modules_to_save tensor `{key}`: the base has shape {tuple(ref.shape)} "
                         f"but the merged tensor has shape {tuple(value.shape)}")
      value = value.astype(ref.dtype)
    tensors[key] = np.ascontiguousarray(value)

  dtypes: dict[str, int] = {}
  for value in tensors.values():
    dtypes[str(value.dtype)] = dtypes.get(str(value.dtype), 0) + 1
  report = {"path": os.path.abspath(out_dir), "tensors": len(tensors), "dtypes": dtypes}
  with output_dir.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, MERGED_WEIGHTS), metadata=_METADATA)
    output_dir.write_json(os.path.join(tmp, KNOTS_CONFIG), result.record(
        merged_weights={"base_model": os.path.abspath(base_dir), **{
            k: v for k, v in report.items() if k != "path"}}))
  return report
