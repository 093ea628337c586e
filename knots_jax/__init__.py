"""knots_jax: merge LoRA adapters with KnOTS and its baselines, in JAX."""

from knots_jax.adapters import Adapter, AdapterSet, LoraFactors
from knots_jax.result import MergedStack, MergeResult

__version__ = "0.1.0"
