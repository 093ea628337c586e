"""The exact k-th smallest magnitude per task over many stacked arrays.

TIES as in the reference prunes each task with one threshold for the whole
model: the k-th smallest |x| over every layer's values of that task. Gathering
and sorting all values does not fit at Llama scale, and bisection needs ~32
passes over all of them. Here:

1. a regular sample of each task's values (every s-th value, s coprime with
   the row length) gives a bracket [lo, hi] that holds the k-th value with
   high probability;
2. one counting pass (per task: how many values lie below lo, how many inside)
   confirms it, or narrows a known bracket by bisection over the float bit
   patterns until few values are inside;
3. one pass extracts the smallest values inside the bracket (`lax.top_k` of at
   most `cap` per stack), and the host picks the exact one.

Magnitudes are compared as the integer bit patterns of |x| (monotone for
non-negative floats), so counts and brackets are exact. Every pass is a jitted
reduction over a stack, which XLA distributes when the stack is sharded.

A stack may also be given lazily, as a `lazy.LazyStack` making the
[L, n, R, C] array: it is then made once per pass, its result is used and
dropped before the next stack is made, so at most one stack is held at a time
(the dense TIES baselines build each stack's b @ a on the fly this way).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.merging.lazy import Stack, is_lazy, materialize, shape_of
from knots_jax.parallel.sharding import STACK, like, replicated_spec, stack_spec, to_host

_CAP = 1 << 16            # most values extracted per task and stack
_SAMPLES = 1 << 20        # about this many sampled values per task for the initial bracket
_Z = 3.5                  # bracket half-width in binomial standard deviations


def _int_dtype(dtype) -> np.dtype:
  return np.dtype(np.int64) if np.dtype(dtype).itemsize == 8 else np.dtype(np.int32)


def magnitudes(x: jax.Array, valid: jax.Array) -> jax.Array:
  """|x| where valid, -1 elsewhere. x: [L, n, R, C], valid: [L, R]."""
  return jnp.where(valid[:, None, :, None], jnp.abs(x), -1)


def _max_key(dtype) -> int:
  """Bit pattern of +inf."""
  return int(np.array(np.inf, dtype).view(_int_dtype(dtype)))


def _to_float(keys: np.ndarray, dtype) -> np.ndarray:
  return np.asarray(keys, _int_dtype(dtype)).view(dtype)


@jax.jit
def _count(x, valid, lo, hi):
  """Per task: #magnitudes in [0, lo), #magnitudes in [lo, hi]."""
  mag = magnitudes(x, valid)
  lo_, hi_ = lo[None, :, None, None], hi[None, :, None, None]
  below = jnp.sum((mag >= 0) & (mag < lo_), axis=(0, 2, 3))
  inside = jnp.sum((mag >= lo_) & (mag <= hi_), axis=(0, 2, 3))
  return below, inside


@functools.partial(jax.jit, static_argnames=("cap",))
def _extract(x, valid, lo, hi, cap):
  """Per task: the `cap` smallest magnitudes inside [lo, hi] (padding: -inf)."""
  mag = magnitudes(x, valid)
  inside = (mag >= lo[None, :, None, None]) & (mag <= hi[None, :, None, None])
  neg = jnp.where(inside, -mag, -jnp.inf)
  neg = jnp.moveaxis(neg, 1, 0).reshape(x.shape[1], -1)
  return -jax.lax.top_k(neg, cap)[0]


