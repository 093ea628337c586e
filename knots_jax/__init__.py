"""knots_jax: merge LoRA adapters with KnOTS and its baselines, in JAX.

  >>> adapters = knots_jax.load_adapters(["a/", "b/", "c/"])
  >>> merged = knots_jax.merge(adapters, method="knots_ties", scaling=0.6, top_k=20)
  >>> knots_jax.save_peft_adapter(merged, "merged/")

The subpackages follow the data flow (docs/design.md): `io` and `parallel` at
the bottom, then `adapters` → `methods` / `alignment` → `merging` → `export`;
`models`, `evaluation` and `experiments` beside them; `pipeline` and `cli` on top.
"""

from knots_jax.adapters import (
           Adapter,
           AdapterError,
           AdapterSet,
           LoraFactors,
           load_adapter,
           load_adapters,
)
from knots_jax.alignment import AlignedStack, Alignment, align
from knots_jax.export import save_merged_weights, save_peft_adapter
from knots_jax.merging import MergedStack, MergeResult, merge
from knots_jax.methods import METHODS

__version__ = "0.1.0"

__all__ = ["METHODS", "Adapter", "AdapterError", "AdapterSet", "AlignedStack", "Alignment",
           "LoraFactors", "MergeResult", "MergedStack", "align", "load_adapter", "load_adapters",
           "merge", "save_merged_weights", "save_peft_adapter"]
