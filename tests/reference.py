"""Float64 NumPy references of the merging methods, written from the papers.

No code is shared with the package. The KnOTS part follows the reference
implementation step by step (DESIGN.md §3), on a whole model flattened into
one vector per task (sorted module names): dense SVD per layer, components
with singular value > tol, `diag(s) V_i^T` per task, TIES with `kthvalue`-style
thresholds over the whole model, sign election with zeros to the majority,
scaling before the disjoint mean, DARE with keep masks passed in.

The SVD-based methods (Iso-C, Iso-CTS, TSV-M, SFTM) are written from their
papers' equations on dense matrices; the Core Space reference builds the
authors' unpadded cores (U_B from the SVD of [B_1 .. B_n], V_A from that of
[A_1; ..; A_n], M_i = U_B^T B_i A_i V_A) and merges them with the same functions.
Singular components with sigma <= RTOL * sigma_max are dropped throughout
(their singular vectors are arbitrary).
"""

from __future__ import annotations

import numpy as np


def flatten(per_module: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
  """{module: [n, ...]} -> [n, d] in sorted module order, plus the layout."""
  names = sorted(per_module)
  layout = [(m, per_module[m].shape[1:]) for m in names]
  flat = np.concatenate([per_module[m].reshape(per_module[m].shape[0], -1) for m in names], axis=1)
  return flat, layout


def unflatten(vector: np.ndarray, layout) -> dict[str, np.ndarray]:
  out, start = {}, 0
  for m, shape in layout:
    size = int(np.prod(shape))
    out[m] = vector[start:start + size].reshape(shape)
    start += size
  return out


def topk_values_mask(x: np.ndarray, top_k: float) -> np.ndarray:
  """Per row of x [n, d]: keep |x| >= the (d - int(d K))-th smallest |x|."""
  k_frac = top_k / 100 if top_k > 1 else top_k
  n, d = x.shape
  if k_frac >= 1:
    return np.ones_like(x, bool)
  k = d - int(d * k_frac)
  kth = np.sort(np.abs(x), axis=1)[:, k - 1:k]
  return np.abs(x) >= kth


def resolve_sign(x: np.ndarray) -> np.ndarray:
  sign = np.sign(x.sum(axis=0))
  majority = np.sign(sign.sum())
  sign[sign == 0] = majority
  return sign


def disjoint_merge(x: np.ndarray, sign: np.ndarray) -> np.ndarray:
  keep = np.where(sign[None] > 0, x > 0, x < 0)
  selected = x * keep
  count = (selected != 0).sum(axis=0)
  return selected.sum(axis=0) / np.maximum(count, 1)


def ties_merge(flat: np.ndarray, top_k: float, scaling: float) -> np.ndarray:
  pruned = flat * topk_values_mask(flat, top_k)
  sign = resolve_sign(pruned)
  return disjoint_merge(scaling * pruned, sign)


def dare(flat: np.ndarray, keep: np.ndarray, p: float) -> np.ndarray:
  return np.where(keep, flat / (1 - p), 0.0)


def knots_decompose(deltas: dict[str, np.ndarray], tol: float = 1e-5):
  """Per module: U [out, k] and per-task diag(s) V_i^T [n, k, in] (column-wise)."""
  us, reps = {}, {}
  for m, d in deltas.items():
    n, out, inp = d.shape
    cat = np.concatenate(list(d), axis=1)
    u, s, vt = np.linalg.svd(cat, full_matrices=False)
    keep = s > tol
    u, s, vt = u[:, keep], s[keep], vt[keep]
    us[m] = u
    reps[m] = np.stack([s[:, None] * vt[:, i * inp:(i + 1) * inp] for i in range(n)])
  return us, reps


def _merge_values(values: dict[str, np.ndarray], base: str, scaling: float, top_k: float,
                  drop_rate: float, keep_masks, weights=None) -> dict[str, np.ndarray]:
  """TA / mean / TIES / DARE(-TIES) over {module: [n, ...]}, one vector per task.

  weights [n]: task i's values count w_i times (TA: sum w_i x_i; TIES: the
  pruned values after the sign election, as PEFT's `ties` does)."""
  flat, layout = flatten(values)
  n = flat.shape[0]
  w = scaling * (np.ones(n) if weights is None else np.asarray(weights, float))
  if base in ("dare", "dare_ties"):
    masks, _ = flatten({m: keep_masks[m] for m in values})
    flat = dare(flat, masks, drop_rate)
  if base in ("ta", "dare"):
    merged = (w[:, None] * flat).sum(axis=0)
  elif base == "mean":
    merged = (w[:, None] * flat).sum(axis=0) / n
  elif base in ("ties", "dare_ties"):
    pruned = flat * topk_values_mask(flat, top_k)
    sign = resolve_sign(pruned)
    agree = np.where(sign[None] > 0, pruned > 0, pruned < 0)   # counted whatever the weight
    merged = (w[:, None] * pruned * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
  else:
    raise ValueError(base)
  return unflatten(merged, layout)


def merge(
    deltas: dict[str, np.ndarray],
    method: str,
    *,
    scaling: float = 1.0,
    top_k: float = 30,
    drop_rate: float = 0.9,
    keep_masks: dict[str, np.ndarray] | None = None,
    tol: float = 1e-5,
    weights=None,
) -> dict[str, np.ndarray]:
  """Merged dense update per module; deltas: {module: [n, out, in]} float64.

  keep_masks: DARE keep masks per module, shaped like the merged values
  ([n, out, in] for baselines, [n, k, in] for KnOTS).
  """
  knots = method.startswith("knots_")
  base = method.removeprefix("knots_")
  if knots:
    us, values = knots_decompose(deltas, tol)
  else:
    values = deltas
  per_module = _merge_values(values, base, scaling, top_k, drop_rate, keep_masks, weights)
  if knots:
    return {m: us[m] @ per_module[m] for m in per_module}
  return per_module


# ------------------------------------------------------ SVD-based methods

RTOL = 1e-5          # components with sigma <= RTOL * sigma_max are dropped
POLAR_RTOL = 1e-6    # the same inside the polar factor


def polar(x: np.ndarray) -> np.ndarray:
  """X (X^T X)^(-1/2) = P Q^T from X = P S Q^T, singular values <= POLAR_RTOL * max dropped."""
  p, sv, qt = np.linalg.svd(x, full_matrices=False)
  keep = sv > POLAR_RTOL * sv.max()
  return (p * keep) @ qt


def svd_masked(m: np.ndarray, scale: float):
  """Thin SVD with components sigma <= RTOL * scale zeroed."""
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  valid = s > RTOL * scale
  return u * valid, np.where(valid, s, 0), vt * valid[:, None]


def iso_c(deltas: np.ndarray, mean: str = "nonzero", scaling: float = 1.0) -> np.ndarray:
  """Iso-C: alpha * mean(sigma) * U V^T of Delta_TA = sum_i Delta_i."""
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  valid = s > RTOL * s.max()
  count = valid.sum() if mean == "nonzero" else min(deltas.shape[1:])
  return scaling * s[valid].sum() / count * u[:, valid] @ vt[valid]


def iso_cts(deltas: np.ndarray, frac: float, space: int | None = None,
            scaling: float = 1.0) -> np.ndarray:
  """Iso-CTS; `space` defaults to the numerical rank of Delta_TA."""
  n = len(deltas)
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  scale = s.max()
  space = int(np.sum(s > RTOL * scale)) if space is None else space
  k_c = int(space * frac)
  spec = round((space - k_c) / n) * n
  k_c, d = space - spec, spec // n
  valid = s[:k_c] > RTOL * scale
  u_c, s_c, vt_c = u[:, :k_c] * valid, np.where(valid, s[:k_c], 0), vt[:k_c] * valid[:, None]
  us, ss, vs = [], [], []
  for delta in deltas:
    ut, st, vtt = svd_masked(delta - u_c @ u_c.T @ delta, scale)
    us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vtt[:d])
  u_all = np.concatenate(us + [u_c], axis=1)
  v_all = np.concatenate(vs + [vt_c], axis=0).T
  s_all = np.concatenate(ss + [s_c])
  s_bar = s_all.sum() / (s_all > 0).sum()
  return scaling * s_bar * polar(u_all) @ polar(v_all).T


def tsv(deltas: np.ndarray, keep: int, scaling: float = 1.0):
  """TSV-M: top `keep` per task, whitened [U_1..U_n] and [V_1..V_n]; (merged, U_o, V_o)."""
  svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
  scale = max(s.max() for _, s, _ in svds)
  u_all, s_all, v_all = [], [], []
  for u, s, vt in svds:
    valid = s[:keep] > RTOL * scale
    u_all.append(u[:, :keep] * valid), s_all.append(np.where(valid, s[:keep], 0))
    v_all.append((vt[:keep] * valid[:, None]).T)
  u_o, v_o = polar(np.concatenate(u_all, 1)), polar(np.concatenate(v_all, 1))
  return scaling * u_o @ np.diag(np.concatenate(s_all)) @ v_o.T, u_o, v_o


def trim(deltas: np.ndarray, eta: float) -> np.ndarray:
  """Per task tensor: keep |x| >= the (d - int(d eta))-th smallest |x| (eta = 1 keeps all).

  SFTM's Algorithm 2 "Keep top eta parameters by magnitude in each M_i" (line 5)
  and "in each tau_i" (line 11), with TIES' kthvalue threshold."""
  out = []
  for d in deltas:
    x = np.abs(d).ravel()
    k = x.size - int(x.size * eta)
    out.append(d if eta >= 1 else np.where(np.abs(d) >= np.sort(x)[k - 1], d, 0))
  return np.stack(out)


def sftm_system(comps) -> tuple[np.ndarray, np.ndarray]:
  """G[p, q] = sigma_q (u_p . u_q)(v_q . v_p) and sigma, for components (sigma, u, v)."""
  g = np.array([[sq * (up @ uq) * (vq @ vp) for sq, uq, vq in comps] for _, up, vp in comps])
  return g, np.array([c[0] for c in comps])


def sftm(deltas: np.ndarray, eta: float = 1.0, gamma: float = 1.0):
  """SFTM, Algorithm 1 after Algorithm 2's trim: per-task SVD, G alpha = sigma (eq. (4)),
  M = sum alpha sigma u v^T (eq. (1)); returns (gamma * M, alpha, components).

  Every component of every task is kept (only sigma <= RTOL * that task's own
  largest, numerically zero, is dropped). Float64 least squares on G as written.
  """
  comps = []
  for u, s, vt in [np.linalg.svd(d, full_matrices=False) for d in trim(deltas, eta)]:
    comps += [(s[k], u[:, k], vt[k]) for k in range(len(s)) if s[k] > RTOL * s.max()]
  g, sigma = sftm_system(comps)
  alpha = np.linalg.lstsq(g, sigma, rcond=None)[0]
  merged = sum(al * sq * np.outer(uq, vq) for al, (sq, uq, vq) in zip(alpha, comps))
  return gamma * merged, alpha, comps


def sftm_model(base: dict, tuned: list, kinds: dict, eta: float = 1.0, gamma: float = 1.0,
               norm_trim: bool = True) -> dict:
  """Algorithm 2 on full models {name: array}; `kinds[name]` is "linear", "conv", "bias"
  (biases and embeddings), "norm" or "copy".

  Linear: P_pre + gamma SFTM(trimmed M_i). Conv (§3.3, "reshaping the
  convolutional kernels into a matrix"): the kernel [out, in, kh, kw] as
  [out, in kh kw], then as linear, reshaped back. Bias / embedding:
  P_pre + gamma sum_i trim(tau_i) (lines 11, 15). Norm: P_pre + mean_i trim(tau_i)
  (lines 11, 13), or with norm_trim=False the plain mean of the P_i (§3.3).
  """
  out = {}
  for name, kind in kinds.items():
    pre = np.asarray(base[name], np.float64)
    if kind == "copy":
      out[name] = base[name]
      continue
    tau = np.stack([np.asarray(m[name], np.float64) for m in tuned]) - pre
    if kind in ("linear", "conv"):
      mats = tau.reshape(len(tuned), pre.shape[0], -1)
      out[name] = pre + sftm(mats, eta, gamma)[0].reshape(pre.shape)
    elif kind == "bias":
      out[name] = pre + gamma * trim(tau, eta).sum(0)
    elif kind == "norm":
      out[name] = pre + (trim(tau, eta) if norm_trim else tau).mean(0)
    else:
      raise ValueError(kind)
  return out


def best_rank(delta: np.ndarray, rank: int) -> np.ndarray:
  """The best rank-`rank` approximation (Eckart-Young)."""
  u, s, vt = np.linalg.svd(delta, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def knots_tsv(deltas: np.ndarray, scaling: float = 1.0, tol: float = 1e-5) -> np.ndarray:
  """TSV-M on KnOTS' V_i^T keeping all their components, then U diag(s) in front."""
  n, out, inp = deltas.shape
  u, s, vt = np.linalg.svd(np.concatenate(list(deltas), axis=1), full_matrices=False)
  keep = s > tol
  u, s, vt = u[:, keep], s[keep], vt[keep]
  v_tasks = np.stack([vt[:, i * inp:(i + 1) * inp] for i in range(n)])
  merged, _, _ = tsv(v_tasks, min(len(s), inp), scaling)
  return u @ (s[:, None] * merged)


# ------------------------------------------------------------- Core Space


def lora_factors(adapters) -> dict[str, tuple[list, list]]:
  """{module: ([s_i B_i], [A_i])} of an AdapterSet, unpadded float64 (s_i B_i computed in
  float64, as knots_jax.adapters.stacks holds it for float64 merges)."""
  out = {}
  for m in adapters.module_names:
    fs = adapters.factors(m)
    out[m] = ([f.scale * f.b.astype(np.float64) for f in fs],
              [f.a.astype(np.float64) for f in fs])
  return out


def factor_deltas(factors: dict[str, tuple[list, list]]) -> dict[str, np.ndarray]:
  """{module: [n, out, in]} task updates B_i A_i of `lora_factors`."""
  return {m: np.stack([b @ a for b, a in zip(bs, as_)]) for m, (bs, as_) in factors.items()}


def core_decompose(bs, as_):
  """Unpadded cores of one module: B_i [out, r_i], A_i [r_i, in] (scale folded into B_i).

  Returns U_B [out, min(out, R)], V_A [in, min(R, in)] and the cores
  M_i = U_B^T B_i A_i V_A, R = sum_i r_i (the authors' construction).
  """
  u_b = np.linalg.svd(np.concatenate(bs, axis=1), full_matrices=False)[0]
  v_a = np.linalg.svd(np.concatenate(as_, axis=0), full_matrices=False)[2].T
  cores = np.stack([u_b.T @ b @ a @ v_a for b, a in zip(bs, as_)])
  return u_b, v_a, cores


def core_merge(
    factors: dict[str, tuple[list, list]],
    method: str,
    *,
    scaling: float = 1.0,
    top_k: float = 30,
    drop_rate: float = 0.9,
    keep_masks: dict[str, np.ndarray] | None = None,
    top_k_scope: str = "model",
    weights=None,
) -> dict[str, np.ndarray]:
  """`core_X`: the method X on every module's cores, then U_B M V_A^T.

  factors: {module: ([B_1, ..], [A_1, ..])}; keep_masks: DARE masks shaped like
  the cores. X: ta, mean, ties, dare, dare_ties (on all modules' cores as one
  vector per task with top_k_scope "model", per module with "layer"), tsv_m
  (keep = min(core shape) // n), iso_c, iso_cts (common fraction 0.8).
  """
  base = method.removeprefix("core_")
  bases, cores = {}, {}
  for m, (bs, as_) in factors.items():
    u_b, v_a, cores[m] = core_decompose(bs, as_)
    bases[m] = (u_b, v_a)
  if base == "tsv_m":
    merged = {m: tsv(c, min(c.shape[1:]) // len(c), scaling)[0] for m, c in cores.items()}
  elif base == "iso_c":
    merged = {m: iso_c(c, scaling=scaling) for m, c in cores.items()}
  elif base == "iso_cts":
    merged = {m: iso_cts(c, 0.8, scaling=scaling) for m, c in cores.items()}
  elif top_k_scope == "layer":
    merged = {m: _merge_values({m: c}, base, scaling, top_k, drop_rate, keep_masks, weights)[m]
              for m, c in cores.items()}
  else:
    merged = _merge_values(cores, base, scaling, top_k, drop_rate, keep_masks, weights)
  return {m: bases[m][0] @ merged[m] @ bases[m][1].T for m in merged}


def core_tsv_authors_code(bs, as_, scaling: float = 1.0, null_basis_seed: int | None = None):
  """Core Space + TSV-M of one module, step by step as the authors' code does it.

  Re-expressed from apanariello4/core-space-merging, task_merger.py,
  MatrixPerLayerMerger: `get_core_matrices` (U_B_ref, Vh_A_ref from the SVDs
  of [B_1 .. B_n] and [A_1; ..; A_n], nothing truncated; M_i = U_B_ref^T B_i
  A_i Vh_A_ref^T), `get_tsv_delta_w` (per core an SVD; k = int(K * (1 / T)) of
  its K = min(core shape) components per task, placed side by side in zero
  buffers shaped like the SVD's factors; the whitening is U V^T of an SVD of those buffers, no
  singular value dropped) and `merge` (merge_space "core": U_B_ref M Vh_A_ref,
  times the scaling coefficient). Unlike `core_merge`, components of a core
  with zero singular value are kept whenever they fall among a task's k:
  their singular vectors are whatever basis of the core's null spaces the SVD
  returns. `null_basis_seed`: replace that basis (left and right) by another
  orthonormal one drawn from the seed, an equally valid SVD of the same core.
  """
  u_ref = np.linalg.svd(np.concatenate(bs, axis=1), full_matrices=False)[0]
  vh_ref = np.linalg.svd(np.concatenate(as_, axis=0), full_matrices=False)[2]
  cores = [u_ref.T @ b @ a @ vh_ref.T for b, a in zip(bs, as_)]
  n = len(cores)
  rng = np.random.default_rng(null_basis_seed)
  size = min(cores[0].shape)
  k = int(size * (1 / n))      # = size // n, except for a few n (49: int(49 * (1 / 49)) = 0)
  rows, cols = cores[0].shape
  u_all, s_all, vt_all = np.zeros((rows, size)), np.zeros(size), np.zeros((size, cols))
  for i, core in enumerate(cores):
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    null = size - int(np.sum(s > RTOL * s.max()))
    if null_basis_seed is not None and null:
      rank = size - null
      u, vt = u.copy(), vt.copy()
      u[:, rank:] = u[:, rank:] @ np.linalg.qr(rng.normal(size=(null, null)))[0]
      vt[rank:] = np.linalg.qr(rng.normal(size=(null, null)))[0] @ vt[rank:]
    u_all[:, i * k:(i + 1) * k], s_all[i * k:(i + 1) * k] = u[:, :k], s[:k]
    vt_all[i * k:(i + 1) * k] = vt[:k]

  def whiten(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt

  merged = whiten(u_all) @ np.diag(s_all) @ whiten(vt_all)
  return scaling * u_ref @ merged @ vh_ref
