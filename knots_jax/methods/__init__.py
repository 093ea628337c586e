"""The merging methods: their table, their options, and their math as pure functions.

* `registry`: `METHODS`, one row per method with its paper and space (pure data).
* `options`: `MergeConfig`, every merge option declared and validated once.
* `entrywise`: task arithmetic, averaging, DARE, magnitude masks, sign
  election, disjoint mean (TIES) of one module's values.
* `svd_family`: DM / MM, Iso-C, Iso-CTS, TSV-M, SFTM of one module, from LoRA
  factors or dense updates.
* `truncated_svd`: SVD_r of one update given by its factors, or dense.

Nothing here is compiled: `knots_jax.merging.kernels` jits the math over stacks.
"""

__all__ = ["entrywise", "options", "registry", "svd_family", "truncated_svd"]
