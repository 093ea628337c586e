"""`SVD_r`: the best rank-r approximation of a merged update, as LoRA factors.

For a factored update `b @ a` (b [out, k], a [k, in]) no dense out x in matrix
is formed: with `b = Q R`, the singular values and right vectors of `b @ a` are
those of the small k x in matrix `R @ a = Um S Vt`, and the left vectors are
`Q Um`. The result follows the convention of "LoRA Merging with SVD":
`B = U_r`, `A = S_r V_r^T`. Both functions work on stacks [L, ...] of modules
(jit + vmap) and return the relative Frobenius error of the truncation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pad_rank(b: jax.Array, a: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Zero-pads b [out, k] and a [k, in] to rank columns / rows (exact: adds nothing)."""
  extra = rank - b.shape[-1]
  if extra <= 0:
    return b, a
  return (jnp.pad(b, ((0, 0), (0, extra))), jnp.pad(a, ((0, extra), (0, 0))))


def _split(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int):
  """(U_r, S_r V_r^T, relative error) from an SVD, padded with zeros to `rank`."""
  keep = min(rank, s.shape[-1])
  b_r, a_r = _pad_rank(u[:, :keep], s[:keep, None] * vt[:keep], rank)
  total = jnp.sum(s * s)
  dropped = jnp.sum(s[keep:] * s[keep:])
  safe = jnp.where(total > 0, total, 1)
  err = jnp.where(total > 0, jnp.sqrt(jnp.clip(dropped / safe, 0, 1)), 0)
  return b_r, a_r, err


def factored_svd(b: jax.Array, a: jax.Array):
  """Thin SVD of `b @ a` (b [out, k], a [k, in]) without the dense product.

  `b = Q R`, SVD of the small `R a = Um S Vt`, `U = Q Um`: O((out + in) k^2).
  Returns u [out, m], s [m] (descending), vt [m, in], m = min(out, k, in).
  """
  q, r = jnp.linalg.qr(b)
  um, s, vt = jnp.linalg.svd(r @ a, full_matrices=False)
  return q @ um, s, vt


def _truncate_factors_one(b: jax.Array, a: jax.Array, rank: int):
  return _split(*factored_svd(b, a), rank)


@functools.partial(jax.jit, static_argnames="rank")
def _truncate_factors(b: jax.Array, a: jax.Array, rank: int):
  return jax.vmap(functools.partial(_truncate_factors_one, rank=rank))(b, a)


def _check_rank(rank: int) -> int:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive integer; got {rank!r}")
  return rank


def truncate_factors(b: jax.Array, a: jax.Array, rank: int):
  """Best rank-`rank` factors of every `b[l] @ a[l]`, without a dense matrix.

  Args:
    b: [L, out, k]; a: [L, k, in].
    rank: the rank of the output factors.

  Returns:
    b_r [L, out, rank] (orthonormal columns where the update has that rank),
    a_r [L, rank, in], rel_err [L] = ||b a - b_r a_r||_F / ||b a||_F (0 for a
    zero update). With rank >= k the factors are returned exactly (zero-padded)
    with error 0.
  """
  rank = _check_rank(rank)
  b, a = jnp.asarray(b), jnp.asarray(a)
  if b.ndim != 3 or a.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
    raise ValueError(f"truncate_factors needs b [L, out, k] and a [L, k, in]; "
                     f"got {b.shape} and {a.shape}")
  if rank >= b.shape[2]:
    extra = rank - b.shape[2]
    b_r = jnp.pad(b, ((0, 0), (0, 0), (0, extra)))
    a_r = jnp.pad(a, ((0, 0), (0, extra), (0, 0)))
    return b_r, a_r, jnp.zeros(b.shape[0], b.dtype)
  return _truncate_factors(b, a, rank)


def _truncate_dense_one(delta: jax.Array, rank: int):
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  return _split(u, s, vt, rank)


@functools.partial(jax.jit, static_argnames="rank")
def _truncate_dense(delta: jax.Array, rank: int):
  return jax.vmap(functools.partial(_truncate_dense_one, rank=rank))(delta)


def truncate_dense(delta: jax.Array, rank: int):
  """Best rank-`rank` factors of every dense update `delta[l]` [out, in].

  Returns b_r [L, out, rank] (= U_r), a_r [L, rank, in] (= S_r V_r^T) and the
  relative Frobenius error [L] (0 for a zero update); zero-padded when `rank`
  exceeds min(out, in).
  """
  rank = _check_rank(rank)
  delta = jnp.asarray(delta)
  if delta.ndim != 3:
    raise ValueError(f"truncate_dense needs delta [L, out, in]; got shape {delta.shape}")
  return _truncate_dense(delta, rank)
