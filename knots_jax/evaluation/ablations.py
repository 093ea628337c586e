"""Ablations as tidy records: number of merged tasks, and generic sweeps.

Every ablation takes a callback that returns a score (or a mapping of named
scores) and returns a list of flat dicts, one per evaluation, ready for
`write_csv` / `write_records_json` and for `knots_jax.evaluation.plots`.

* `number_of_tasks`: for n = 2 ... N, every subset of n tasks (or a seeded
  sample of at most `max_subsets`) is scored, and `summarize` gives the mean
  and a 95% confidence interval per n (the paper's Fig. 3).
* `sweep`: any dict of settings -> callback; `alignments_by_concat` builds the
  column-wise vs row-wise alignments of the concatenation ablation, and a
  sweep over adapters of different LoRA ranks is a dict of rank -> adapters.

Example:
  >>> def score(subset):   # merge the subset's adapters, return its average normalized accuracy
  ...   found = linear_search(select_adapters(adapters, subset), "knots_ties", evaluate_on(subset))
  ...   return found.test_score
  >>> records = number_of_tasks(score, adapters.names, max_subsets=10)
  >>> write_csv(summarize(records), "num_tasks_summary.csv")
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from typing import Callable, Hashable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
import scipy.stats
import tqdm

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.alignment import decompose
from knots_jax.io import output_dir

Score = float | Mapping[str, float]
V = TypeVar("V")

INTERVALS = ("t", "reference")


# ------------------------------------------------------------------ subsets


def task_subsets(num_tasks: int, size: int, max_subsets: int | None = None,
                 seed: int = 0) -> list[tuple[int, ...]]:
  """Index subsets of `size` out of `num_tasks`, in lexicographic order.

  All C(num_tasks, size) of them, or, when there are more than `max_subsets`,
  `max_subsets` distinct ones drawn uniformly without replacement with
  `numpy.random.default_rng(seed)` (the same seed gives the same subsets).
  """
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive integer, got {num_tasks}")
  if not 1 <= size <= num_tasks:
    raise ValueError(f"subset size must be in [1, {num_tasks}], got {size}")
  if max_subsets is not None and max_subsets < 1:
    raise ValueError(f"max_subsets must be >= 1, got {max_subsets}")
  total = math.comb(num_tasks, size)
  if max_subsets is None or total <= max_subsets:
    return list(itertools.combinations(range(num_tasks), size))
  rng = np.random.default_rng(seed)
  if total <= 200_000:
    every = list(itertools.combinations(range(num_tasks), size))
    picked = rng.choice(total, size=max_subsets, replace=False)
    return sorted(every[i] for i in picked)
  chosen: set[tuple[int, ...]] = set()
  while len(chosen) < max_subsets:
    chosen.add(tuple(sorted(int(i) for i in rng.choice(num_tasks, size=size, replace=False))))
  return sorted(chosen)


def select_adapters(adapters: AdapterSet, names: Iterable[str]) -> AdapterSet:
  """The adapters called `names`, in that order (for merging a subset of tasks)."""
  names = list(names)
  by_name = {ad.name: ad for ad in adapters.adapters}
  missing = [n for n in names if n not in by_name]
  if missing or not names:
    raise ValueError(f"no adapters named {missing or names}; the set has {list(by_name)}")
  return AdapterSet(tuple(by_name[n] for n in names))


# ---------------------------------------------------------------- intervals


def mean_interval(values: Sequence[float], confidence: float = 0.95,
                  kind: str = "t") -> dict[str, float]:
  """Mean and a confidence interval of the mean of `values`.

  kind "t": Student's t interval, `mean +- t_{(1+c)/2, m-1} * s / sqrt(m)` with
  s the sample standard deviation (ddof 1) of the m values: the usual 95%
  confidence interval of a mean. kind "reference": the reference
  implementation's `utils.mean_confidence_interval`, which divides that
  half-width by 1.96 (close to one standard error). A single value has no
  spread: half-width 0.

  Returns:
    {"mean", "low", "high", "half_width", "std", "count"}.
  """
  if kind not in INTERVALS:
    raise ValueError(f"interval kind must be one of {INTERVALS}, got `{kind}`")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  a = np.asarray(values, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"need a non-empty list of numbers, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError("values must be finite")
  m = a.size
  mean = float(np.mean(a))
  std = float(np.std(a, ddof=1)) if m > 1 else 0.0
  half = 0.0
  if m > 1:
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, m - 1) * std / math.sqrt(m))
    if kind == "reference":
      half /= 1.96
  return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half,
          "std": std, "count": m}


# ----------------------------------------------------------------- records


def _scores(value: Score, where: str) -> dict[str, float]:
  """A callback's result as {metric: finite float}; a bare number is "score"."""
  if isinstance(value, Mapping):
    items = dict(value)
    if not items:
      raise ValueError(f"{where}: the callback returned an empty mapping")
  else:
    items = {"score": value}
  out = {}
  for k, v in items.items():
    try:
      out[str(k)] = float(v)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: metric `{k}` is {v!r}, not a number") from None
    if not math.isfinite(out[str(k)]):
      raise ValueError(f"{where}: metric `{k}` is {out[str(k)]}, not finite")
  return out


