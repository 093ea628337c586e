"""Files → `AdapterSet` → factor stacks.

* `peft_files`: PEFT directories and the reference's `.pt` state dicts read
  into `Adapter` / `AdapterSet` (per module: A, B, PEFT's scale), with every
  refusal (`AdapterError`) and the line-up checks between adapters.
* `stacks`: modules of equal shape grouped into `FactorStack`s `[L, n, ...]`.
"""

__all__ = ["peft_files", "stacks"]
