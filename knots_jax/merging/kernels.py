"""The compiled programs of a merge: the one jit boundary over the methods' math.

The math of one module lives in `knots_jax.methods` as pure functions of
arrays, with no jit; here each becomes a program over a stack `[L, ...]`
(`parallel.programs.per_stack`: jit of vmap, hyper-parameters that change
shapes static), plus the few programs over a whole stack (DARE's masks, TIES'
per-layer thresholds and signs) and the table that maps each factor / matrix
method of `methods.registry` to its program. `merging.orchestrate` and
`merging.combine` call only these.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax import checks
from knots_jax.methods import entrywise, svd_family, truncated_svd
from knots_jax.methods.options import MergeConfig
from knots_jax.parallel.programs import per_stack

# ------------------------------------------------------------- random keys


def module_keys(seed: int, modules: Sequence[str]) -> jax.Array:
  """One PRNG key per module, from the seed and the module's name only: [L] keys.

  The one random-key scheme of the package (DARE's masks, mm_noise's noise): a
  module's draws do not depend on which stack it sits in, where, or how many
  devices the stack is sharded over.
  """
  seed = checks.named("seed", checks.seed, seed)
  codes = jnp.asarray([zlib.crc32(m.encode()) for m in modules], jnp.uint32)
  base = jax.random.key(seed)
  return jax.vmap(lambda c: jax.random.fold_in(base, c))(codes)


def keep_probability(drop_rate: float) -> np.ndarray:
  """1 - p as a host scalar of the dtype a Python float gets in JAX (float32, or
  float64 with x64): the masks and rescaling equal those of a static p."""
  return np.asarray(1.0 - drop_rate, jax.dtypes.canonicalize_dtype(np.float64))


@jax.jit
def dare_stack(rep: jax.Array, keys: jax.Array, keep_prob) -> jax.Array:
  """DARE of a stack with one key per module (`module_keys`). `keep_prob` (1 - p)
  is traced: a search over p compiles once. A stack padded for a mesh is longer
  than `keys`: its padding rows (zero) stay zero."""
  length = keys.shape[0]
  keep = jax.vmap(lambda k: entrywise.keep_mask(k, rep.shape[1:], keep_prob))(keys)
  keep = jnp.pad(keep, [(0, rep.shape[0] - length)] + [(0, 0)] * (rep.ndim - 1))
  return entrywise.rescale_kept(rep, keep, keep_prob)


# ------------------------------------------------------- entry-wise methods

sum_stack = per_stack(entrywise.task_arithmetic, in_axes=(0, None))
mean_stack = per_stack(entrywise.average, in_axes=(0, None))
matmul = jax.jit(jnp.matmul)


@jax.jit
def sign_sum_stack(rep: jax.Array, threshold: jax.Array) -> jax.Array:
  """Sum of elected signs of every module: [L]; threshold [n] or [L, n]."""
  in_thr = 0 if threshold.ndim == 2 else None
  pruned = jax.vmap(lambda x, t: jnp.where(entrywise.magnitude_mask(x, t), x, 0),
                    in_axes=(0, in_thr))(rep, threshold)
  return jax.vmap(entrywise.sign_sum)(pruned)


@jax.jit
def sign_total_stack(rep: jax.Array, threshold: jax.Array) -> jax.Array:
  """Sum of elected signs over the whole stack: a scalar."""
  return jnp.sum(sign_sum_stack(rep, threshold))


@jax.jit
def majority_sign(totals: Sequence[jax.Array]) -> jax.Array:
  """Sign of the sum of the per-stack totals (one sign for the whole model)."""
  return jnp.sign(sum(totals))


@jax.jit
def ties_stack(rep: jax.Array, threshold: jax.Array, majority: jax.Array, scaling) -> jax.Array:
  """TIES of every module; threshold [n] or [L, n]; majority scalar or [L]."""
  in_thr = 0 if threshold.ndim == 2 else None
  in_maj = 0 if majority.ndim == 1 else None
  return jax.vmap(entrywise.ties, in_axes=(0, in_thr, in_maj, None))(
      rep, threshold, majority, scaling)


@jax.jit
def layer_thresholds(rep: jax.Array, valid: jax.Array, ranks: jax.Array) -> jax.Array:
  """Per module and task, the ranks[l]-th smallest valid magnitude: [L, n]."""
  L, n = rep.shape[:2]
  mag = jnp.where(valid[:, None, :, None], jnp.abs(rep), jnp.inf).reshape(L, n, -1)
  ordered = jnp.sort(mag, axis=-1)
  picked = jnp.take_along_axis(ordered, jnp.maximum(ranks - 1, 0)[:, None, None], axis=-1)[..., 0]
  return jnp.where(ranks[:, None] > 0, picked, 0).astype(rep.dtype)


@jax.jit
def unscaled_v(rep: jax.Array, s: jax.Array, valid: jax.Array) -> jax.Array:
  """V_i^T = diag(s)^-1 rep_i on the valid components (0 elsewhere): [L, n, K, C]."""
  scale = jnp.where(valid, s, 1)[:, None, :, None]
  return jnp.where(valid[:, None, :, None], rep / scale, 0)


# ---------------------------------------------- truncation (SVD_r, exports)

_truncate_factors = per_stack(truncated_svd.truncate_factors_one, static_argnames=("rank",))
_truncate_dense = per_stack(truncated_svd.truncate_dense_one, static_argnames=("rank",))


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
  return _truncate_factors(b, a, rank=rank)


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
  return _truncate_dense(delta, rank=rank)


# ------------------------------------------- LoRA Merging with SVD (DM / MM)

direct_merge_stack = per_stack(svd_family.direct_merge, in_axes=(0, 0, None))
multiplied_merge_stack = per_stack(svd_family.multiplied_merge, in_axes=(0, 0, None))
cross_term_stack = per_stack(svd_family.cross_term, in_axes=(0, 0, None))
_cross_norm_stack = per_stack(svd_family.cross_norm, in_axes=(0, 0, None))
_mm_norm_stack = per_stack(svd_family.mm_norm, in_axes=(0, 0, None))
_NOISE = {"moments": per_stack(svd_family.cross_term_noise_moments, in_axes=(0, 0, None, 0)),
          "norm": per_stack(svd_family.cross_term_noise, in_axes=(0, 0, None, 0))}


def _checked_stack(b, a, weights):
  b, a = jnp.asarray(b), jnp.asarray(a)
  svd_family.check_factors(b, a, ndim=4)
  return b, a, svd_family.check_weights(weights, b.shape[1])


def svd_r_error_bound(b: jax.Array, a: jax.Array, weights, rank: int | None = None):
  """Both sides of the bound of "LoRA Merging with SVD" for a stack of modules.

  Args:
    b: [L, n, out, r]; a: [L, n, r, in]; weights: [n].
    rank: r of SVD_r (default: the padded LoRA rank r, the rank of L_DM).

  Returns:
    (truncation_error [L] = ||L_MM - SVD_r(L_MM)||_F,
     cross_term_error [L] = ||L_DM - L_MM||_F).
  Since rank(L_DM) <= r and SVD_r(L_MM) is the best rank-r approximation of
  L_MM (Eckart-Young), truncation_error <= cross_term_error whenever
  `rank` >= r. SVD_r comes from `truncate_factors` (no dense matrix).
  """
  b, a, weights = _checked_stack(b, a, weights)
  rank = b.shape[-1] if rank is None else rank
  b_mm, a_mm = multiplied_merge_stack(b, a, weights)
  _, _, rel = truncate_factors(b_mm, a_mm, rank)
  trunc = rel * _mm_norm_stack(b, a, weights)
  return trunc, _cross_norm_stack(b, a, weights)


def svd_r_error_bound_holds(b, a, weights, rank: int | None = None,
                            rtol: float = 1e-6) -> np.ndarray:
  """[L] booleans: ||L_MM - SVD_r(L_MM)||_F <= ||L_DM - L_MM||_F (to rounding)."""
  trunc, cross = svd_r_error_bound(b, a, weights, rank)
  trunc, cross = np.asarray(trunc), np.asarray(cross)
  return trunc <= cross + rtol * np.maximum(trunc, 1e-30)


def mm_svd_stack(b, a, weights, rank: int | None = None):
  """SVD_r(L_MM) for a stack: the best rank-`rank` LoRA of sum_i w_i B_i A_i.

  The merge proposed by "LoRA Merging with SVD": MM's update, truncated back to
  LoRA's rank (B = U_r, A = S_r V_r^T), from the factors (`truncate_factors`).
  b [L, n, out, r], a [L, n, r, in], weights [n]; rank defaults to the padded r.
  Returns (b_r [L, out, rank], a_r [L, rank, in]).
  """
  b, a, weights = _checked_stack(b, a, weights)
  rank = b.shape[-1] if rank is None else rank
  b_r, a_r, _ = truncate_factors(*multiplied_merge_stack(b, a, weights), rank)
  return b_r, a_r


def cross_term_noise_stack(b, a, weights, seed: int, modules: Sequence[str],
                           noise: str = "norm") -> jax.Array:
  """L_MM + noise over a stack b [L, n, out, r], a [L, n, r, in] -> [L, out, in]: noise
  "moments" (the paper's N(mean(M), std(M))) or "norm" (of ||M||_F, zero mean).

  Module l draws its noise from `module_keys(seed, modules)[l]`: deterministic
  given the seed, independent across modules.
  """
  b, a, weights = _checked_stack(b, a, weights)
  if len(modules) != b.shape[0]:
    raise ValueError(f"need one module name per stacked module ({b.shape[0]}); got {len(modules)}")
  return _NOISE[noise](b, a, weights, module_keys(seed, modules))


# ------------------------------------------------ Iso-C, Iso-CTS, TSV-M, SFTM

iso_c_stack = per_stack(svd_family.iso_c, static_argnames=("scaling", "mean", "rtol"))
iso_c_dense_stack = per_stack(svd_family.iso_c_dense, static_argnames=("scaling", "mean", "rtol"))
iso_cts_stack = per_stack(svd_family.iso_cts,
                          static_argnames=("common_fraction", "scaling", "space", "rtol"))
iso_cts_dense_stack = per_stack(svd_family.iso_cts_dense,
                                static_argnames=("common_fraction", "scaling", "space", "rtol"))
tsv_merge_stack = per_stack(svd_family.tsv_merge, static_argnames=("keep", "scaling", "rtol"))
tsv_merge_dense_stack = per_stack(svd_family.tsv_merge_dense,
                                  static_argnames=("keep", "scaling", "rtol"))
tsv_merge_ranked_stack = per_stack(svd_family.tsv_merge_ranked, static_argnames=("scaling", "rtol"))
_sftm_stack = per_stack(svd_family.sftm, static_argnames=("gamma", "rtol"))
_sftm_dense_stack = per_stack(svd_family.sftm_dense, static_argnames=("eta", "gamma", "rtol"))


def _warn_singular(deficient, modules=None) -> None:
  """Warns for the modules whose SFTM system is singular at the compute precision: the
  Gram matrix of the features u_q v_q^T has rank < N (e.g. two identical tasks), not
  merely a wide spread of singular values (`svd_family._sftm_solve`)."""
  bad = np.flatnonzero(np.asarray(deficient))
  if bad.size:
    names = [modules[i] for i in bad] if modules is not None else bad.tolist()
    warnings.warn(f"SFTM: the system (Sigma o U o V) alpha = sigma is singular for "
                  f"{len(bad)} module(s) {names[:5]} (some tasks' singular features are "
                  f"linearly dependent, e.g. duplicate tasks); used the least-squares "
                  f"solution", RuntimeWarning, stacklevel=3)


def sftm_stack(b, a, gamma: float = 1.0, rtol: float = svd_family.DEFAULT_RTOL, modules=None):
  """SFTM over a stack b [L, n, out, r], a [L, n, r, in]; warns where the system is singular.

  Components are kept per task (sigma > rtol * that task's largest).
  Returns (b_m [L, out, n m], a_m [L, n m, in], alpha [L, n, m]).
  """
  b, a = jnp.asarray(b), jnp.asarray(a)
  svd_family.check_factors(b, a, ndim=4)
  b_m, a_m, alpha, deficient = _sftm_stack(b, a, gamma=gamma, rtol=rtol)
  _warn_singular(deficient, modules)
  return b_m, a_m, alpha


def sftm_dense_stack(delta, eta: float = 1.0, gamma: float = 1.0,
                     rtol: float = svd_family.DEFAULT_RTOL, modules=None):
  """SFTM over dense updates [L, n, out, in]; returns (update [L, out, in], alpha)."""
  delta = jnp.asarray(delta)
  if delta.ndim != 4:
    raise ValueError(f"sftm_dense_stack needs delta [L, n, out, in]; got shape {delta.shape}")
  update, alpha, deficient = _sftm_dense_stack(delta, eta=eta, gamma=gamma, rtol=rtol)
  _warn_singular(deficient, modules)
  return update, alpha


# ------------------- DM with TIES / DARE ("LoRA Merging with SVD", §3.2, Table 1)

# fold_in data of each factor's DARE masks: module l's B_i from fold_in(key_l, 0), its A_i
# from fold_in(key_l, 1) (key_l = module_keys(seed, modules)[l]).
DM_MASK_STREAMS = {"b": 0, "a": 1}


@jax.jit
def used_components(b: jax.Array, a: jax.Array) -> jax.Array:
  """Per module and task, the LoRA components in use (B_i's column or A_i's row non-zero):
  the rank of each zero-padded factor, [L, n]."""
  return jnp.sum(jnp.any(b != 0, axis=2) | jnp.any(a != 0, axis=3), axis=-1)


def _padded_kth_ranks(used: np.ndarray, size: int, padded: int, top_k: float) -> np.ndarray:
  """Per module and task, the rank among all `padded * size` entries of a zero-padded factor
  of the `entrywise.kth_rank`-th smallest of its `used * size` real magnitudes: the padding
  zeros sort first, so a rank shifts by their number (0, keep all, stays 0)."""
  kth = np.vectorize(lambda c: entrywise.kth_rank(int(c), top_k), otypes=[np.int64])(used * size)
  return np.where(kth > 0, kth + (padded - used) * size, 0).astype(np.int32)


def _dm_ties_one(b, a, rank_b, rank_a, weights):
  """TIES on the stacked B_i and, separately, on the stacked A_i of one module."""
  return entrywise.ties_tensor(b, rank_b, weights), entrywise.ties_tensor(a, rank_a, weights)


_dm_ties_stack = per_stack(_dm_ties_one, in_axes=(0, 0, 0, 0, None))


def dm_ties_stack(b, a, weights, top_k: float, used=None):
  """DM-TIES over a stack b [L, n, out, r], a [L, n, r, in]: (B_m [L, out, r], A_m [L, r, in]).

  TIES (`entrywise.ties_tensor`) per module and per factor, with weights [n] (alpha w_i)
  on each factor's kept values, as DM weighs both factors: B_m A_m is quadratic in alpha.
  Task i's threshold counts only its `used` components (`used_components` of these
  factors unless given), so top_k is a share of its unpadded B_i (out x r_i) and A_i.
  """
  b, a, weights = _checked_stack(b, a, weights)
  used = np.asarray(used_components(b, a) if used is None else used)
  _, _, out, r = b.shape
  rank_b = _padded_kth_ranks(used, out, r, top_k)
  rank_a = _padded_kth_ranks(used, a.shape[-1], r, top_k)
  return _dm_ties_stack(b, a, jnp.asarray(rank_b), jnp.asarray(rank_a), weights)


@jax.jit
def dare_factors_stack(b: jax.Array, a: jax.Array, keys: jax.Array, keep_prob):
  """DARE (drop, rescale by 1 / keep_prob) of both factors of every module, each factor with
  its own masks (`DM_MASK_STREAMS`); one key per module (`module_keys`)."""
  def stream(name):
    return jax.vmap(lambda k: jax.random.fold_in(k, DM_MASK_STREAMS[name]))(keys)
  return dare_stack(b, stream("b"), keep_prob), dare_stack(a, stream("a"), keep_prob)


def dm_dare_stack(b, a, weights, drop_rate: float, seed: int, modules: Sequence[str],
                  top_k: float | None = None):
  """DM-DARE (top_k None: DARE on each factor, then DM) or DM-DARE-TIES (DARE, then
  `dm_ties_stack` with the thresholds counted on the factors before the drop).

  b [L, n, out, r], a [L, n, r, in], weights [n]; module l draws its masks from
  `module_keys(seed, modules)[l]`. Returns (B_m [L, out, r], A_m [L, r, in]).
  """
  b, a, weights = _checked_stack(b, a, weights)
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"DARE drop rate must be in [0, 1), got {drop_rate}")
  if len(modules) != b.shape[0]:
    raise ValueError(f"need one module name per stacked module ({b.shape[0]}); got {len(modules)}")
  used = None if top_k is None else used_components(b, a)
  b_d, a_d = dare_factors_stack(b, a, module_keys(seed, modules), keep_probability(drop_rate))
  if top_k is None:
    return direct_merge_stack(b_d, a_d, weights)
  return dm_ties_stack(b_d, a_d, weights, top_k, used=used)


# ------------------------------------- the programs of the methods' table rows

FactorKernel = Callable[[jax.Array, jax.Array, MergeConfig, Sequence[str]], object]
MatrixKernel = Callable[[jax.Array, jax.Array, MergeConfig], jax.Array]


def _uniform_weights(b: jax.Array, config) -> jax.Array:
  """alpha * w_i per task [n] (alpha for all without `weights`): DM, MM weigh both factors."""
  n = b.shape[1]
  return jnp.asarray(np.broadcast_to(config.task_scaling(n), (n,)), b.dtype)


def _weighted_b(b: jax.Array, config) -> jax.Array:
  """w_i B_i (so w_i dW_i): methods whose alpha is applied after them (Iso-C, Iso-CTS,
  TSV-M, SFTM) weigh each task's update first; unchanged without `weights`."""
  if not config.weights:
    return b
  w = config.task_weights(b.shape[1])
  return b * jnp.asarray(w, b.dtype)[None, :, None, None]


def _sftm(b, a, config: MergeConfig, modules):
  """SFTM from the factors (eta = 1), or with its top-eta trim on the dense updates."""
  if config.eta == 1.0:
    return sftm_stack(b, a, gamma=config.scaling, modules=modules)[:2]
  return sftm_dense_stack(jnp.matmul(b, a), eta=config.eta, gamma=config.scaling,
                          modules=modules)[0]


# combine == "factors": (b [L,n,out,r], a [L,n,r,in], config, modules) -> (b_m, a_m) or delta
FACTOR_KERNELS: Mapping[str, FactorKernel] = {
    "direct_merge": lambda b, a, c, modules: direct_merge_stack(
        b, a, _uniform_weights(b, c)),
    "dm_ties": lambda b, a, c, modules: dm_ties_stack(b, a, _uniform_weights(b, c), c.top_k),
    "dm_dare": lambda b, a, c, modules: dm_dare_stack(
        b, a, _uniform_weights(b, c), c.drop_rate, c.seed, modules),
    "dm_dare_ties": lambda b, a, c, modules: dm_dare_stack(
        b, a, _uniform_weights(b, c), c.drop_rate, c.seed, modules, top_k=c.top_k),
    "mm_svd": lambda b, a, c, modules: mm_svd_stack(
        b, a, _uniform_weights(b, c), rank=c.output_rank or None),
    "mm_noise": lambda b, a, c, modules: cross_term_noise_stack(
        b, a, _uniform_weights(b, c), c.seed, modules, noise=c.noise),
    "iso_c": lambda b, a, c, modules: iso_c_stack(_weighted_b(b, c), a, scaling=c.scaling),
    "iso_cts": lambda b, a, c, modules: iso_cts_stack(
        _weighted_b(b, c), a, common_fraction=c.common_fraction, scaling=c.scaling),
    "tsv_m": lambda b, a, c, modules: tsv_merge_stack(
        _weighted_b(b, c), a, keep=c.tsv_keep or None, scaling=c.scaling),
    "sftm": lambda b, a, c, modules: _sftm(_weighted_b(b, c), a, c, modules),
}


def _knots_tsv(v, rank, config: MergeConfig):
  """TSV-M on KnOTS' V_i^T keeping every component. For generic LoRAs (sum r_i <=
  out) the V_i^T are partial isometries (sum_i V_i^T V_i = I_K, ranks adding up),
  so all their singular values are 1 and a truncation would pick an arbitrary
  subspace; keeping all leaves the whitening, which is well defined."""
  return tsv_merge_dense_stack(v, keep=min(v.shape[-2:]), scaling=config.scaling)


def weighted_matrices(x: jax.Array, config) -> jax.Array:
  """w_i x_i for x [L, n, R, C] (the core matrices or V_i^T are linear in task i's update)."""
  if not config.weights:
    return x
  return x * jnp.asarray(config.task_weights(x.shape[1]), x.dtype)[None, :, None, None]


# combine == "matrices": (x [L,n,R,C], rank [L], config) -> merged [L,R,C]; the core
# matrices M_i (`core_*`) or KnOTS' V_i^T (`knots_tsv_m`); `rank` is the size of that space.
MATRIX_KERNELS: Mapping[str, MatrixKernel] = {
    "knots_tsv_m": _knots_tsv,
    "core_tsv_m": lambda x, rank, c: tsv_merge_ranked_stack(x, rank, scaling=c.scaling),
    "core_iso_c": lambda x, rank, c: iso_c_dense_stack(x, scaling=c.scaling),
    "core_iso_cts": lambda x, rank, c: iso_cts_dense_stack(
        x, common_fraction=c.common_fraction, scaling=c.scaling),
}


# ------------------------------------------------- checks of a merged stack


@jax.jit
def factored_summary(b: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Of a merged LoRA stack b [L, out, k], a [L, k, in], in one program: per module, whether
  the bound k max|b| max|a| of every entry of b @ a is finite [L]; and the components that
  are non-zero in some module [k] (the rank of the exact PEFT export)."""
  bound = b.shape[-1] * jnp.max(jnp.abs(b), axis=(1, 2)) * jnp.max(jnp.abs(a), axis=(1, 2))
  used = jnp.any(b != 0, axis=(0, 1)) & jnp.any(a != 0, axis=(0, 2))
  return jnp.isfinite(bound), used


@jax.jit
def dense_finite(delta: jax.Array) -> jax.Array:
  """Per module of a dense stack [L, out, in]: every entry finite [L]."""
  return jnp.all(jnp.isfinite(delta), axis=(1, 2))