@functools.partial(jax.jit, static_argnames=("cap", "mesh"))
def _extract_sharded(x, valid, lo, hi, cap, mesh):
  """`_extract` for a stack sharded over `mesh`: a top_k per device, then one over
  the gathered [n, devices * cap] candidates (a plain top_k over the flattened
  stack would make XLA all-gather every value first)."""
  local_size = (x.shape[0] // mesh.shape[STACK]) * int(np.prod(x.shape[2:]))
  k = min(cap, local_size)
  per_device = jax.shard_map(
      lambda x, v, lo, hi: _extract(x, v, lo, hi, k)[None], mesh=mesh,
      in_specs=(stack_spec(4), stack_spec(2), replicated_spec(), replicated_spec()), out_specs=stack_spec(3))
  tops = per_device(x, valid, lo, hi)                       # [devices, n, k]
  neg = jnp.moveaxis(-tops, 0, 1).reshape(x.shape[1], -1)
  return -jax.lax.top_k(neg, cap)[0]


def _extract_any(x, valid, lo, hi, cap):
  sharding = getattr(x, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and mesh.size > 1 and not sharding.is_fully_replicated:
    return _extract_sharded(x, valid, lo, hi, cap, mesh)
  return _extract(x, valid, lo, hi, cap)


def sample_stride(total: int, columns: int, samples: int | None = None) -> int:
  """A step giving about `samples` of `total` values, coprime with the row length
  `columns` so that successive picks walk through every column (a step that divides
  it would sample the same few input features of every row)."""
  stride = max(1, total // (samples or _SAMPLES))
  while math.gcd(stride, columns) != 1:
    stride += 1
  return stride


@functools.partial(jax.jit, static_argnames=("stride",))
def _sample(x, valid, stride):
  """Magnitudes at every `stride`-th position of each module's [R, C] values (the
  same positions for every task), -1 where the row is invalid: [L * m, n]."""
  L, n, R, C = x.shape
  picked = x.reshape(L, n, R * C)[:, :, ::stride]                  # [L, n, m]
  rows = jnp.arange(0, R * C, stride) // C                         # an iota, not a constant
  mag = jnp.where(valid[:, rows][:, None], jnp.abs(picked), -1)
  return jnp.moveaxis(mag, 1, 2).reshape(-1, n)


def _interpolate(lo_key, hi_key, position: float, half_width: float, dtype):
  """Keys around `position` (0..1) of the value range [lo, hi], +-half_width of it."""
  lo_v, hi_v = _to_float(np.array([lo_key, hi_key]), dtype).astype(np.float64)
  to_key = lambda v: int(np.array(v, dtype).view(_int_dtype(dtype)))
  a = to_key(lo_v + (hi_v - lo_v) * max(position - half_width, 0.0))
  b = to_key(lo_v + (hi_v - lo_v) * min(position + half_width, 1.0))
  a, b = max(int(lo_key), a), min(int(hi_key), b)
  return a, max(a, b)


def _initial_bracket(xs, valids, ranks, counts, max_key, int_dtype, samples=None):
  """Sample quantiles around rank/count, per task (about `samples` values each)."""
  n = len(ranks)
  shapes = [shape_of(x).shape for x in xs]
  total = sum(int(np.prod(s)) // s[1] for s in shapes)
  parts = []
  for x, shape, valid in zip(xs, shapes, valids):
    stride = sample_stride(total, shape[3], samples)
    part = to_host(_sample(materialize(x), valid, stride))
    parts.append(np.where(part >= 0, part.view(int_dtype), -1))   # bit patterns, -1: invalid
  picked = np.concatenate(parts)
  lo = np.zeros(n, int_dtype)
  hi = np.full(n, max_key, int_dtype)
  for t in range(n):
    s = picked[:, t]
    s = s[s >= 0]
    m = s.size
    if m < 64:
      continue
    q = ranks[t] / counts
    margin = _Z * np.sqrt(m * q * (1 - q)) + 2
    i_lo, i_hi = int(np.floor(q * m - margin)), int(np.ceil(q * m + margin))
    picks = [i for i in (i_lo, i_hi) if 0 <= i < m]
    part = np.partition(s, picks) if picks else s
    if i_lo >= 0:
      lo[t] = part[i_lo]
    if i_hi < m:
      hi[t] = part[i_hi]
  return lo, hi


def _count_all(xs, valids, lo, hi, ref, dtype, n: int):
  """One counting pass over every stack: per task, the valid values below `lo` and inside
  [lo, hi] (brackets as integer keys)."""
  below = np.zeros(n, np.int64)
  inside = np.zeros(n, np.int64)
  lo_f, hi_f = like(ref, _to_float(lo, dtype)), like(ref, _to_float(hi, dtype))
  for x, v in zip(xs, valids):
    b, i = _count(materialize(x), v, lo_f, hi_f)
    below += to_host(b)
    inside += to_host(i)
  return below, inside


def _narrow_brackets(count, lo, hi, ranks, active, max_key, int_dtype, dtype, cap: int):
  """Counting passes until every active task's bracket [lo, hi] holds its k-th value with at
  most `cap` values to extract below it: once an interpolation step, then bisection.
  Updates `lo`, `hi` in place; returns the counts below `lo` of the last pass."""
  n = len(ranks)
  known_lo = np.zeros(n, np.int64)
  known_hi = np.full(n, max_key, np.int64)
  interpolated = np.zeros(n, bool)
  ready = ~active
  for _ in range(2 * 8 * int_dtype.itemsize + 4):
    below, inside = count(lo, hi)
    for t in np.flatnonzero(~ready):
      if ranks[t] <= below[t]:                 # the k-th value is below lo
        known_hi[t] = int(lo[t]) - 1
      elif ranks[t] > below[t] + inside[t]:    # above hi
        known_lo[t] = int(hi[t]) + 1
      else:                                    # inside [lo, hi]
        known_lo[t], known_hi[t] = lo[t], hi[t]
        if ranks[t] - below[t] <= cap or lo[t] == hi[t]:
          ready[t] = True   # the values to extract (those up to the k-th) fit
          continue
        if not interpolated[t]:
          # Values are dense in a narrow bracket: place a bracket of about cap
          # values around the target's linear position, once.
          interpolated[t] = True
          lo[t], hi[t] = _interpolate(lo[t], hi[t], (ranks[t] - below[t]) / inside[t],
                                      cap / (2 * inside[t]), dtype)
          continue
      lo[t] = known_lo[t]                      # bisect the known bracket
      hi[t] = known_lo[t] + (known_hi[t] - known_lo[t]) // 2   # no int64 overflow near +inf
    if ready.all():
      return below
  raise RuntimeError("k-th value search did not converge")


def _extract_kth(xs, valids, shapes, lo, hi, below, ranks, active, ref, dtype) -> np.ndarray:
  """The extraction pass: the smallest values inside each task's bracket, and the exact k-th."""
  n = len(ranks)
  need = int(max(1, np.max(np.where(active, ranks - below, 1))))
  found = [[] for _ in range(n)]
  lo_f, hi_f = like(ref, _to_float(lo, dtype)), like(ref, _to_float(hi, dtype))
  for s, x, v in zip(shapes, xs, valids):
    size = int(np.prod(s.shape)) // n
    k = min(size, 1 << int(np.ceil(np.log2(need))))
    top = to_host(_extract_any(materialize(x), v, lo_f, hi_f, k))
    for t in range(n):
      found[t].append(top[t][np.isfinite(top[t])])
  result = np.zeros(n, dtype)
  for t in np.flatnonzero(active):
    values = np.sort(np.concatenate(found[t]))
    result[t] = values[ranks[t] - below[t] - 1]
  return result


def kth_smallest_magnitude(
    xs: Sequence[Stack],
    valids: Sequence[jax.Array],
    ranks: Sequence[int],
    *,
    cap: int = _CAP,
    samples: int | None = None,
) -> np.ndarray:
  """The exact `ranks[t]`-th smallest |x| of task t over all stacks.

  Args:
    xs: stacks [L, n, R, C] (task axis 1), all of one float dtype; each an
      array or a `LazyStack` making it (made once per pass and
      dropped after use: about one stack in memory at a time).
    valids: per stack [L, R]; invalid rows are not counted.
    ranks: 1-based rank per task; 0 means "no threshold" and gives 0.
    cap: most values extracted per task and stack.
    samples: sampled values per task for the initial bracket (default 2^20).

  Returns:
    [n] thresholds in the dtype of xs.
  """
  shapes = [shape_of(x) for x in xs]
  dtype = np.dtype(shapes[0].dtype)
  int_dtype = _int_dtype(dtype)
  max_key = _max_key(dtype)
  n = shapes[0].shape[1]
  ref = valids[0] if is_lazy(xs[0]) else xs[0]   # placement of small host values
  ranks = np.asarray(ranks, np.int64)
  counts = sum(int(np.sum(to_host(v))) * s.shape[3] for s, v in zip(shapes, valids))
  if np.any(ranks > counts) or np.any(ranks < 0):
    raise ValueError(f"ranks {ranks.tolist()} outside [0, {counts}]")
  active = ranks > 0
  if not active.any():
    return np.zeros(n, dtype)
  if counts <= cap:
    lo, hi = np.zeros(n, int_dtype), np.full(n, max_key, int_dtype)
  else:
    lo, hi = _initial_bracket(xs, valids, ranks, counts, max_key, int_dtype, samples)
  count = lambda lo, hi: _count_all(xs, valids, lo, hi, ref, dtype, n)  # noqa: E731
  below = _narrow_brackets(count, lo, hi, ranks, active, max_key, int_dtype, dtype, cap)
  return _extract_kth(xs, valids, shapes, lo, hi, below, ranks, active, ref, dtype)


_MODULE_SAMPLES = 1 << 16  # sampled values per module and task for `module_kth_magnitudes`


@jax.jit
def _module_magnitudes(x: jax.Array, valid: jax.Array) -> jax.Array:
  """|x| [L, n, R, C] as [1, L * n, R, C]: every (module, task) a task of its own,
  +inf on invalid rows (above every valid value, so never a valid rank's pick)."""
  L, n, R, C = x.shape
  return jnp.where(valid[:, None, :, None], jnp.abs(x), jnp.inf).reshape(1, L * n, R, C)


def module_kth_magnitudes(x: jax.Array, valid: jax.Array, ranks: Sequence[int], *,
                          cap: int = _CAP, samples: int = _MODULE_SAMPLES) -> jax.Array:
  """Per module l and task t, the exact ranks[l]-th smallest valid |x[l, t]|: [L, n].

  TIES with thresholds per module: the bracket method of `kth_smallest_magnitude`
  run on the L * n (module, task) pairs at once, a few passes over the stack
  instead of a sort of every module's values. x: [L, n, R, C], valid: [L, R],
  ranks: [L] (1-based; 0 gives 0, "keep all")."""
  L, n = x.shape[:2]
  ranks = np.asarray(ranks, np.int64).reshape(L)
  mag = _module_magnitudes(x, jnp.asarray(valid))
  everything = jnp.ones((1, x.shape[2]), bool)
  found = kth_smallest_magnitude([mag], [everything], np.repeat(ranks, n), cap=cap,
                                 samples=samples)
  return like(x, found.reshape(L, n).astype(x.dtype))
