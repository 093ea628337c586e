"""The paper's linear hyper-parameter search, on one decomposition.

KnOTS (Stoica et al. 2025, App. C; reference `eval_scripts/*_linearsearch.py`)
tunes one hyper-parameter at a time on a validation split: first the scaling
coefficient alpha over its grid, with the method's other hyper-parameters at
their defaults; then, with the best alpha, the method's second
hyper-parameter (top-K for TIES-like methods, DARE's drop rate p for DARE-like
methods, none for task arithmetic and averaging); the chosen setting is then
evaluated once on the test split.

Differences from the reference, on purpose:
* The joint decomposition is computed once (the reference recomputes the SVD
  for every configuration): pass an `Alignment`, or an `AdapterSet` that is
  aligned once here.
* For most methods of the merge table the merged update is exactly
  proportional to alpha (`Method.homogeneous`): those that combine values
  entry by entry (task arithmetic, averaging, TIES, DARE, in any space; TIES
  multiplies every kept value by alpha before the disjoint mean, whose counts
  do not depend on alpha; DARE's mask depends on the seed only), and the SVD
  methods, where alpha multiplies the result (Iso-C, Iso-CTS, TSV-M, SFTM's
  gamma, SVD_r of the multiplied merge). The alpha stage therefore merges once
  at alpha = 1 and rescales the result for every alpha (one multiply per
  stack, not one merge per alpha). `direct_merge`, its TIES / DARE variants
  and `mm_noise`, where alpha weighs both factors, are merged for every alpha.
* Candidates are not batched with `vmap`: `evaluate` is an arbitrary Python
  callback (a model forward pass over a data set) that cannot be traced, and
  with rescaling the merges left in a search are the few second-stage ones.
* The whole grid of a stage is evaluated and the first best wins (ties: the
  earlier candidate). The reference stops a stage at the first candidate that
  scores below the best so far and lets a later tie win; `stop_early=True`
  gives its stopping rule (with our tie rule).

Example:
  >>> alignment = knots_jax.align(adapters)
  >>> found = linear_search(alignment, "knots_ties", evaluate)
  >>> found.best, found.val_score, found.test_score
  ({'scaling': 0.6, 'top_k': 20.0}, 0.83, 0.81)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import tqdm

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.alignment import decompose
from knots_jax.merging import orchestrate
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax import checks
from knots_jax.methods import options, registry
from knots_jax.methods.options import MergeConfig

SCALINGS = tuple(round(0.1 * i, 1) for i in range(1, 11))          # 0.1 ... 1.0
TOP_KS = tuple(float(k) for k in range(10, 101, 10))               # 10 ... 100 (%)
DROP_RATES = (0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# Defaults of the hyper-parameters not being searched (DESIGN.md §3, paper App. C):
DEFAULT_TOP_K = 30.0       # TIES-like, during the alpha stage
DEFAULT_DROP_RATE = 0.9    # DARE-like, during the alpha stage
DARE_TIES_TOP_K = 100.0    # DARE-TIES keeps top-K fixed (the paper's KnOTS-DARE-TIES)

# Keyword arguments of `decompose.align`, used when an AdapterSet is passed.
_ALIGN_KEYS = ("path", "concat", "tol", "dtype", "mesh")
_OWN_KEYS = ("method", "scaling", "top_k", "drop_rate", "seed")

Evaluate = Callable[[MergeResult, str], float]


def searched_parameter(method: str) -> str | None:
  """The hyper-parameter searched after alpha: "top_k", "drop_rate" or None."""
  spec = registry.get_method(method)
  if spec.dare:
    return "drop_rate"
  if options.uses_top_k(spec):
    return "top_k"
  return None


def is_homogeneous(method: str) -> bool:
  """True if the merged update is exactly alpha times the alpha = 1 merge
  (`Method.homogeneous`: every method but the DM family and mm_noise)."""
  return registry.get_method(method).homogeneous


@dataclasses.dataclass(frozen=True)
class Trial:
  """One evaluated candidate on the validation split."""
  stage: str                 # "scaling", "top_k" or "drop_rate"
  scaling: float
  top_k: float | None        # None where the method does not use it
  drop_rate: float | None
  score: float
  rescaled: bool = False     # made by rescaling the alpha = 1 merge
  reused: bool = False       # same setting as an earlier trial: its score was reused
  seconds: float = 0.0       # merge (or rescale) + evaluation

  @property
  def settings(self) -> dict[str, float]:
    return {k: v for k, v in (("scaling", self.scaling), ("top_k", self.top_k),
                               ("drop_rate", self.drop_rate)) if v is not None}


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Every trial, the chosen setting, its validation and test scores and its merge."""
  method: str
  trials: tuple[Trial, ...]
  best: Mapping[str, float]
  val_score: float
  test_score: float
  result: MergeResult
  merges: int                # calls to `knots_jax.merge`
  align_seconds: float = 0.0
  seconds: float = 0.0

  def to_records(self) -> list[dict]:
    """One row per trial (split "val") and one for the test evaluation, for CSV/JSON."""
    rows = [{"method": self.method, "split": "val", "stage": t.stage, "scaling": t.scaling,
             "top_k": t.top_k, "drop_rate": t.drop_rate, "score": t.score,
             "rescaled": t.rescaled, "reused": t.reused, "seconds": t.seconds}
            for t in self.trials]
    rows.append({"method": self.method, "split": "test", "stage": "chosen",
                 "scaling": self.best["scaling"], "top_k": self.best.get("top_k"),
                 "drop_rate": self.best.get("drop_rate"), "score": self.test_score,
                 "rescaled": False, "reused": False, "seconds": 0.0})
    return rows

  def to_dict(self) -> dict:
    return {"method": self.method, "best": dict(self.best), "val_score": self.val_score,
            "test_score": self.test_score, "merges": self.merges,
            "align_seconds": self.align_seconds, "seconds": self.seconds,
            "trials": self.to_records()[:-1]}


