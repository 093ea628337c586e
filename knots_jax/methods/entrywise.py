"""Merging methods as pure functions of per-task values.

Each function takes `x` with the task axis first ([n, ...], one module's values
per task: aligned `diag(s) V_i^T` for KnOTS, dense task updates otherwise) and
follows the reference implementation of KnOTS (DESIGN.md §3):

* task arithmetic (Ilharco et al., 2023): `scaling * sum_i x_i`;
* TIES (Yadav et al., 2023): magnitude pruning with a per-task threshold,
  sign election by the sign of the summed pruned values (zeros take the
  majority sign), and the disjoint mean of the values agreeing with it, each
  multiplied by `scaling` first;
* DARE (Yu et al., 2024): drop each entry with probability p and rescale the
  kept ones by 1 / (1 - p), then task arithmetic (DARE) or TIES (DARE-TIES).

The whole-model reductions of TIES (the k-th magnitude per task, the majority
sign) are computed by the caller across modules and passed in; everything here
is elementwise or a reduction over the task axis, so it vmaps over stacks.

Example:
  >>> x = jnp.array([[1., -2., 3.], [-1., -4., 0.5]])
  >>> pruned = x * magnitude_mask(x, jnp.array([1.0, 1.0]))
  >>> disjoint_mean(pruned, elect_sign(pruned, majority=1.0), scaling=1.0)
  Array([ 1. , -3. ,  3. ], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _task_axis_expand(v: jax.Array, x: jax.Array) -> jax.Array:
  """[n] -> [n, 1, ..., 1] broadcastable against x [n, ...]."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def weigh(x: jax.Array, scaling) -> jax.Array:
  """`scaling * x` for one alpha, or `w_i x_i` for a vector of per-task weights [n]."""
  scaling = jnp.asarray(scaling, x.dtype)
  return scaling * x if scaling.ndim == 0 else _task_axis_expand(scaling, x) * x


def task_arithmetic(x: jax.Array, scaling) -> jax.Array:
  """`scaling * sum_i x_i`, or `sum_i w_i x_i` for per-task weights w [n]."""
  if jnp.ndim(scaling) == 0:
    return scaling * jnp.sum(x, axis=0)
  return jnp.sum(weigh(x, scaling), axis=0)


def average(x: jax.Array, scaling=1.0) -> jax.Array:
  """`scaling * mean_i x_i` (plain averaging; scaling 1 by default), or `mean_i w_i x_i`."""
  if jnp.ndim(scaling) == 0:
    return scaling * jnp.mean(x, axis=0)
  return jnp.mean(weigh(x, scaling), axis=0)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob) -> jax.Array:
  """Bernoulli(keep_prob) mask. `keep_prob` may be a traced scalar: a sweep over
  DARE's p then compiles once."""
  return jax.random.bernoulli(key, keep_prob, shape)


def dare_keep_mask(key: jax.Array, shape: tuple[int, ...], drop_rate: float) -> jax.Array:
  """Bernoulli(1 - drop_rate) keep mask for DARE."""
  return keep_mask(key, shape, 1.0 - drop_rate)


def rescale_kept(x: jax.Array, keep: jax.Array, keep_prob) -> jax.Array:
  """Zero where `keep` is False, the rest divided by `keep_prob` (in x's dtype)."""
  return jnp.where(keep, x / jnp.asarray(keep_prob).astype(x.dtype), 0).astype(x.dtype)


def dare(x: jax.Array, keep: jax.Array, drop_rate: float) -> jax.Array:
  """Drops the entries where `keep` is False and rescales the rest by 1 / (1 - p)."""
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"DARE drop rate must be in [0, 1), got {drop_rate}")
  return rescale_kept(x, keep, 1.0 - drop_rate)


def top_k_fraction(top_k: float) -> float:
  """The reference's convention: top_k > 1 is a percentage (30 -> 0.3)."""
  if top_k <= 0:
    raise ValueError(f"top_k must be positive, got {top_k}")
  return top_k / 100 if top_k > 1 else top_k


