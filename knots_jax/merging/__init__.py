"""The merge: a method applied in its space, whole-model statistics, the result.

* `config`: every merge option, declared once.
* `orchestrate`: `merge()`, the one jit boundary over the methods' math.
* `threshold`: the exact whole-model k-th magnitude (TIES' top-K).
* `result`: `MergeResult` (per stack: factors or a dense update).
* `task_vectors`, `regmean`, `fisher`: merges of full task vectors and the
  data-based merges.
"""

from knots_jax.merging.orchestrate import merge
from knots_jax.merging.result import MergedStack, MergeResult

__all__ = ["MergeResult", "MergedStack", "merge"]