def rescale(result: MergeResult, factor: float, scaling: float) -> MergeResult:
  """`factor` times every merged update (LoRA `a` or dense `delta`), settings['scaling'] set."""
  stacks = tuple(MergedStack(s.modules, b=s.b,
                             a=None if s.a is None else s.a * factor,
                             delta=None if s.delta is None else s.delta * factor)
                 for s in result.stacks)
  return dataclasses.replace(
      result, stacks=stacks, settings={**result.settings, "scaling": scaling},
      stats={**result.stats, "rescaled_from_scaling": result.settings.get("scaling")})


def _grid(values: Sequence[float], name: str, check: checks.Check) -> tuple[float, ...]:
  """A non-empty grid, every value checked as the merge option it is (`MergeConfig`)."""
  values = tuple(values)
  if not values:
    raise ValueError(f"{name} is empty")
  return tuple(checks.named(f"{name}: {v!r}:", check, v) for v in values)


def _prepare(alignment: decompose.Alignment | AdapterSet, method: str, align_kwargs: dict,
             progress: bool) -> decompose.Alignment:
  """The alignment every merge of the search reuses (aligned at most once, here)."""
  spec = registry.get_method(method)
  if isinstance(alignment, AdapterSet):
    if spec.knots:
      return decompose.align(alignment, progress=progress, **align_kwargs)
    return decompose.factor_alignment(alignment, align_kwargs.get("dtype", "float32"))
  if not isinstance(alignment, decompose.Alignment):
    raise ValueError(f"alignment must be a knots_jax Alignment or AdapterSet, got "
                     f"{type(alignment).__name__}")
  if align_kwargs:
    raise ValueError(f"{sorted(align_kwargs)} only apply when aligning an AdapterSet; this "
                     f"Alignment was made with {dict(alignment.settings)}")
  if spec.knots and not alignment.aligned:
    return decompose.align(alignment.adapters, progress=progress)
  return alignment


def _score(evaluate: Evaluate, result: MergeResult, split: str, settings: dict) -> float:
  value = evaluate(result, split)
  try:
    score = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"evaluate returned {value!r} for {settings} on `{split}`; it must "
                     "return a number (higher is better)") from None
  if not math.isfinite(score):
    raise ValueError(f"evaluate returned {score} for {settings} on `{split}`; it must be finite")
  return score


@dataclasses.dataclass
class _Stage:
  """The running state of a search: trials, the best so far, merges made."""
  evaluate: Evaluate
  merge: Callable[[MergeConfig], MergeResult]
  trials: list = dataclasses.field(default_factory=list)
  best: tuple | None = None     # (score, settings, result)
  merges: int = 0

  def run_merge(self, config: MergeConfig) -> MergeResult:
    self.merges += 1
    return self.merge(config)

  def record(self, stage: str, settings: dict, score: float, result: MergeResult, t0: float,
             **flags) -> None:
    self.trials.append(Trial(stage, **settings, score=score, seconds=time.perf_counter() - t0,
                             **flags))
    if self.best is None or score > self.best[0]:
      self.best = (score, settings, result)


def _settings(config: MergeConfig) -> dict:
  """The searched values of a candidate (None where the method does not read them)."""
  return dict(scaling=config.scaling, top_k=config.top_k if config.applies("top_k") else None,
              drop_rate=config.drop_rate if config.applies("drop_rate") else None)


def _alpha_stage(state: _Stage, base: MergeConfig, scalings, stop_early: bool, bar) -> None:
  """Stage 1: alpha, the other hyper-parameters at their defaults; a homogeneous
  method is merged once at alpha = 1 and rescaled."""
  unit = state.run_merge(base.replace(scaling=1.0)) if base.spec.homogeneous else None
  stage_best = -math.inf
  for scaling in scalings:
    t0 = time.perf_counter()
    config = base.replace(scaling=scaling)
    result = rescale(unit, scaling, scaling) if unit is not None else state.run_merge(config)
    settings = _settings(config)
    score = _score(state.evaluate, result, "val", settings)
    state.record("scaling", settings, score, result, t0, rescaled=unit is not None)
    bar.update()
    if stop_early and score < stage_best:
      break
    stage_best = max(stage_best, score)


