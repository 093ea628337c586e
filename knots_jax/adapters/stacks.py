"""Group the modules of an `AdapterSet` into stacks of equal shapes.

Every module of a stack has the same (out, in) and the same padded rank, so a
stack is two dense arrays, `b` [L, n, out, r] and `a` [L, n, r, in], over which
the alignment is vmapped. The PEFT scale is folded into `b`; adapters of lower
rank are zero-padded, which leaves `b @ a` unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from knots_jax.adapters.peft_files import AdapterSet


@dataclasses.dataclass(frozen=True)
class FactorStack:
  """LoRA factors of L same-shaped modules across n adapters."""
  modules: tuple[str, ...]
  b: np.ndarray        # [L, n, out, r], scale folded in
  a: np.ndarray        # [L, n, r, in]
  ranks: np.ndarray    # [L, n] true ranks before padding

  @property
  def name(self) -> str:
    """A short label such as `q_proj 4096x4096 r16 (32 modules)`."""
    kind = self.modules[0].rsplit(".", 1)[-1]
    _, _, out, r = self.b.shape
    return f"{kind} {out}x{self.a.shape[-1]} r{r} ({len(self.modules)} modules)"

  @property
  def num_adapters(self) -> int:
    return self.b.shape[1]

  def deltas(self) -> np.ndarray:
    """Dense task updates [L, n, out, in] in float64 (for references)."""
    return np.matmul(self.b.astype(np.float64), self.a.astype(np.float64))


def natural_key(name: str) -> tuple:
  """Sorts `layers.2` before `layers.10`."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def stack_adapters(adapters: AdapterSet, dtype=np.float32) -> list[FactorStack]:
  """Stacks modules by (module kind, out, in, padded rank), in a fixed order."""
  groups: dict[tuple, list[str]] = collections.defaultdict(list)
  for module in adapters.module_names:
    factors = adapters.factors(module)
    out, inp = factors[0].shape
    r = max(f.rank for f in factors)
    groups[(module.rsplit(".", 1)[-1], out, inp, r)].append(module)

  stacks = []
  n = len(adapters)
  for (_, out, inp, r), modules in sorted(groups.items()):
    modules = sorted(modules, key=natural_key)
    b = np.zeros((len(modules), n, out, r), dtype)
    a = np.zeros((len(modules), n, r, inp), dtype)
    ranks = np.zeros((len(modules), n), np.int32)
    for l, module in enumerate(modules):
      for i, f in enumerate(adapters.factors(module)):
        b[l, i, :, :f.rank] = f.scale * f.b.astype(dtype)   # the scale folded in `dtype`
        a[l, i, :f.rank, :] = f.a
        ranks[l, i] = f.rank
    stacks.append(FactorStack(tuple(modules), b, a, ranks))
  return stacks
