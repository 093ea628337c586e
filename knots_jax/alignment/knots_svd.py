"""The joint decomposition of KnOTS: `[dW_1, ..., dW_n] = U S [V_1; ...; V_n]^T`.

Two ways to get it, with the same result up to the signs of singular vectors:

* `align_from_factors` works from the LoRA factors. `[B_1 A_1, ..., B_n A_n]` equals
  `Q_B (R_B blockdiag(R_A1^T, ...)) blockdiag(Q_A1, ...)^T` with QRs of
  `B_cat` and of every `A_i^T`, so only the small (n r) x (n r) middle matrix
  needs an SVD: O((out + n in) (n r)^2) per module instead of a dense SVD.
* `align_dense` runs the SVD of the concatenated dense updates: the reference,
  and the path for full fine-tuned task vectors that have no factors.

Both return the shared basis `u` [out, K], the singular values `s` [K] and the
per-task representations `rep` [n, K, in] = diag(s) V_i^T, with components whose
singular value is <= `tol` zeroed and flagged invalid (the reference drops
them). Row-wise concatenation (`[dW_1; ...; dW_n]`, an ablation) is the same
computation on the transposed updates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.parallel.programs import per_stack

DEFAULT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class AlignedStack:
  """The joint decomposition of L same-shaped modules.

  With `transposed` False (column-wise concatenation) the task update of task i
  is `u @ rep[:, i]`; with `transposed` True (row-wise) it is `(u @ rep[:, i]).T`.
  """
  modules: tuple[str, ...]
  u: jax.Array        # [L, out, K]   (in, K when transposed)
  s: jax.Array        # [L, K]
  rep: jax.Array      # [L, n, K, in] (n, K, out when transposed)
  valid: jax.Array    # [L, K] singular value > tol
  transposed: bool = False

  @property
  def num_valid(self) -> np.ndarray:
    """Kept components per module."""
    return np.asarray(jnp.sum(self.valid, axis=-1))


def joint_rank(n: int, r: int, out: int, inp: int) -> int:
  """Number of components of the joint decomposition of one module (from the factors)."""
  return min(min(out, n * r), n * min(inp, r))


def _qr_b(b: jax.Array):
  """QR of B_cat = [B_1, ..., B_n]: b [n, out, r] -> Q_B [out, p], R_B [p, n r]."""
  n, out, r = b.shape
  return jnp.linalg.qr(jnp.transpose(b, (1, 0, 2)).reshape(out, n * r))


def _qr_a(a: jax.Array):
  """QRs of every A_i^T: a [n, r, in] -> Q_A [n, in, q], R_A [n, q, r]."""
  return jnp.linalg.qr(jnp.swapaxes(a, 1, 2))


def _small_svd(q_b, r_b, q_a, r_a, tol: float):
  """SVD of the small R_B blockdiag(R_A1^T, ...), mapped back to U, S, diag(S) V_i^T."""
  n, _, q = q_a.shape
  p, nr = r_b.shape
  small = jnp.einsum("pnr,nqr->pnq", r_b.reshape(p, n, nr // n), r_a).reshape(p, n * q)
  u_c, s, vt_c = jnp.linalg.svd(small, full_matrices=False)  # [p, K], [K], [K, n q]
  u = q_b @ u_c
  vt = jnp.einsum("knq,niq->nki", vt_c.reshape(-1, n, q), q_a)
  valid = s > tol
  rep = jnp.where(valid[None, :, None], s[None, :, None] * vt, 0)
  return u, s, rep, valid


def align_from_factors(b: jax.Array, a: jax.Array, tol: float = DEFAULT_TOL):
  """Joint decomposition of one module from its factors.

  Args:
    b: [n, out, r] per-task B (scale folded in).
    a: [n, r, in] per-task A.
    tol: components with singular value <= tol are invalid.

  Returns:
    u [out, K], s [K], rep [n, K, in] (diag(s) V_i^T, zero where invalid), valid [K].
  """
  return _small_svd(*_qr_b(b), *_qr_a(a), tol)


def align_dense(delta: jax.Array, tol: float = DEFAULT_TOL, max_rank: int | None = None):
  """Joint decomposition of one module from dense task updates [n, out, in].

  `max_rank` keeps only the leading components (for LoRA updates the rank is at
  most n r, and keeping the same count as `align_from_factors` makes the two
  representations line up entry by entry).
  """
  n, out, inp = delta.shape
  cat = jnp.transpose(delta, (1, 0, 2)).reshape(out, n * inp)
  u, s, vt = jnp.linalg.svd(cat, full_matrices=False)
  if max_rank is not None:
    u, s, vt = u[:, :max_rank], s[:max_rank], vt[:max_rank]
  vt = jnp.transpose(vt.reshape(-1, n, inp), (1, 0, 2))
  valid = s > tol
  rep = jnp.where(valid[None, :, None], s[None, :, None] * vt, 0)
  return u, s, rep, valid


# The factors path runs as three jitted programs, each with one LAPACK call. On the
# CPU backend of jaxlib 0.10, one program holding two independent QRs (which
# XLA may run concurrently) was seen to deadlock with no CPU use.
_qr_b_stack = per_stack(_qr_b)
_qr_a_stack = per_stack(_qr_a)
_small_svd_stack = per_stack(_small_svd, static_argnames=("tol",))
_dense_stack = per_stack(align_dense, static_argnames=("tol", "max_rank"))


def _factors_stack(b, a, tol):
  return _small_svd_stack(*_qr_b_stack(b), *_qr_a_stack(a), tol=tol)


def align_stack(
    modules: tuple[str, ...],
    b: jax.Array,
    a: jax.Array,
    *,
    path: str = "factors",
    rows: bool = False,
    tol: float = DEFAULT_TOL,
    dtype=jnp.float32,
) -> AlignedStack:
  """Aligns a stack of modules given by factors b [L, n, out, r], a [L, n, r, in].

  Args:
    path: "factors" (QR route from the factors; "core" is its old name) or "dense"
      (SVD of the dense updates).
    rows: concatenate row-wise instead of column-wise (ablation).
    dtype: computation dtype (float64 needs `jax_enable_x64`).
  """
  b = jnp.asarray(b, dtype)
  a = jnp.asarray(a, dtype)
  if rows:  # dW_i^T = A_i^T B_i^T: the same decomposition with roles swapped.
    b, a = jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)
  if path in ("factors", "core"):
    u, s, rep, valid = _factors_stack(b, a, tol)
  elif path == "dense":
    _, n, out, r = b.shape
    delta = jnp.matmul(b, a)
    u, s, rep, valid = _dense_stack(delta, tol=tol, max_rank=joint_rank(n, r, out, a.shape[-1]))
  else:
    raise ValueError(f"unknown alignment path `{path}`; valid: factors, dense")
  return AlignedStack(tuple(modules), u, s, rep, valid, transposed=rows)


def align_task_vectors(
    modules: tuple[str, ...],
    delta: jax.Array,
    *,
    rows: bool = False,
    tol: float = DEFAULT_TOL,
    dtype=jnp.float32,
) -> AlignedStack:
  """Aligns dense task vectors [L, n, out, in] (full fine-tuning, no factors)."""
  delta = jnp.asarray(delta, dtype)
  if rows:
    delta = jnp.swapaxes(delta, -1, -2)
  u, s, rep, valid = _dense_stack(delta, tol=tol, max_rank=None)
  return AlignedStack(tuple(modules), u, s, rep, valid, transposed=rows)


def reconstruct(stack: AlignedStack, merged: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LoRA factors (b [L, out, K], a [L, K, in]) of the update `u @ merged`."""
  if stack.transposed:  # update = (u @ merged)^T = merged^T u^T
    return jnp.swapaxes(merged, -1, -2), jnp.swapaxes(stack.u, -1, -2)
  return stack.u, merged