def _second_stage(state: _Stage, base: MergeConfig, name: str | None, grid, stop_early: bool,
                  bar) -> None:
  """Stage 2: the method's second hyper-parameter (`name`) at the best alpha."""
  stage1_score, stage1_settings, stage1_result = state.best
  alpha = base.replace(scaling=stage1_settings["scaling"])
  stage_best = -math.inf
  for value in grid:
    t0 = time.perf_counter()
    config = alpha.replace(**{name: value})
    settings = _settings(config)
    if settings == stage1_settings:   # evaluated in stage 1 (the merge is deterministic)
      score, reused, result = stage1_score, True, stage1_result
    else:
      result = state.run_merge(config)
      score, reused = _score(state.evaluate, result, "val", settings), False
    state.record(name, settings, score, result, t0, reused=reused)
    bar.update()
    if stop_early and score < stage_best:
      break
    stage_best = max(stage_best, score)


def _search_config(method: str, top_k, drop_rate, seed: int, merge_kwargs: dict) -> MergeConfig:
  """The merge options every candidate starts from (checked once, here)."""
  for key in _OWN_KEYS:
    if key in merge_kwargs:
      hint = {"scaling": "scalings=(...)"}.get(key, f"{key}=...")
      raise ValueError(f"`{key}` is set by the search; pass {hint} to linear_search itself")
  spec = registry.get_method(method)
  if top_k is None:
    top_k = DARE_TIES_TOP_K if (spec.dare and options.uses_top_k(spec)) else DEFAULT_TOP_K
  drop_rate = DEFAULT_DROP_RATE if drop_rate is None else drop_rate
  return MergeConfig.from_options(dict(method=method, top_k=top_k, drop_rate=drop_rate,
                                       seed=seed, **merge_kwargs), source="linear_search")


def linear_search(
    alignment: decompose.Alignment | AdapterSet,
    method: str,
    evaluate: Evaluate,
    *,
    scalings: Sequence[float] = SCALINGS,
    top_ks: Sequence[float] = TOP_KS,
    drop_rates: Sequence[float] = DROP_RATES,
    top_k: float | None = None,
    drop_rate: float | None = None,
    seed: int = 0,
    stop_early: bool = False,
    progress: bool = False,
    **merge_kwargs,
) -> SearchResult:
  """Alpha first, then top-K (TIES-like) or p (DARE-like), on "val"; then "test".

  Args:
    alignment: an `Alignment` from `knots_jax.align` (its decomposition is
      reused by every merge), or an `AdapterSet` (aligned once here; the
      alignment keywords `path`, `concat`, `tol`, `dtype`, `mesh` may then be
      given in `merge_kwargs`).
    method: a name of `knots_jax.METHODS`.
    evaluate: `evaluate(result, split) -> float`, higher is better; called with
      split "val" for every candidate and "test" once for the chosen one.
    scalings, top_ks, drop_rates: the grids (paper App. C by default).
    top_k: top-K while alpha is searched (TIES-like; default 30), and the fixed
      top-K of DARE-TIES methods (default 100).
    drop_rate: DARE's p while alpha is searched (default 0.9).
    seed: DARE's seed (the same for every candidate).
    stop_early: stop a stage at the first candidate that scores below the best
      so far (the reference's rule).
    progress: a progress bar over candidates.
    **merge_kwargs: passed to every `knots_jax.merge` (e.g. `top_k_scope`,
      `modules_to_save`).

  Returns:
    A `SearchResult`; `result` is the chosen merge (the one evaluated on test).
  """
  if not callable(evaluate):
    raise ValueError("evaluate must be a callable evaluate(result, split) -> float")
  align_kwargs = {k: merge_kwargs.pop(k) for k in _ALIGN_KEYS if k in merge_kwargs}
  base = _search_config(method, top_k, drop_rate, seed,
                        {**merge_kwargs, **{k: v for k, v in align_kwargs.items() if k != "mesh"}})
  second = searched_parameter(method)
  scalings = _grid(scalings, "scalings", checks.number)
  grids = {"top_k": (top_ks, "top_ks", options.TOP_K),
           "drop_rate": (drop_rates, "drop_rates", options.DROP_RATE)}
  second_grid = _grid(*grids[second]) if second else ()

  start = time.perf_counter()
  alignment = _prepare(alignment, method, align_kwargs, progress)
  align_seconds = time.perf_counter() - start
  state = _Stage(evaluate, lambda config: orchestrate.merge(alignment, config=config))
  with tqdm.tqdm(total=len(scalings) + len(second_grid), desc=f"search {method}",
                 disable=not progress) as bar:
    _alpha_stage(state, base, scalings, stop_early, bar)
    _second_stage(state, base, second, second_grid, stop_early, bar)
  val_score, chosen, result = state.best
  test_score = _score(evaluate, result, "test", chosen)
  return SearchResult(
      method=method, trials=tuple(state.trials),
      best={k: v for k, v in chosen.items() if v is not None},
      val_score=val_score, test_score=test_score, result=result, merges=state.merges,
      align_seconds=align_seconds, seconds=time.perf_counter() - start)
