"""Adapter sets built in memory from random factors (no files), for numerical tests."""

from __future__ import annotations

import numpy as np

from knots_jax.adapters.peft_files import Adapter, AdapterSet, LoraFactors

# A two-layer model with two module shapes (like q_proj and k_proj of a GQA model).
SHAPES = {**{f"model.layers.{l}.self_attn.q_proj": (12, 10) for l in range(2)},
          **{f"model.layers.{l}.self_attn.k_proj": (6, 10) for l in range(2)}}


def adapter_set(ranks=(2, 3, 4), seed: int = 0, integer: bool = False,
                shapes=None) -> AdapterSet:
  """Adapters with the given ranks; `integer` draws factors from {-1, 0, 1}
  (so that many task-update entries tie in magnitude)."""
  rng = np.random.default_rng(seed)
  shapes = shapes or SHAPES
  adapters = []
  for i, r in enumerate(ranks):
    modules = {}
    for m, (out, inp) in shapes.items():
      if integer:
        a = rng.integers(-1, 2, size=(r, inp)).astype(np.float32)
        b = rng.integers(-1, 2, size=(out, r)).astype(np.float32)
        scale = 1.0
      else:
        a = rng.normal(size=(r, inp)).astype(np.float32)
        b = rng.normal(size=(out, r)).astype(np.float32)
        scale = 0.5 + 0.25 * i
      modules[m] = LoraFactors(a, b, scale)
    adapters.append(Adapter(f"mem://{i}", f"task{i}", {"r": r, "peft_type": "LORA"}, modules, {}))
  return AdapterSet(tuple(adapters))


def dense_deltas(adapters: AdapterSet) -> dict[str, np.ndarray]:
  """{module: [n, out, in]} float64 task updates."""
  return {m: np.stack([f.delta() for f in adapters.factors(m)]) for m in adapters.module_names}
