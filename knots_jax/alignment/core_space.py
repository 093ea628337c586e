"""The Core Space: every task's LoRA as a small core matrix in one shared basis.

"Accurate and Efficient Low-Rank Model Merging in Core Space" (Panariello et
al., NeurIPS 2025, arXiv:2509.17786). Per module, with the LoRA factors of the
n tasks (B_i [out, r_i], A_i [r_i, in], PEFT scale folded into B_i):

* U_B [out, Kb]: left singular vectors of B_cat = [B_1, ..., B_n];
* V_A [in, Ka]: right singular vectors of A_cat = [A_1; ...; A_n];
* M_i = U_B^T B_i A_i V_A [Kb, Ka], the core matrix of task i.

Since U_B U_B^T B_i = B_i and A_i V_A V_A^T = A_i, the projection is lossless:
B_i A_i = U_B M_i V_A^T. A merging method is applied to the M_i (small:
Kb, Ka <= sum_i r_i) and the merged update U_B M V_A^T is a LoRA of rank Kb,
written as B = U_B, A = M V_A^T, with no dense out x in matrix.

Stacks are zero-padded to a common rank (knots_jax.adapters.stacks): padding adds zero
singular values to B_cat and A_cat, whose directions are arbitrary. Directions
with singular value <= `rtol` times the largest are marked invalid and zeroed
(in U_B, V_A and every core), so a core has sum_i r_i valid rows and columns
when the factors are generic, as the authors' (unpadded) cores, and
heterogeneous ranks need nothing else.

Each basis is a QR of the tall stacked factor and an SVD of its small
(<= n r square) R factor, the cheap exact route of the KnOTS path
(knots_jax/alignment/knots_svd.py), not an SVD of the tall matrix. The two
bases are independent, so they run as separate jitted programs (see
knots_jax/alignment/knots_svd.py on the jaxlib 0.10 CPU deadlock); within one,
the SVD depends on the QR.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.parallel.programs import per_stack

DEFAULT_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class CoreStack:
  """The core-space projection of L same-shaped modules."""
  modules: tuple[str, ...]
  u_b: jax.Array       # [L, out, Kb] reference basis of the B's (invalid columns zero)
  v_a: jax.Array       # [L, in, Ka]  reference basis of the A's (invalid columns zero)
  cores: jax.Array     # [L, n, Kb, Ka] M_i = U_B^T B_i A_i V_A
  valid_b: jax.Array   # [L, Kb]
  valid_a: jax.Array   # [L, Ka]

  @property
  def rank(self) -> jax.Array:
    """[L] size of the core space, min(#valid rows, #valid columns) (the
    authors' min(out, sum r_i, in) for generic factors)."""
    return jnp.minimum(jnp.sum(self.valid_b, axis=-1), jnp.sum(self.valid_a, axis=-1))

  @property
  def entry_valid(self) -> jax.Array:
    """[L, Kb * Ka] the core entries in a valid row and a valid column (row-major)."""
    both = self.valid_b[:, :, None] & self.valid_a[:, None, :]
    return both.reshape(both.shape[0], -1)


def _check_factors(b, a) -> None:
  if b.ndim != 4 or a.ndim != 4 or b.shape[:2] != a.shape[:2] or b.shape[-1] != a.shape[-2]:
    raise ValueError(f"core space: need b [L, n, out, r] and a [L, n, r, in]; "
                     f"got {b.shape} and {a.shape}")


def _valid(s: jax.Array, rtol: float) -> jax.Array:
  return s > rtol * jnp.max(s)


def basis_b(b: jax.Array, rtol: float = DEFAULT_RTOL) -> tuple[jax.Array, jax.Array]:
  """U_B of one module: b [n, out, r] -> (u_b [out, Kb], valid [Kb]), Kb = min(out, n r).

  B_cat = Q R (tall QR), R = U_R S W^T (small SVD): U_B = Q U_R, the left singular
  vectors of B_cat without an SVD of the tall matrix (up to signs, as any SVD)."""
  n, out, r = b.shape
  q, rr = jnp.linalg.qr(jnp.transpose(b, (1, 0, 2)).reshape(out, n * r))
  u, s, _ = jnp.linalg.svd(rr, full_matrices=False)
  valid = _valid(s, rtol)
  return (q @ u) * valid, valid


def basis_a(a: jax.Array, rtol: float = DEFAULT_RTOL) -> tuple[jax.Array, jax.Array]:
  """V_A of one module: a [n, r, in] -> (v_a [in, Ka], valid [Ka]), Ka = min(n r, in).

  A_cat^T = Q R, R^T = U S W^T: A_cat = U S (Q W)^T, so V_A = Q W (as `basis_b`)."""
  n, r, inp = a.shape
  q, rr = jnp.linalg.qr(a.reshape(n * r, inp).T)
  _, s, wt = jnp.linalg.svd(rr.T, full_matrices=False)
  valid = _valid(s, rtol)
  return (q @ wt.T) * valid, valid


def core_matrices(b: jax.Array, a: jax.Array, u_b: jax.Array, v_a: jax.Array) -> jax.Array:
  """M_i = (U_B^T B_i)(A_i V_A) [n, Kb, Ka], from the factors (no out x in matrix)."""
  return jnp.einsum("ok,nor->nkr", u_b, b) @ jnp.einsum("nri,ic->nrc", a, v_a)


_basis_b_stack = per_stack(basis_b, static_argnames=("rtol",))
_basis_a_stack = per_stack(basis_a, static_argnames=("rtol",))
_cores_stack = per_stack(core_matrices)


def project_stack(modules, b, a, *, rtol: float = DEFAULT_RTOL, dtype=jnp.float32) -> CoreStack:
  """Projects a stack of modules, b [L, n, out, r] and a [L, n, r, in], into its core space.

  Args:
    modules: the L module names.
    rtol: directions of B_cat / A_cat with singular value <= rtol * max are invalid.
    dtype: computation dtype (float64 needs `jax_enable_x64`).
  """
  b, a = jnp.asarray(b, dtype), jnp.asarray(a, dtype)
  _check_factors(b, a)
  if len(modules) != b.shape[0]:
    raise ValueError(f"core space: need one module name per stacked module ({b.shape[0]}); "
                     f"got {len(modules)}")
  u_b, valid_b = _basis_b_stack(b, rtol=rtol)
  v_a, valid_a = _basis_a_stack(a, rtol=rtol)
  return CoreStack(tuple(modules), u_b, v_a, _cores_stack(b, a, u_b, v_a), valid_b, valid_a)


def reconstruct(stack: CoreStack, merged: jax.Array) -> tuple[jax.Array, jax.Array]:
  """LoRA factors of U_B @ merged @ V_A^T: (b [L, out, Kb] = U_B, a [L, Kb, in]).

  `merged` [L, Kb, Ka]: a merged core (or one task's core, `stack.cores[:, i]`).
  """
  merged = jnp.asarray(merged)
  expected = stack.cores.shape[:1] + stack.cores.shape[2:]
  if merged.shape != expected:
    raise ValueError(f"core space: merged cores must have shape {expected}; got {merged.shape}")
  return stack.u_b, merged @ jnp.swapaxes(stack.v_a, -1, -2)


def core_sizes(stack: CoreStack) -> np.ndarray:
  """[L, 2] valid rows and columns of every module's core (sum_i r_i for generic factors)."""
  valid_b, valid_a = np.asarray(stack.valid_b), np.asarray(stack.valid_a)
  return np.stack([np.sum(valid_b, -1), np.sum(valid_a, -1)], -1)
