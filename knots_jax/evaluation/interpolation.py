"""Linear paths between two merges, and the loss (or accuracy) barrier along them.

`interpolation_path` gives the merges between two results along one of the two
paths of "LoRA Merging with SVD" (the LMC paragraph of §4, Fig. 1: "we
interpolated the pairs of LoRAs with coefficients a in [0.1, ..., 1.0]"):
`path="mm"`, the updates interpolated, `(1-t) B_1 A_1 + t B_2 A_2` (the
multiplied merge, a straight line in weight space); `path="dm"`, the factors
interpolated, `((1-t) B_1 + t B_2)((1-t) A_1 + t A_2)` (the direct merge, whose
cross terms bend the path). `lmc_barrier` measures how far the scores along a
path fall below the straight line between its end points (Entezari et al. 2022).
For a pair of LoRAs, pass each adapter's own result (`merge` of a one-adapter
set with "ta": its factors, PEFT's scale folded into B).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from knots_jax.merging.result import MergedStack, MergeResult


def _check_ts(ts, name: str = "ts") -> np.ndarray:
  ts = np.asarray(ts, np.float64)
  if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)):
    raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers; got {ts!r}")
  return ts


def _stacks_by_modules(result: MergeResult) -> dict[tuple[str, ...], MergedStack]:
  return {s.modules: s for s in result.stacks}


def _update_shape(s: MergedStack) -> tuple[int, ...]:
  """(L, out, in) of a merged stack, factored or dense."""
  if s.is_factored:
    return tuple(s.b.shape[:-1]) + (s.a.shape[-1],)
  return tuple(s.delta.shape)


def _interpolate_factors(sa: MergedStack, sb: MergedStack, t: float) -> MergedStack:
  """The direct-merge path: ((1-t) b_a + t b_b) @ ((1-t) a_a + t a_b), still a LoRA."""
  if not (sa.is_factored and sb.is_factored) or sa.b.shape != sb.b.shape:
    shapes = [None if s.b is None else (tuple(s.b.shape), tuple(s.a.shape)) for s in (sa, sb)]
    raise ValueError(f"interpolation_path(path='dm') interpolates LoRA factors: the stack of "
                     f"`{sa.modules[0]}` ... needs factors of equal shapes in both results; got "
                     f"{shapes} (a dense result has none)")
  return MergedStack(sa.modules, b=(1 - t) * sa.b + t * sb.b, a=(1 - t) * sa.a + t * sb.a)


def _interpolate_stack(sa: MergedStack, sb: MergedStack, t: float) -> MergedStack:
  """(1 - t) * update_a + t * update_b; exact factors [b_a, b_b], [(1-t) a_a; t a_b]."""
  if sa.is_factored and sb.is_factored:
    return MergedStack(sa.modules, b=jnp.concatenate([sa.b, sb.b], axis=-1),
                       a=jnp.concatenate([(1 - t) * sa.a, t * sb.a], axis=-2))
  dense_a = sa.delta if sa.delta is not None else jnp.matmul(sa.b, sa.a)
  dense_b = sb.delta if sb.delta is not None else jnp.matmul(sb.b, sb.a)
  return MergedStack(sa.modules, delta=(1 - t) * dense_a + t * dense_b)


def interpolation_path(result_a: MergeResult, result_b: MergeResult,
                       ts: Sequence[float], path: str = "mm") -> list[MergeResult]:
  """The merges between two results at every t, along the MM or the DM path.

  `path="mm"`: theta(t) = (1 - t) theta_a + t theta_b; with theta = W + Delta,
  only the updates are interpolated: exactly as LoRA factors (rank k_a + k_b)
  when both results are factored, densely otherwise. `path="dm"`: the factors
  are interpolated, B(t) A(t) with B(t) = (1-t) B_a + t B_b and A(t) likewise
  (both results factored, of equal shapes). `extra` tensors (modules_to_save)
  are interpolated linearly on both paths. Evaluate each result and pass the
  scores to `lmc_barrier`: "LoRA Merging with SVD" (§4, Fig. 1) finds the MM
  path linearly mode-connected and the DM path not.
  """
  if path not in ("mm", "dm"):
    raise ValueError(f"interpolation_path: path must be `mm` or `dm`, got {path!r}")
  step = _interpolate_stack if path == "mm" else _interpolate_factors
  ts = _check_ts(ts)
  by_a, by_b = _stacks_by_modules(result_a), _stacks_by_modules(result_b)
  if set(by_a) != set(by_b):
    mods_a = {m for s in result_a.stacks for m in s.modules}
    mods_b = {m for s in result_b.stacks for m in s.modules}
    raise ValueError(
        "interpolation_path: the two merges do not cover the same stacks of modules "
        f"(only in a: {sorted(mods_a - mods_b)[:5]}, only in b: {sorted(mods_b - mods_a)[:5]}; "
        "merge the same adapters)")
  for stack, sa in by_a.items():
    if _update_shape(sa) != _update_shape(by_b[stack]):
      raise ValueError(f"interpolation_path: the updates of `{stack[0]}` ... have shapes "
                       f"{_update_shape(sa)} and {_update_shape(by_b[stack])}")
  if set(result_a.extra) != set(result_b.extra):
    raise ValueError(f"interpolation_path: modules_to_save tensors differ: "
                     f"{sorted(result_a.extra)} vs {sorted(result_b.extra)}")
  results = []
  for t in ts.tolist():
    stacks = tuple(step(sa, by_b[m], t) for m, sa in by_a.items())
    extra = {k: (1 - t) * np.asarray(v) + t * np.asarray(result_b.extra[k])
             for k, v in result_a.extra.items()}
    settings = {"method": f"interpolation({result_a.method}, {result_b.method})", "t": t,
                "path": path,
                "a": dict(result_a.settings), "b": dict(result_b.settings)}
    results.append(MergeResult(stacks=stacks, peft_config=dict(result_a.peft_config),
                               method=settings["method"], settings=settings, extra=extra))
  return results


def lmc_barrier(ts: Sequence[float], scores: Sequence[float],
                higher_is_better: bool = True) -> float:
  """Height of the barrier on a linear path: the largest drop below the straight line.

  With s(t) the score of theta(t) (`interpolation_path`) and the line between
  the end points, (1 - t) s(0) + t s(1):
  `max_t [(1 - t) s(0) + t s(1) - s(t)]` for scores where higher is better
  (accuracy), `max_t [s(t) - (1 - t) s(0) - t s(1)]` for losses; the
  definition of Entezari et al. (ICLR 2022, arXiv:2110.06296). 0 at t = 0 and
  t = 1, so the barrier is >= 0; ~0 means linearly mode-connected. `ts` must
  hold 0 and 1 (in any order).
  """
  ts = _check_ts(ts)
  scores = np.asarray(scores, np.float64)
  if scores.shape != ts.shape or not np.all(np.isfinite(scores)):
    raise ValueError(f"lmc_barrier: need one finite score per t ({ts.size}); got {scores!r}")
  if len(np.unique(ts)) != ts.size:
    raise ValueError(f"lmc_barrier: ts must be distinct; got {ts.tolist()}")
  if not (np.any(ts == 0.0) and np.any(ts == 1.0)):
    raise ValueError(f"lmc_barrier: ts must contain the end points 0 and 1; got {ts.tolist()}")
  s0, s1 = scores[ts == 0.0][0], scores[ts == 1.0][0]
  gap = (1 - ts) * s0 + ts * s1 - scores
  return float(np.max(gap if higher_is_better else -gap))
