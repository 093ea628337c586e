"""Evaluation of merges: metrics, the linear hyper-parameter search, ablations, CKA.

Nothing here depends on a model: metrics take arrays, the search and the
ablations take callbacks that return scores. Plots live in
`knots_jax.evaluation.plots` (imported on demand: it loads matplotlib).
See docs/evaluation.md.
"""

from knots_jax.evaluation.ablations import (
    alignments_by_concat,
    mean_interval,
    number_of_tasks,
    read_csv,
    select_adapters,
    summarize,
    sweep,
    task_subsets,
    write_csv,
    write_records_json,
)
from knots_jax.evaluation.cka import (
    CKAReport,
    linear_cka,
    mean_off_diagonal,
    pairwise_cka,
    task_update_cka,
)
from knots_jax.evaluation.metrics import (
    JointScores,
    TaskScores,
    accuracy,
    average_normalized_accuracy,
    ensemble_accuracy,
    ensemble_predictions,
    ensemble_union_scores,
    hits_at_k,
    joint_hits,
    normalize_label_name,
    normalized_accuracy,
    ranks,
    union_labels,
)
from knots_jax.evaluation.search import (
    SearchResult,
    Trial,
    linear_search,
    rescale,
    searched_parameter,
)

__all__ = [
    "CKAReport", "JointScores", "SearchResult", "TaskScores", "Trial", "accuracy",
    "alignments_by_concat", "average_normalized_accuracy", "ensemble_accuracy",
    "ensemble_predictions", "ensemble_union_scores", "hits_at_k", "joint_hits", "linear_cka",
    "linear_search", "mean_interval", "mean_off_diagonal", "normalize_label_name",
    "normalized_accuracy", "number_of_tasks", "pairwise_cka", "ranks", "read_csv", "rescale",
    "searched_parameter", "select_adapters", "summarize", "sweep", "task_subsets",
    "task_update_cka", "union_labels", "write_csv", "write_records_json",
]
