"""SVD-based merging methods beside KnOTS, computed from LoRA factors where exact.

Per-module functions take one module's per-task factors `b` [n, out, r] (PEFT
scale folded in, ranks zero-padded) and `a` [n, r, in], or dense task updates
`delta` [n, out, in]; `knots_jax.merging.kernels` compiles them over a stack
of modules (no jit here). Merged updates come back as LoRA factors (`b_m @ a_m`) with no
dense out x in matrix, or as dense matrices for the `*_dense` references.

* "LoRA Merging with SVD: Understanding Interference and Preserving
  Performance" (Tang et al., ICML 2025 workshop R2-FM): direct merge (DM),
  multiplied merge (MM), the DM cross term, MM + Gaussian noise of the cross
  term's norm, SVD_r(MM), the bound ||L_MM - SVD_r(L_MM)||_F <= ||L_DM - L_MM||_F,
  and linear-mode-connectivity helpers (`interpolation_path`, `lmc_barrier`).
* Iso-C / Iso-CTS ("No Task Left Behind", Marczak et al., arXiv:2502.04959):
  flat spectrum on the task-arithmetic sum (Iso-C), on common + task-specific
  directions (Iso-CTS).
* TSV-M ("Task Singular Vectors", Gargiulo et al., CVPR 2025, arXiv:2412.00081):
  per-task truncation, whitening of the concatenated singular vectors (polar factor).
* SFTM ("Superpose Singular Features for Model Merging", Qiu et al.,
  arXiv:2502.10698): coefficients from the linear system (Sigma o U o V) alpha = sigma
  (its components are thresholded per task, against that task's largest value).

Singular components of a zero-padded (or rank-deficient) update have arbitrary
singular vectors; every method here zeroes the components whose singular value
is <= `rtol` times the module's largest one (SFTM: the task's largest), so
results do not depend on them and the factor and dense paths agree. Every LAPACK call of one program depends
on the previous one (see docs/design.md on the jaxlib 0.10 CPU deadlock); the
two polar factors of TSV-M and Iso-CTS share one batched SVD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from knots_jax.methods.entrywise import kth_rank
from knots_jax.methods.truncated_svd import factored_svd

DEFAULT_RTOL = 1e-5
POLAR_RTOL = 1e-6


# ---------------------------------------------------------------- helpers


def check_factors(b, a, ndim: int = 3) -> None:
  """b [..., n, out, r] and a [..., n, r, in] with matching leading axes."""
  if (b.ndim != ndim or a.ndim != ndim or b.shape[:-2] != a.shape[:-2]
      or b.shape[-1] != a.shape[-2]):
    lead = "L, n" if ndim == 4 else "n"
    raise ValueError(f"need b [{lead}, out, r] and a [{lead}, r, in]; got {b.shape} and {a.shape}")


def check_weights(weights, n: int) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.shape != (n,):
    raise ValueError(f"weights must have one entry per adapter ({n}); got shape {weights.shape}")
  return weights


def _cat_b(b: jax.Array) -> jax.Array:
  """[n, out, r] -> B_cat = [B_1, ..., B_n] [out, n r]."""
  n, out, r = b.shape
  return jnp.transpose(b, (1, 0, 2)).reshape(out, n * r)


def _cat_a(a: jax.Array) -> jax.Array:
  """[n, r, in] -> A_cat = [A_1; ...; A_n] [n r, in]."""
  n, r, inp = a.shape
  return a.reshape(n * r, inp)


def _polar_pair(u: jax.Array, v: jax.Array, rtol: float = POLAR_RTOL):
  """Polar factors X (X^T X)^(-1/2) = P Q^T of u [out, k] and v [in, k].

  The orthogonal Procrustes solution nearest to X (TSV-M, Iso-CTS).
  Singular values <= rtol * max are dropped, so zero columns stay zero (the
  polar factor of a rank-deficient X is otherwise not unique). Both share one
  batched SVD (rows zero-padded to max(out, in), which leaves P Q^T unchanged
  up to the padded zero rows).
  """
  out, inp = u.shape[0], v.shape[0]
  rows = max(out, inp)
  x = jnp.stack([jnp.pad(u, ((0, rows - out), (0, 0))), jnp.pad(v, ((0, rows - inp), (0, 0)))])
  p, sv, qt = jnp.linalg.svd(x, full_matrices=False)
  keep = sv > rtol * jnp.max(sv, axis=-1, keepdims=True)
  w = jnp.einsum("brk,bk,bkc->brc", p, keep.astype(x.dtype), qt)
  return w[0, :out], w[1, :inp]


def _fro_factored(b: jax.Array, a: jax.Array) -> jax.Array:
  """||b @ a||_F from b [out, k], a [k, in]: sqrt(sum((b^T b) o (a a^T)))."""
  return jnp.sqrt(jnp.maximum(jnp.sum((b.T @ b) * (a @ a.T)), 0))


# ------------------------------------------------ LoRA Merging with SVD (DM / MM)


def direct_merge(b: jax.Array, a: jax.Array, weights: jax.Array):
  """DM ("LoRA Merging with SVD"): B = sum_i w_i B_i, A = sum_i w_i A_i.

  Keeps LoRA's rank r; the product (sum w_i B_i)(sum w_j A_j) contains the
  cross terms w_i w_j B_i A_j (i != j). The paper defines DM for plain sums
  (§3.2, eq. 2; w = 1); both factors are weighed here, so task i's own term is
  w_i^2 B_i A_i, and L_DM - L_MM (`cross_term`) also holds (w_i^2 - w_i) B_i A_i
  for w != 1 (docs/svd_methods.md). Returns (b_dm [out, r], a_dm [r, in]).
  """
  w = check_weights(weights, b.shape[0])
  return jnp.einsum("n,nor->or", w, b), jnp.einsum("n,nri->ri", w, a)


def multiplied_merge(b: jax.Array, a: jax.Array, weights: jax.Array):
  """MM ("LoRA Merging with SVD"): L_MM = sum_i w_i B_i A_i, exactly.

  Returned as concatenated factors [w_1 B_1, ..., w_n B_n] [out, n r] and
  [A_1; ...; A_n] [n r, in] (rank n r, no dense matrix).
  """
  w = check_weights(weights, b.shape[0])
  return _cat_b(w[:, None, None] * b), _cat_a(a)


def cross_term(b: jax.Array, a: jax.Array, weights: jax.Array):
  """L_DM - L_MM as factors [B_dm, -B_mm] [out, r + n r], [A_dm; A_mm] [r + n r, in].

  Equals sum_{i != j} w_i w_j B_i A_j + sum_i (w_i^2 - w_i) B_i A_i: for w = 1 the M of
  "LoRA Merging with SVD" §3.3, eq. (3); for other weights the whole difference, whose
  diagonal part comes from DM weighing both factors (docs/svd_methods.md).
  """
  b_dm, a_dm = direct_merge(b, a, weights)
  b_mm, a_mm = multiplied_merge(b, a, weights)
  return jnp.concatenate([b_dm, -b_mm], axis=1), jnp.concatenate([a_dm, a_mm], axis=0)


def cross_term_dense(b: jax.Array, a: jax.Array, weights: jax.Array) -> jax.Array:
  """L_DM - L_MM as a dense [out, in] matrix."""
  b_x, a_x = cross_term(b, a, weights)
  return b_x @ a_x


def cross_norm(b, a, weights):
  return _fro_factored(*cross_term(b, a, weights))


def mm_norm(b, a, weights):
  return _fro_factored(*multiplied_merge(b, a, weights))


def cross_term_noise_moments(b: jax.Array, a: jax.Array, weights: jax.Array,
                             key: jax.Array) -> jax.Array:
  """L_MM + N with N_ij ~ N(mean(M), std(M)) i.i.d., M = L_DM - L_MM the cross term.

  The ablation as "LoRA Merging with SVD" states it (§4, "Interference Impact and
  Scaling Effects": "we sample a noise matrix N with N_ij ~ N(mean(M), std(M))");
  mean and standard deviation are over the entries of this module's M. Dense [out, in].
  """
  w = check_weights(weights, b.shape[0])
  m = cross_term_dense(b, a, w)
  g = jax.random.normal(key, m.shape, b.dtype)
  b_mm, a_mm = multiplied_merge(b, a, w)
  return b_mm @ a_mm + jnp.mean(m) + jnp.std(m) * g


def cross_term_noise(b: jax.Array, a: jax.Array, weights: jax.Array, key: jax.Array) -> jax.Array:
  """L_MM + N: DM's cross term replaced by Gaussian noise of the same Frobenius norm
  (`noise="norm"`, an option; the paper's own sampling is `cross_term_noise_moments`).

  The ablation of "LoRA Merging with SVD" that asks whether the cross term
  M = L_DM - L_MM hurts as structure or only as a perturbation of its size.
  N = ||M||_F * G / ||G||_F with G [out, in] i.i.d. standard normal from `key`
  (an isotropic Gaussian direction, so ||N||_F = ||M||_F exactly); ||M||_F
  comes from the factors. N is full-rank, so the result is dense [out, in].
  """
  w = check_weights(weights, b.shape[0])
  target = cross_norm(b, a, w)
  g = jax.random.normal(key, (b.shape[1], a.shape[2]), b.dtype)
  g_norm = jnp.linalg.norm(g)
  b_mm, a_mm = multiplied_merge(b, a, w)
  return b_mm @ a_mm + g * (target / jnp.where(g_norm > 0, g_norm, 1))


# ------------------------------------------------- linear mode connectivity


# ------------------------------------------------------------- Iso-C / Iso-CTS


def _check_mean(mean: str) -> None:
  if mean not in ("nonzero", "full"):
    raise ValueError(f"mean must be 'nonzero' or 'full'; got {mean!r}")


def _flat_value(s: jax.Array, valid: jax.Array, mean: str, full: int) -> jax.Array:
  """sigma_bar = sum(sigma) / count, count = kept components or min(out, in)."""
  total = jnp.sum(jnp.where(valid, s, 0))
  count = jnp.sum(valid) if mean == "nonzero" else full
  return total / jnp.maximum(count, 1).astype(s.dtype)


def iso_c(b: jax.Array, a: jax.Array, scaling: float = 1.0, mean: str = "nonzero",
          rtol: float = DEFAULT_RTOL):
  """Iso-C (Marczak et al., arXiv:2502.04959): alpha * sigma_bar * U V^T of the TA sum.

  Delta_TA = sum_i B_i A_i = U S V^T; the spectrum is replaced by its mean,
  sigma_bar = (1/k) sum_j sigma_j. `mean="nonzero"` averages over the k
  non-zero singular values (the rank of Delta_TA, <= n r); `mean="full"` over
  min(out, in), the authors' `S.mean()` on the dense SVD, whose extra (zero)
  directions are arbitrary for a low-rank sum and are left out here. Exact from
  the factors (QR of B_cat + SVD of an (n r) x in matrix).
  Returns (b_m [out, K] = U, a_m [K, in] = alpha sigma_bar V^T), K = min(out, n r, in).
  """
  _check_mean(mean)
  out, inp = b.shape[1], a.shape[2]
  u, s, vt = factored_svd(_cat_b(b), _cat_a(a))
  valid = s > rtol * jnp.max(s)
  s_bar = _flat_value(s, valid, mean, min(out, inp))
  return u * valid, (scaling * s_bar) * jnp.where(valid[:, None], vt, 0)


def iso_c_dense(delta: jax.Array, scaling: float = 1.0, mean: str = "nonzero",
                rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Iso-C on dense task updates [n, out, in] -> [out, in] (reference)."""
  _check_mean(mean)
  u, s, vt = jnp.linalg.svd(jnp.sum(delta, axis=0), full_matrices=False)
  valid = s > rtol * jnp.max(s)
  s_bar = _flat_value(s, valid, mean, min(delta.shape[1:]))
  return (scaling * s_bar) * (u * valid) @ vt


def iso_cts_sizes(n: int, space: int, common_fraction: float) -> tuple[int, int]:
  """(common components k_c, task-specific components per task d) of Iso-CTS.

  As in the authors' code: k_c = int(space * f), then rounded so that the
  task-specific budget space - k_c is a multiple of n.
  """
  if not 0.0 <= common_fraction <= 1.0:
    raise ValueError(f"common_fraction must be in [0, 1]; got {common_fraction}")
  if space < 1:
    raise ValueError(f"space must be a positive integer; got {space}")
  k_c = int(space * common_fraction)
  specific = round((space - k_c) / n) * n
  if specific > space:
    specific -= n
  return space - specific, specific // n


def _iso_cts_finish(u_ts, s_ts, vt_ts, valid_ts, u_c, s_c, vt_c, valid_c, scaling):
  """Whitening of [U_ts, U_c] and [V_ts, V_c], flat spectrum: the Iso-CTS update."""
  u_all = jnp.concatenate([_cat_b(u_ts * valid_ts[:, None, :]), u_c * valid_c], axis=1)
  vt_all = jnp.concatenate([_cat_a(jnp.where(valid_ts[..., None], vt_ts, 0)),
                            jnp.where(valid_c[:, None], vt_c, 0)], axis=0)
  s_all = jnp.concatenate([s_ts.reshape(-1), s_c])
  valid = jnp.concatenate([valid_ts.reshape(-1), valid_c])
  s_bar = _flat_value(s_all, valid, "nonzero", 0)
  u_o, v_o = _polar_pair(u_all, vt_all.T)
  return u_o, (scaling * s_bar) * v_o.T


def _top(u, s, vt, d: int):
  """Leading d components of batched SVDs [n, out, m], [n, m], [n, m, in], zero-padded."""
  m = s.shape[-1]
  if d > m:
    u = jnp.pad(u, ((0, 0), (0, 0), (0, d - m)))
    s = jnp.pad(s, ((0, 0), (0, d - m)))
    vt = jnp.pad(vt, ((0, 0), (0, d - m), (0, 0)))
  return u[:, :, :d], s[:, :d], vt[:, :d]


def _cts_sizes_traced(space, n: int, common_fraction: float):
  """`iso_cts_sizes` on a traced `space` (the numerical rank of Delta_TA)."""
  k_c = jnp.floor(space * common_fraction).astype(space.dtype)
  specific = jnp.round((space - k_c) / n).astype(space.dtype) * n  # half to even, as round()
  specific = jnp.where(specific > space, specific - n, specific)
  return space - specific, specific // n


def _iso_cts_core(u, s, vt, task_svds, n: int, common_fraction: float, scaling: float,
                  space: int | None, rtol: float):
  """Iso-CTS from the TA SVD (u, s, vt) and a function giving per-task SVDs of
  (I - U_c U_c^T) Delta_i for a masked U_c."""
  if not 0.0 <= common_fraction <= 1.0:
    raise ValueError(f"common_fraction must be in [0, 1]; got {common_fraction}")
  scale = jnp.max(s)
  valid_ta = s > rtol * scale
  if space is None:
    size = jnp.sum(valid_ta).astype(jnp.int32)
  else:
    if isinstance(space, bool) or not isinstance(space, int) or space < 1:
      raise ValueError(f"space must be a positive integer; got {space!r}")
    size = jnp.asarray(min(space, s.shape[0]), jnp.int32)
  k_c, d = _cts_sizes_traced(size, n, common_fraction)
  idx = jnp.arange(s.shape[0])
  valid_c = valid_ta & (idx < k_c)
  u_c, s_c, vt_c = u * valid_c, jnp.where(valid_c, s, 0), jnp.where(valid_c[:, None], vt, 0)
  u_t, s_t, vt_t = task_svds(u_c)                             # [n, out, m], [n, m], [n, m, in]
  valid_t = (s_t > rtol * scale) & (jnp.arange(s_t.shape[1]) < d)
  return _iso_cts_finish(u_t, s_t, vt_t, valid_t, u_c, s_c, vt_c, valid_c, scaling)


def iso_cts(b: jax.Array, a: jax.Array, common_fraction: float = 0.8, scaling: float = 1.0,
            space: int | None = None, rtol: float = DEFAULT_RTOL):
  """Iso-CTS (Marczak et al., arXiv:2502.04959) from the factors, exactly.

  1. Common subspace: the top k_c left/right singular vectors of Delta_TA.
  2. Task-specific: per task, the top d components of
     (I - U_c U_c^T) B_i A_i (a LoRA: project B_i, then QR + small SVD).
  3. Whiten [U_ts, U_c] and [V_ts, V_c] (polar factor), flat spectrum
     sigma_bar = mean of all kept singular values [S_ts, S_c]:
     Delta = alpha * sigma_bar * U_o V_o^T.
  k_c + n d = `space`, the number of directions: the paper uses min(out, in)
  (a full-rank Delta_TA); the default here is the numerical rank of Delta_TA
  (<= n r for LoRAs), so that [U_ts, U_c] can be whitened to orthonormal columns.
  Returns (b_m [out, K + n m], a_m [K + n m, in]) with zero columns for unused slots.
  """
  n = b.shape[0]
  u, s, vt = factored_svd(_cat_b(b), _cat_a(a))

  def task_svds(u_c):
    b_perp = b - jnp.einsum("ok,pk,npr->nor", u_c, u_c, b)  # (I - U_c U_c^T) B_i
    return jax.vmap(factored_svd)(b_perp, a)

  return _iso_cts_core(u, s, vt, task_svds, n, common_fraction, scaling, space, rtol)


def iso_cts_dense(delta: jax.Array, common_fraction: float = 0.8, scaling: float = 1.0,
                  space: int | None = None, rtol: float = DEFAULT_RTOL) -> jax.Array:
  """Iso-CTS on dense task updates [n, out, in] -> [out, in] (reference).

  With a full-rank Delta_TA the default `space` (its numerical rank) is min(out, in),
  as in the paper.
  """
  u, s, vt = jnp.linalg.svd(jnp.sum(delta, axis=0), full_matrices=False)

  def task_svds(u_c):
    return jnp.linalg.svd(delta - jnp.einsum("ok,pk,npi->noi", u_c, u_c, delta),
                          full_matrices=False)

  b_m, a_m = _iso_cts_core(u, s, vt, task_svds, delta.shape[0], common_fraction, scaling,
                           space, rtol)
  return b_m @ a_m


# ---------------------------------------------------------------------- TSV-M


def tsv_default_keep(n: int, out: int, inp: int) -> int:
  """Components kept per task: a fraction 1/n of min(out, in) (TSV-M's default), at least 1."""
  return max(1, min(out, inp) // n)


def _tsv_from_svds(u, s, vt, keep: int, rtol: float, limit=None):
  """Truncate each task to `keep` components, concatenate, whiten: (U_o, S, V_o).

  `limit` (traced, optional): keep only the first `limit` of those `keep`.
  """
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep must be a positive integer; got {keep!r}")
  u, s, vt = _top(u, s, vt, keep)
  valid = s > rtol * jnp.max(s)
  if limit is not None:
    valid = valid & (jnp.arange(keep) < limit)
  u_all = _cat_b(u * valid[:, None, :])
  vt_all = _cat_a(jnp.where(valid[..., None], vt, 0))
  u_o, v_o = _polar_pair(u_all, vt_all.T)
  return u_o, jnp.where(valid, s, 0).reshape(-1), v_o


def tsv_whitened(b: jax.Array, a: jax.Array, keep: int | None = None, rtol: float = DEFAULT_RTOL):
  """TSV-M's whitened bases from the factors: (U_o [out, n k], S [n k], V_o [in, n k]).

  Per task the SVD of B_i A_i (QR of B_i + SVD of an r x in matrix), its top
  `keep` components; U_o, V_o are the polar factors of the concatenations
  [U_1..U_n], [V_1..V_n] (orthonormal columns where n k <= out, in).
  """
  n, out, _ = b.shape
  keep = tsv_default_keep(n, out, a.shape[2]) if keep is None else keep
  return _tsv_from_svds(*jax.vmap(factored_svd)(b, a), keep, rtol)


def tsv_merge(b: jax.Array, a: jax.Array, keep: int | None = None, scaling: float = 1.0,
              rtol: float = DEFAULT_RTOL):
  """TSV-M (Gargiulo et al., arXiv:2412.00081): alpha * U_o blockdiag(S_i) V_o^T.

  Returns factors (b_m [out, n k] = U_o, a_m [n k, in] = alpha S V_o^T); exact
  from the LoRA factors, O(n (out + in) r^2 + (out + in) (n k)^2).
  """
  u_o, s, v_o = tsv_whitened(b, a, keep, rtol)
  return u_o, scaling * s[:, None] * v_o.T


def tsv_merge_dense(delta: jax.Array, keep: int | None = None, scaling: float = 1.0,
                    rtol: float = DEFAULT_RTOL) -> jax.Array:
  """TSV-M on dense task updates [n, out, in] -> [out, in] (reference)."""
  n, out, inp = delta.shape
  keep = tsv_default_keep(n, out, inp) if keep is None else keep
  u_o, s, v_o = _tsv_from_svds(*jnp.linalg.svd(delta, full_matrices=False), keep, rtol)
  return scaling * (u_o * s) @ v_o.T


def tsv_merge_ranked(delta: jax.Array, rank: jax.Array, scaling: float = 1.0,
                     rtol: float = DEFAULT_RTOL) -> jax.Array:
  """TSV-M on dense per-task matrices [n, R, C] that live in a rank-`rank` space.

  For the small matrices of the Core Space (core matrices M_i) and of KnOTS
  (V_i^T): as in the Core Space authors' code, each task keeps
  floor(rank / n) components (at least 1), where `rank` (traced) is the number
  of valid directions of the space (the padded R, C would overcount it).
  Components with sigma <= rtol * sigma_max are dropped, so a task whose matrix
  has fewer than floor(rank / n) non-zero singular values contributes only those.
  The authors' code (task_merger.py, get_tsv_delta_w) keeps the zero-sigma ones
  too: their singular vectors, an arbitrary basis of null spaces, enter the
  whitening, so its result is not a function of the inputs (docs/svd_methods.md).
  Returns the merged [R, C].
  """
  n = delta.shape[0]
  u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
  limit = jnp.maximum(rank // n, 1)
  u_o, s_all, v_o = _tsv_from_svds(u, s, vt, s.shape[-1], rtol, limit=limit)
  return scaling * (u_o * s_all) @ v_o.T


# ----------------------------------------------------------------------- SFTM


def sftm_system(u: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
  """G = Sigma o U o V with G[p, q] = sigma_q (u_p^T u_q)(v_q^T v_p) (§3.2, eq. (4)).

  u [out, N], s [N], v [in, N]: all tasks' components, flattened (p = (i, k)).
  G alpha = sigma (the paper's eq. (3)) says u_p^T M v_p = sigma_p for
  M = sum_q alpha_q sigma_q u_q v_q^T: every task's singular feature keeps its
  gain through the merged matrix. G = `sftm_gram(u, v) @ diag(s)`.
  """
  return sftm_gram(u, v) * s[None, :]


def sftm_gram(u: jax.Array, v: jax.Array) -> jax.Array:
  """H[p, q] = (u_p^T u_q)(v_p^T v_q) = <u_p v_p^T, u_q v_q^T>_F, u [out, N], v [in, N].

  The Gram matrix of the rank-one features E_q = u_q v_q^T: symmetric positive
  semi-definite with unit diagonal, and free of the singular values, so its
  conditioning is that of the features' geometry, not of the spectra. Full
  float32 products (GPUs may otherwise use TF32, ~1e-3, for float32 matmuls).
  """
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(u.T, u, precision=hi) * jnp.matmul(v.T, v, precision=hi)


def sftm_valid(s: jax.Array, rtol: float) -> jax.Array:
  """Components kept: sigma_ik > rtol * max_k sigma_ik, per task i (s [n, m]).

  The paper keeps every component of every task (Algorithm 1); only the
  numerically zero ones (zero padding, rank deficiency: arbitrary vectors) go.
  Relative to the task's own largest value, so a task with a small update is
  kept whole; a task that is all zero has none.
  """
  return s > rtol * jnp.max(s, axis=-1, keepdims=True)


def _sftm_solve(u, s, vt, gamma: float, rtol: float):
  """Flattens per-task SVDs [n, out, m], [n, m], [n, m, in]; solves for alpha; M factors.

  With beta = sigma o alpha, eq. (4) G alpha = sigma is H beta = sigma
  (`sftm_gram`), and M = sum_q beta_q u_q v_q^T. H is solved by its
  eigendecomposition, eigenvalues <= N eps lambda_max dropped (the usual
  numerical-rank cutoff): least squares, minimum-norm in beta where H is
  singular; every solution gives the same M, since H's null space is
  {beta : sum_q beta_q E_q = 0}. Solving G itself (lstsq) puts the spread of
  the singular values into its conditioning, and in float32 its cutoff dropped
  directions of decaying spectra (measured at eta = 0.2: M off by 2-15 %,
  eq. (3) by 3-10 % of sigma_max, a false "singular" warning); H's eigenvalues
  do not depend on them (float32 gives float64's M to ~1e-5 there). Dropped
  components get H[q, q] = 1, sigma_q = 0 (so beta_q = 0); `deficient` is
  rank(H) < N, i.e. a truly (numerically) singular system, e.g. two identical
  tasks.
  """
  n, out, m = u.shape
  valid = sftm_valid(s, rtol)
  flat = valid.reshape(-1)
  u_all = _cat_b(u * valid[:, None, :])
  vt_all = _cat_a(jnp.where(valid[..., None], vt, 0))
  s_all = jnp.where(valid, s, 0).reshape(-1)
  h = sftm_gram(u_all, vt_all.T)
  h = jnp.where(flat[:, None] & flat[None, :], h, jnp.eye(h.shape[0], dtype=h.dtype))
  lam, q = jnp.linalg.eigh(h)
  keep = lam > h.shape[0] * jnp.finfo(h.dtype).eps * lam[-1]
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  hi = jax.lax.Precision.HIGHEST
  beta = jnp.where(flat, jnp.matmul(q, inv * jnp.matmul(q.T, s_all, precision=hi),
                                    precision=hi), 0)
  alpha = jnp.where(flat, beta / jnp.where(flat, s_all, 1), 0)
  deficient = jnp.sum(keep) < h.shape[0]
  return u_all, (gamma * beta)[:, None] * vt_all, alpha.reshape(n, m), deficient


def sftm(b: jax.Array, a: jax.Array, gamma: float = 1.0, rtol: float = DEFAULT_RTOL):
  """SFTM (Qiu et al., arXiv:2502.10698) from the factors, without trimming (eta = 1).

  M_i = B_i A_i = sum_k sigma_ik u_ik v_ik^T (QR + small SVD per task); alpha
  solves (Sigma o U o V) alpha = sigma (eq. (4), see `_sftm_solve`: least
  squares where singular); the update is gamma * M, M = sum alpha_ik sigma_ik
  u_ik v_ik^T (eq. (1)). Components <= rtol * the task's largest are dropped.
  Returns (b_m [out, n m], a_m [n m, in], alpha [n, m], rank_deficient).
  Entry-wise trimming (eta < 1) breaks the low-rank structure: use `sftm_dense`.
  """
  return _sftm_solve(*jax.vmap(factored_svd)(b, a), gamma, rtol)


def trim_top(delta: jax.Array, eta: float) -> jax.Array:
  """TIES-style trim per task: keep entries with |x| >= the (d - int(d eta))-th smallest |x|.

  delta [n, ...]; d = the entries of one task's tensor. Algorithm 2 keeps "top
  eta parameters by magnitude in each M_i" (line 5) and "in each tau_i"
  (line 11, biases, embeddings, norms), each on its own, before the merge.
  eta = 1 keeps all.
  """
  if not 0.0 < eta <= 1.0:
    raise ValueError(f"eta must be in (0, 1]; got {eta}")
  n = delta.shape[0]
  flat = jnp.abs(delta.reshape(n, -1))
  k = kth_rank(flat.shape[1], eta)
  if k == 0:
    return delta
  kth = jnp.sort(flat, axis=1)[:, k - 1].reshape((n,) + (1,) * (delta.ndim - 1))
  return jnp.where(jnp.abs(delta) >= kth, delta, 0)


def sftm_dense(delta: jax.Array, eta: float = 1.0, gamma: float = 1.0,
               rtol: float = DEFAULT_RTOL):
  """SFTM on dense task updates [n, out, in]: top-eta trim, SVD, linear system.

  Algorithm 2 lines 5-7 for one layer: trim each M_i (`trim_top`), then
  Algorithm 1 (`_sftm_solve`); the update is gamma M.
  Returns (update [out, in] = gamma M, alpha [n, min(out, in)], rank_deficient).
  """
  trimmed = trim_top(delta, eta)
  b_m, a_m, alpha, deficient = _sftm_solve(*jnp.linalg.svd(trimmed, full_matrices=False),
                                           gamma, rtol)
  return b_m @ a_m, alpha, deficient