def kth_rank(count: int, top_k: float) -> int:
  """1-based rank of the threshold among `count` magnitudes; 0 keeps all.

  As in the reference: k = count - int(count * K), and values with
  |x| >= (k-th smallest |x|) are kept; K >= 1 keeps everything.
  """
  frac = top_k_fraction(top_k)
  if frac >= 1:
    return 0
  return count - int(count * frac)


def magnitude_mask(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """`|x_i| >= threshold_i`; threshold [n] (one per task) or broadcastable to x."""
  if threshold.ndim == 1:
    threshold = _task_axis_expand(threshold, x)
  return jnp.abs(x) >= threshold


def sign_sum(pruned: jax.Array) -> jax.Array:
  """Sum of the elected signs (before zero resolution); its sign is the majority."""
  return jnp.sum(jnp.sign(jnp.sum(pruned, axis=0)))


def elect_sign(pruned: jax.Array, majority: jax.Array | float) -> jax.Array:
  """`sign(sum_i pruned_i)`, with zeros replaced by the (whole-model) majority sign."""
  elected = jnp.sign(jnp.sum(pruned, axis=0))
  return jnp.where(elected == 0, jnp.sign(majority), elected).astype(pruned.dtype)


def disjoint_mean(pruned: jax.Array, elected: jax.Array, scaling) -> jax.Array:
  """Mean over the tasks whose (non-zero) value agrees with the elected sign.

  As in the reference, every kept value is multiplied by `scaling` first (or by
  its task's weight w_i, as PEFT's `ties` weighs the pruned values after the
  sign election) and the sum is divided by the number of agreeing kept values
  (0 where there are none).
  """
  agree = jnp.where(elected > 0, pruned > 0, pruned < 0)
  selected = weigh(jnp.where(agree, pruned, 0), scaling) if jnp.ndim(scaling) else (
      scaling * jnp.where(agree, pruned, 0))
  count = jnp.sum(agree, axis=0)
  return jnp.sum(selected, axis=0) / jnp.maximum(count, 1).astype(pruned.dtype)


def ties(x: jax.Array, threshold: jax.Array, majority: jax.Array | float, scaling) -> jax.Array:
  """TIES on one module given the per-task thresholds and the majority sign."""
  pruned = jnp.where(magnitude_mask(x, threshold), x, 0)
  return disjoint_mean(pruned, elect_sign(pruned, majority), scaling)


def kth_magnitude(x: jax.Array, rank: jax.Array) -> jax.Array:
  """Per task, the rank_i-th smallest |x_i| (1-based) over all entries of x_i [n, ...]: [n].

  `rank` [n] is `kth_rank` of the task's entry count; 0 gives threshold 0, which keeps
  every entry.
  """
  ordered = jnp.sort(jnp.abs(x).reshape(x.shape[0], -1), axis=-1)
  picked = jnp.take_along_axis(ordered, jnp.maximum(rank - 1, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(rank > 0, picked, 0).astype(x.dtype)


def ties_tensor(x: jax.Array, rank: jax.Array, scaling) -> jax.Array:
  """TIES (Yadav et al. 2023, §3: trim, elect, disjoint merge) of one tensor per task, with
  everything per tensor: task i keeps |x_i| >= its rank_i-th smallest magnitude
  (`kth_magnitude`), the sign is elected on the unweighted pruned values (zero sums take
  the sign of this tensor's sum of elected signs), then the disjoint mean of the
  `scaling`-weighted agreeing values. The per-factor TIES of `dm_ties` ("LoRA Merging
  with SVD", Table 1; PEFT's `ties` on lora_A / lora_B)."""
  pruned = jnp.where(magnitude_mask(x, kth_magnitude(x, rank)), x, 0)
  return disjoint_mean(pruned, elect_sign(pruned, sign_sum(pruned)), scaling)
