"""Entry-by-entry merges over every stack of a model: TA, averaging, DARE, TIES.

The values of a space (dense updates, KnOTS' diag(s) V_i^T, core matrices) come
as stacks `[L, n, R, C]` with a `valid` mask `[L, R]`; TIES' whole-model
statistics (one k-th magnitude per task, one majority sign) are computed over
all of them before any stack is merged. Stacks may be lazy (`lazy.LazyStack`):
each pass makes them again and holds about one at a time.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.merging import kernels, threshold
from knots_jax.methods.options import MergeConfig
from knots_jax.merging.lazy import LazyStack, Stack, is_lazy, materialize, shape_of
from knots_jax.methods import entrywise
from knots_jax.parallel import sharding


def per_stack(fn: Callable[[jax.Array], jax.Array], reps: Sequence[Stack]) -> list[jax.Array]:
  """`fn(rep)` for every stack; a lazy stack is made, used and dropped before the next
  one (waiting for each result: dispatch is asynchronous)."""
  out = []
  for r in reps:
    if is_lazy(r):
      out.append(jax.block_until_ready(fn(r.make())))
    else:
      out.append(fn(r))
  return out


def _dare(r: Stack, keys: jax.Array, keep_prob: np.ndarray) -> Stack:
  """DARE of a stack given as an array, or lazily (the same mask at every call)."""
  if is_lazy(r):
    return LazyStack(lambda: kernels.dare_stack(r.make(), keys, keep_prob))
  return kernels.dare_stack(r, keys, keep_prob)


def _ties_model(reps: Sequence[Stack], valids, top_k: float, scaling):
  """TIES with one threshold per task and one majority sign for the whole model.

  Lazy stacks: pass 1 (threshold, majority sign) and pass 2 (merge) each make
  every stack again and hold about one at a time."""
  shapes = [shape_of(r) for r in reps]
  n = shapes[0].shape[1]
  count = sum(int(np.sum(sharding.to_host(v))) * r.shape[-1] for r, v in zip(shapes, valids))
  rank = entrywise.kth_rank(count, top_k)
  start = time.perf_counter()
  ref = valids[0] if is_lazy(reps[0]) else reps[0]
  thresholds = sharding.like(ref, threshold.kth_smallest_magnitude(reps, valids, [rank] * n))
  threshold_seconds = time.perf_counter() - start
  majority = kernels.majority_sign(per_stack(
      lambda r: kernels.sign_total_stack(r, thresholds), reps))
  merged = per_stack(
      lambda r: kernels.ties_stack(r, thresholds, majority.astype(r.dtype), scaling), reps)
  return merged, {"threshold": np.asarray(thresholds).tolist(), "kth_rank": rank,
                  "values_per_task": count, "threshold_seconds": threshold_seconds}


def _module_thresholds(r: jax.Array, v: jax.Array, ranks: np.ndarray) -> jax.Array:
  """[L, n] exact per-module thresholds: the bracket method (a few passes, no sort of every
  module's values), or the sort kernel for a stack sharded over several devices."""
  mesh = getattr(getattr(r, "sharding", None), "mesh", None)
  if mesh is not None and mesh.size > 1 and not r.sharding.is_fully_replicated:
    return kernels.layer_thresholds(r, v, sharding.like(r, ranks))
  return threshold.module_kth_magnitudes(r, v, ranks)


def _ties_layer(reps: Sequence[Stack], valids, top_k: float, scaling):
  """TIES with thresholds and majority signs per module (PEFT / mergekit style)."""
  merged = []
  for r, v in zip(reps, valids):
    lazy = is_lazy(r)
    r = materialize(r)
    counts = np.sum(sharding.to_host(v), axis=-1) * r.shape[-1]
    ranks = np.array([entrywise.kth_rank(int(c), top_k) for c in counts], np.int64)
    thresholds = _module_thresholds(r, v, ranks)
    majority = jnp.sign(kernels.sign_sum_stack(r, thresholds)).astype(r.dtype)
    merged.append(kernels.ties_stack(r, thresholds, majority, scaling))
    del r
    if lazy:   # the next lazy stack is made only once this one is freed
      jax.block_until_ready(merged[-1])
  return merged, {}


def combine(reps: Sequence[Stack], valids: Sequence[jax.Array],
            modules: Sequence[Sequence[str]], config: MergeConfig
            ) -> tuple[list[jax.Array], dict]:
  """Merges per-task values [L, n, R, C] of every stack into [L, R, C] as `config` says.

  `reps`: arrays or `LazyStack`s. `modules`: each stack's module names; a stack
  may be longer (padded for a mesh): its extra rows must be invalid (zero).
  DARE draws each module's mask from `kernels.module_keys` (the seed and the
  module's name), so a mask does not depend on how modules are stacked.
  """
  spec = config.spec
  if spec.dare:
    keep_prob = kernels.keep_probability(config.drop_rate)
    reps = [_dare(r, kernels.module_keys(config.seed, m), keep_prob) for r, m in zip(reps, modules)]
  scaling = config.task_scaling(shape_of(reps[0]).shape[1])   # alpha, or alpha * w_i
  if spec.combine == "sum":
    return per_stack(lambda r: kernels.sum_stack(r, scaling), reps), {}
  if spec.combine == "mean":
    return per_stack(lambda r: kernels.mean_stack(r, scaling), reps), {}
  if spec.combine != "ties":
    raise ValueError(f"`{config.method}` does not merge entry by entry (combine={spec.combine})")
  if config.top_k_scope == "model":
    return _ties_model(reps, valids, config.top_k, scaling)
  return _ties_layer(reps, valids, config.top_k, scaling)
