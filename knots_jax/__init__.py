"""knots_jax: merge LoRA adapters with KnOTS and its baselines, in JAX.

  >>> adapters = knots_jax.load_adapters(["a/", "b/", "c/"])
  >>> merged = knots_jax.merge(adapters, method="knots_ties", scaling=0.6, top_k=20)
  >>> knots_jax.save_peft_adapter(merged, "merged/")
"""

from knots_jax.adapters import Adapter, AdapterError, AdapterSet, LoraFactors
from knots_jax.adapters import load_adapter, load_adapters
from knots_jax.decomposition import AlignedStack
from knots_jax.export import save_merged_weights, save_peft_adapter
from knots_jax.merging import METHODS, Alignment, align, merge
from knots_jax.result import MergedStack, MergeResult

__version__ = "0.1.0"
