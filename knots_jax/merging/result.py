"""The outcome of a merge: the merged update of every adapted module.

A merge is either factored (KnOTS, task arithmetic, averaging: the update of a
module is exactly `b @ a` with `b` [out, k] and `a` [k, in], a LoRA of rank k)
or dense (TIES / DARE on the dense task updates: `delta` [out, in]). Modules of
equal shapes are kept stacked, as they were computed.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax
import numpy as np

from knots_jax.merging import kernels
from knots_jax.methods.options import MergeConfig

KNOTS_CONFIG = "knots_config.json"   # written beside every output: how it was made


@dataclasses.dataclass(frozen=True)
class MergedStack:
  """Merged updates of L modules of the same shape."""
  modules: tuple[str, ...]
  b: jax.Array | None = None       # [L, out, k]
  a: jax.Array | None = None       # [L, k, in]
  delta: jax.Array | None = None   # [L, out, in]

  @property
  def is_factored(self) -> bool:
    return self.delta is None

  def used_components(self) -> np.ndarray:
    """[k] booleans of a factored stack: the components that are non-zero in some module
    (the padding of smaller ranks and KnOTS components under `tol` are not)."""
    return np.asarray(kernels.factored_summary(self.b, self.a)[1])


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """Merged update of every module, plus what is needed to write it back."""
  stacks: tuple[MergedStack, ...]
  peft_config: Mapping[str, object]            # first adapter's config: template for export
  method: str
  settings: Mapping[str, object]               # the resolved hyper-parameters
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  stats: Mapping[str, object] = dataclasses.field(default_factory=dict)
  config: MergeConfig | None = None            # how it was merged (None: not by `merge`)

  def record(self, **more: object) -> dict:
    """How an output of this result was made (its `knots_config.json`): the method, its
    settings and statistics, plus `more` (what the writer wrote). The one builder of it."""
    return {"method": self.method, "settings": dict(self.settings),
            "stats": dict(self.stats), "modules": len(self.module_names),
            "extra": sorted(self.extra), **more}

  @property
  def is_factored(self) -> bool:
    return all(s.is_factored for s in self.stacks)

  @property
  def fan_in_fan_out(self) -> bool:
    return bool(self.peft_config.get("fan_in_fan_out", False))

  @property
  def module_names(self) -> list[str]:
    return sorted(m for s in self.stacks for m in s.modules)

  def factors(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields (module, b [out, k], a [k, in]) on the host; factored results only."""
    if not self.is_factored:
      raise ValueError(
          f"the `{self.method}` merge is dense (no LoRA factors); write it with "
          "save_merged_weights, or pass rank=... to save_peft_adapter for a "
          "truncated LoRA.")
    for stack in self.stacks:
      b, a = np.asarray(stack.b), np.asarray(stack.a)
      for i, module in enumerate(stack.modules):
        yield module, b[i], a[i]

  def deltas(self) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (module, dense update [out, in]) on the host, in float32."""
    for stack in self.stacks:
      if stack.is_factored:
        dense = np.asarray(jax.numpy.matmul(stack.b, stack.a))
      else:
        dense = np.asarray(stack.delta)
      for i, module in enumerate(stack.modules):
        yield module, dense[i]

  def delta(self, module: str) -> np.ndarray:
    """The dense merged update [out, in] of one module."""
    for stack in self.stacks:
      if module in stack.modules:
        i = stack.modules.index(module)
        if stack.is_factored:
          return np.asarray(stack.b[i]) @ np.asarray(stack.a[i])
        return np.asarray(stack.delta[i])
    raise KeyError(f"module `{module}` is not in this merge; modules: {self.module_names[:8]}...")
