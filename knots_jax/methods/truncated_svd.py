"""`SVD_r`: the best rank-r approximation of a merged update, as LoRA factors.

For a factored update `b @ a` (b [out, k], a [k, in]) no dense out x in matrix
is formed: with `b = Q R`, the singular values and right vectors of `b @ a` are
those of the small k x in matrix `R @ a = Um S Vt`, and the left vectors are
`Q Um`. The result follows the convention of "LoRA Merging with SVD":
`B = U_r`, `A = S_r V_r^T`. The functions take one module and return the
relative Frobenius error of the truncation too; `knots_jax.merging.kernels`
compiles them over stacks (`truncate_factors`, `truncate_dense`).
"""

from __future__ import annotations

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


def truncate_factors_one(b: jax.Array, a: jax.Array, rank: int):
  """(b_r [out, rank], a_r [rank, in], relative error) of `b @ a`, from the factors."""
  return _split(*factored_svd(b, a), rank)


def truncate_dense_one(delta: jax.Array, rank: int):
  """(b_r [out, rank], a_r [rank, in], relative error) of a dense update [out, in]."""
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  return _split(u, s, vt, rank)
