"""knots_jax: merge LoRA adapters with KnOTS and its baselines, in JAX.

  >>> adapters = knots_jax.load_adapters(["a/", "b/", "c/"])
  >>> merged = knots_jax.merge(adapters, method="knots_ties", scaling=0.6, top_k=20)
  >>> knots_jax.save_peft_adapter(merged, "merged/")

The subpackages follow the data flow (docs/design.md): `io` and `parallel` at
the bottom, then `adapters` → `methods` → `alignment` → `merging` → `export`;
`models`, `evaluation` and `experiments` beside them; `pipeline` and `cli` on
top. The names below are imported on first use, so that the command line can
answer `--help` without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Adapter": "knots_jax.adapters.peft_files",
    "AdapterError": "knots_jax.adapters.peft_files",
    "AdapterSet": "knots_jax.adapters.peft_files",
    "LoraFactors": "knots_jax.adapters.peft_files",
    "load_adapter": "knots_jax.adapters.peft_files",
    "load_adapters": "knots_jax.adapters.peft_files",
    "METHODS": "knots_jax.methods.registry",
    "MergeConfig": "knots_jax.methods.options",
    "PRESETS": "knots_jax.methods.presets",
    "get_preset": "knots_jax.methods.presets",
    "AlignedStack": "knots_jax.alignment.knots_svd",
    "Alignment": "knots_jax.alignment.decompose",
    "align": "knots_jax.alignment.decompose",
    "MergeResult": "knots_jax.merging.result",
    "MergedStack": "knots_jax.merging.result",
    "merge": "knots_jax.merging.orchestrate",
    "save_peft_adapter": "knots_jax.export.peft_adapter",
    "save_merged_weights": "knots_jax.export.merged_weights",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'knots_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
