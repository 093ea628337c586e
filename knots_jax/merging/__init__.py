"""The merge: a method applied in its space, whole-model statistics, the result.

* `orchestrate`: `merge()`: picks the space of the method, runs it, checks and
  returns a `MergeResult`.
* `kernels`: the compiled per-stack programs (the one jit boundary over the
  math of `knots_jax.methods`) and the programs of the table's rows.
* `combine`: entry-by-entry merges (TA, averaging, DARE, TIES) over all stacks.
* `threshold`: the exact whole-model k-th magnitude (TIES' top-K).
* `lazy`: stacks made on demand (the dense baselines).
* `result`: `MergeResult` (per stack: factors or a dense update).
* `task_vectors`, `regmean`, `fisher`: merges of full task vectors and the
  data-based merges.
"""

__all__ = ["combine", "fisher", "kernels", "lazy", "orchestrate", "regmean", "result",
           "task_vectors", "threshold"]
