"""Files → `AdapterSet` → factor stacks.

* `peft_files`: PEFT directories and the reference's `.pt` state dicts read
  into `Adapter` / `AdapterSet` (per module: A, B, PEFT's scale), with every
  refusal (`AdapterError`) and the line-up checks between adapters.
* `stacks`: modules of equal shape grouped into `FactorStack`s `[L, n, ...]`.
"""

from knots_jax.adapters.peft_files import (
                                           Adapter,
                                           AdapterError,
                                           AdapterSet,
                                           LoraFactors,
                                           check_against_base,
                                           load_adapter,
                                           load_adapters,
)
from knots_jax.adapters.stacks import FactorStack, stack_adapters

__all__ = ["Adapter", "AdapterError", "AdapterSet", "FactorStack", "LoraFactors",
           "check_against_base", "load_adapter", "load_adapters", "stack_adapters"]
