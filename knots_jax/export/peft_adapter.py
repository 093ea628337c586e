"""Writing a `MergeResult`: a PEFT LoRA adapter, or merged weights of the base model.

* `save_peft_adapter`: `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained` loads. A factored merge is written exactly
  (every module zero-padded to one rank R, `lora_alpha = R` so PEFT's scale is
  1); with `rank=` it is truncated to its best rank-r approximation
  (`lowrank`), and the relative error of every module is reported. Its
  `target_modules` names exactly the modules it has tensors for
  (`written_target_modules`), so PEFT adapts those and no others.
* `save_merged_weights`: base weight + merged update of every adapted module,
  in the base tensor's dtype and under the base model's key names.

Both write a `knots_config.json` that says how the output was made, and write
atomically (`output_dir.atomic_output_dir`).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np
import safetensors.numpy

from knots_jax.io import output_dir
from knots_jax.merging.result import KNOTS_CONFIG, MergeResult
from knots_jax.merging import kernels

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model."
_METADATA = {"format": "pt"}   # what transformers / PEFT write; some loaders expect it

# Config fields reset for the written adapter: its weights are plain LoRA
# factors with scale 1, whatever initialisation or variant trained the inputs.
_RESET_FIELDS = {
    "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    "init_lora_weights": True, "loftq_config": {}, "eva_config": None,
    "corda_config": None, "use_qalora": False, "lora_bias": False,
    "inference_mode": True,
    # target_modules below names the written modules exactly; PEFT refuses these
    # fields beside a regex target_modules, and with a name list they are not needed.
    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
}


# ---------------------------------------------------------------- PEFT adapter


def _is_index(part: str) -> bool:
  return part.isascii() and part.isdigit()


def _complete_layer_grid(modules: Sequence[str]) -> bool:
  """Whether the modules hold every module kind in the same layers, numbered from 0.

  Paths are grouped by their form with numbers as `#` (`model.layers.#.mlp.up_proj`);
  every numbered form must occur with the same indices, and the first index must run
  0, 1, ..., k. A merge of some layers only (or of some modules only) fails this.
  """
  indices: dict[tuple[str, ...], set[tuple[int, ...]]] = {}
  for module in modules:
    parts = module.split(".")
    if any(_is_index(p) for p in parts):
      form = tuple("#" if _is_index(p) else p for p in parts)
      indices.setdefault(form, set()).add(tuple(int(p) for p in parts if _is_index(p)))
  if not indices:
    return True
  sets = list(indices.values())
  first = sorted({t[0] for t in sets[0]})
  return all(s == sets[0] for s in sets) and first == list(range(len(first)))


def _path_regex(paths: list[list[str]]) -> str:
  """A regex that re.fullmatch-es exactly the dotted paths (lists of parts, non-empty).

  A trie of the parts in which siblings with equal sub-regexes share one group, e.g.
  `model\\.layers\\.(?:0|1)\\.self_attn\\.(?:k_proj|q_proj)`.
  """
  children: dict[str, list[list[str]]] = {}
  for path in paths:
    children.setdefault(path[0], []).append(path[1:])
  by_tail: dict[str, list[str]] = {}
  for part, rests in children.items():
    longer = [r for r in rests if r]
    tail = rf"\.{_path_regex(longer)}" if longer else ""
    if longer and len(longer) < len(rests):  # the path also ends here
      tail = f"(?:{tail})?"
    by_tail.setdefault(tail, []).append(part)
  natural = lambda part: (0, int(part), "") if _is_index(part) else (1, 0, part)
  options = sorted(_group([re.escape(p) for p in sorted(parts, key=natural)]) + tail
                   for tail, parts in by_tail.items())
  return _group(options)


def _group(options: list[str]) -> str:
  return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def written_target_modules(modules: Sequence[str], template: Mapping[str, object]) -> list[str] | str:
  """The target_modules of a written adapter: exactly `modules` under PEFT's matching.

  The modules' last names (`["k_proj", "q_proj"]`) when they cannot hit other modules
  of the base model: the first input adapter (`template`) chose its modules by bare
  names alone (a list of names without dots; no layers_to_transform, layers_pattern
  or exclude_modules), so PEFT adapted every module of those names, and `modules`
  covers all of them in every layer (`_complete_layer_grid`). Otherwise (some layers,
  a regex, "all-linear", dotted names, exclusions, a subset of the input's modules) a
  regex that re.fullmatch-es exactly `modules` (PEFT's rule for a string).
  """
  names = sorted({m.rsplit(".", 1)[-1] for m in modules})
  targets = template.get("target_modules")
  by_names = (isinstance(targets, (list, tuple)) and all("." not in t for t in targets)
              and set(names) <= set(targets)
              and not template.get("layers_to_transform") and not template.get("layers_pattern")
              and not template.get("exclude_modules") and _complete_layer_grid(modules))
  if by_names:
    return names
  return _path_regex([m.split(".") for m in sorted(set(modules))])


def _adapter_config(template: Mapping[str, object], rank: int, modules: list[str],
                    extra: Mapping[str, np.ndarray]) -> dict:
  """The first input adapter's config with rank R, scale 1, no per-module patterns and a
  target_modules that names exactly the written modules."""
  config = dict(template)
  config.setdefault("peft_type", "LORA")
  config["target_modules"] = written_target_modules(modules, template)
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
      yield (stack, *kernels.truncate_factors(stack.b, stack.a, rank))
    else:
      yield (stack, *kernels.truncate_dense(stack.delta, rank))


def _nonzero_components(stack) -> tuple[np.ndarray, np.ndarray]:
  """The stack's factors without the components that are zero in every module
  (padding of smaller ranks, KnOTS components under `tol`): b [L, out, k], a [L, k, in]."""
  used = stack.used_components()
  return np.asarray(stack.b)[:, :, used], np.asarray(stack.a)[:, used, :]


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
    output_dir.write_json(os.path.join(tmp, KNOTS_CONFIG), result.record(
        export={k: v for k, v in report.items() if k != "path"}))
  return report


# ------------------------------------------------------------- merged weights
