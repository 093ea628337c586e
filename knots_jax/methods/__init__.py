"""The merging methods as pure functions of `[n, ...]` arrays, and their table.

* `entrywise`: task arithmetic, averaging, DARE, magnitude masks, sign
  election, disjoint mean (TIES) of one module's values.
* `svd_family`: DM / MM and SVD_r, Iso-C, Iso-CTS, TSV-M, SFTM from LoRA
  factors or dense updates.
* `truncated_svd`: SVD_r of an update given by its factors, or dense.
* `registry`: `METHODS`, one row per method with its paper and space.
"""

from knots_jax.methods.registry import METHOD_OPTIONS, METHODS, Method, get_method

__all__ = ["METHODS", "METHOD_OPTIONS", "Method", "get_method"]