def number_of_tasks(
    evaluate: Callable[[tuple[str, ...]], Score],
    tasks: Sequence[str],
    *,
    sizes: Sequence[int] | None = None,
    max_subsets: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
  """Scores every subset of tasks (or a seeded sample) for each subset size.

  Args:
    evaluate: `evaluate(subset) -> score` where `subset` is a tuple of task
      names (in the order of `tasks`); typically merges those tasks' adapters
      and returns the average normalized accuracy over those tasks. It may
      return a mapping of named scores instead of one number.
    tasks: the N task names.
    sizes: subset sizes (default 2 ... N, as in the paper).
    max_subsets: at most this many subsets per size (seeded sample; default all).
    seed: the sampling seed (per size, `seed + size`).

  Returns:
    One record per subset and metric: {"num_tasks", "subset" ("a+b+c"),
    "metric", "value"}; `summarize` turns them into the curve.
  """
  tasks = list(tasks)
  if len(set(tasks)) != len(tasks) or len(tasks) < 1:
    raise ValueError(f"tasks must be distinct names, got {tasks}")
  if any("+" in t for t in tasks):
    raise ValueError(f"task names may not contain `+` (the subset separator): {tasks}")
  sizes = list(range(2, len(tasks) + 1)) if sizes is None else [int(s) for s in sizes]
  if not sizes:
    raise ValueError("no subset sizes (need at least 2 tasks, or pass sizes=)")
  plan = [(n, tuple(tasks[i] for i in idx))
          for n in sizes for idx in task_subsets(len(tasks), n, max_subsets, seed + n)]
  records = []
  for n, subset in tqdm.tqdm(plan, desc="subsets", disable=not progress):
    scores = _scores(evaluate(subset), f"subset {subset}")
    records += [{"num_tasks": n, "subset": "+".join(subset), "metric": k, "value": v}
                for k, v in scores.items()]
  return records


def summarize(records: Sequence[Mapping], *, by: str = "num_tasks", confidence: float = 0.95,
              interval: str = "t") -> list[dict]:
  """Mean and confidence interval of "value" per (`by`, "metric"), sorted by `by`.

  Returns records {by, "metric", "mean", "low", "high", "half_width", "std",
  "count", "interval"} (interval "t95" or "reference95").
  """
  groups: dict[tuple, list[float]] = {}
  for i, r in enumerate(records):
    if by not in r or "value" not in r:
      raise ValueError(f"record {i} has no `{by}` or `value`: {dict(r)}")
    groups.setdefault((r[by], r.get("metric", "score")), []).append(r["value"])
  label = f"{interval}{round(100 * confidence)}"
  return [{by: key, "metric": metric, **mean_interval(values, confidence, interval),
           "interval": label}
          for (key, metric), values in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def sweep(
    settings: Mapping[Hashable, V],
    evaluate: Callable[[V], Score],
    *,
    name: str = "setting",
    progress: bool = False,
) -> list[dict]:
  """Scores `evaluate(value)` for every `label -> value` of `settings`, in order.

  Returns one record per setting and metric: {name: label, "metric", "value"}.

  Example (LoRA rank): `sweep({4: adapters_r4, 16: adapters_r16}, score, name="rank")`;
  concatenation: `sweep(alignments_by_concat(adapters), score, name="concat")`.
  """
  if not settings:
    raise ValueError("sweep: no settings given")
  records = []
  for label, value in tqdm.tqdm(list(settings.items()), desc=f"sweep {name}",
                                disable=not progress):
    scores = _scores(evaluate(value), f"{name}={label!r}")
    records += [{name: label, "metric": k, "value": v} for k, v in scores.items()]
  return records


def alignments_by_concat(adapters: AdapterSet, concats: Sequence[str] = ("columns", "rows"),
                         **align_kwargs) -> dict[str, decompose.Alignment]:
  """{"columns": align(..., concat="columns"), "rows": ...}: the concatenation ablation.

  Each alignment is computed once; pass the dict to `sweep` with a callback
  that merges (or searches) on it.
  """
  if "concat" in align_kwargs:
    raise ValueError("pass the concatenations as concats=(...), not concat=")
  return {c: decompose.align(adapters, concat=c, **align_kwargs) for c in concats}


# ------------------------------------------------------------------ writers


def _columns(records: Sequence[Mapping]) -> list[str]:
  columns: dict[str, None] = {}
  for r in records:
    columns.update(dict.fromkeys(map(str, r)))
  return list(columns)


def write_csv(records: Sequence[Mapping], path: str) -> str:
  """Writes records as CSV (columns: every key, in first-seen order; missing, None and
  NaN as empty cells)."""
  if not records:
    raise ValueError(f"no records to write to {path}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=_columns(records), restval="")
    writer.writeheader()
    for r in records:
      writer.writerow({str(k): "" if v is None else output_dir.to_jsonable(v) for k, v in r.items()})
  return path


def write_records_json(records: Sequence[Mapping], path: str, **meta) -> str:
  """Writes {"records": [...], **meta} as JSON (NaN written as null) with the package's one
  JSON writer (`output_dir.write_json`); returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  output_dir.write_json(path, {**meta, "records": list(records)})
  return path


def read_csv(path: str) -> list[dict]:
  """Records back from `write_csv`; numbers parsed as float where they parse."""
  def parse(v: str):
    if v == "":
      return None
    try:
      return float(v)
    except ValueError:
      return v
  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
