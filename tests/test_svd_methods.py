"""SVD-based merging methods: float64 NumPy references written from the papers'
equations, the defining property of each method, and factor path == dense path."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from knots_jax import svd_methods as sm
from knots_jax.stacks import stack_adapters
from tests import synthetic

TOL = 1e-8
RTOL = sm.DEFAULT_RTOL


@pytest.fixture(scope="module", params=[0, 1], ids=["q_12x10", "k_6x10"])
def stack(request):
  """b [2, 3, out, 4], a [2, 3, 4, 10] float64 (ranks 2, 3, 4 zero-padded to 4)."""
  stacks = stack_adapters(synthetic.adapter_set(ranks=(2, 3, 4), seed=3), dtype=np.float64)
  by_out = {s.b.shape[2]: s for s in stacks}
  return by_out[(12, 6)[request.param]]


WEIGHTS = np.array([0.5, 0.3, 0.8])


# ------------------------------------------------------------ NumPy references


def np_polar(x, rtol=sm.POLAR_RTOL):
  p, sv, qt = np.linalg.svd(x, full_matrices=False)
  keep = sv > rtol * sv.max()
  return (p * keep) @ qt


def np_svd_masked(m, scale, rtol=RTOL):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  valid = s > rtol * scale
  return u * valid, np.where(valid, s, 0), vt * valid[:, None]


def np_iso_c(deltas, mean="nonzero", scaling=1.0):
  u, s, vt = np.linalg.svd(deltas.sum(0), full_matrices=False)
  valid = s > RTOL * s.max()
  count = valid.sum() if mean == "nonzero" else min(deltas.shape[1:])
  return scaling * s[valid].sum() / count * u[:, valid] @ vt[valid]


def np_iso_cts(deltas, frac, space=None, scaling=1.0):
  """Iso-CTS, Alg. 1; `space` defaults to the numerical rank of Delta_TA."""
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
    ut, st, vtt = np_svd_masked(delta - u_c @ u_c.T @ delta, scale)
    us.append(ut[:, :d]), ss.append(st[:d]), vs.append(vtt[:d])
  u_all = np.concatenate(us + [u_c], axis=1)
  v_all = np.concatenate(vs + [vt_c], axis=0).T
  s_all = np.concatenate(ss + [s_c])
  s_bar = s_all.sum() / (s_all > 0).sum()
  return scaling * s_bar * np_polar(u_all) @ np_polar(v_all).T


def np_tsv(deltas, keep, scaling=1.0):
  svds = [np.linalg.svd(d, full_matrices=False) for d in deltas]
  scale = max(s.max() for _, s, _ in svds)
  u_all, s_all, v_all = [], [], []
  for u, s, vt in svds:
    valid = s[:keep] > RTOL * scale
    u_all.append(u[:, :keep] * valid), s_all.append(np.where(valid, s[:keep], 0))
    v_all.append((vt[:keep] * valid[:, None]).T)
  u_o, v_o = np_polar(np.concatenate(u_all, 1)), np_polar(np.concatenate(v_all, 1))
  return scaling * u_o @ np.diag(np.concatenate(s_all)) @ v_o.T, u_o, v_o


def np_trim(deltas, eta):
  out = []
  for d in deltas:
    x = np.abs(d).ravel()
    k = x.size - int(x.size * eta)
    out.append(d if eta >= 1 else np.where(np.abs(d) >= np.sort(x)[k - 1], d, 0))
  return np.stack(out)


def np_sftm(deltas, eta=1.0, gamma=1.0):
  """Components (i, k); G[p, q] = sigma_q (u_p . u_q)(v_q . v_p); G alpha = sigma."""
  comps = []
  svds = [np.linalg.svd(d, full_matrices=False) for d in np_trim(deltas, eta)]
  scale = max(s.max() for _, s, _ in svds)
  for u, s, vt in svds:
    comps += [(s[k], u[:, k], vt[k]) for k in range(len(s)) if s[k] > RTOL * scale]
  g = np.array([[sq * (up @ uq) * (vq @ vp) for sq, uq, vq in comps] for _, up, vp in comps])
  sigma = np.array([c[0] for c in comps])
  alpha = np.linalg.lstsq(g, sigma, rcond=None)[0]
  merged = sum(al * sq * np.outer(uq, vq) for al, (sq, uq, vq) in zip(alpha, comps))
  return gamma * merged, alpha, comps


# ------------------------------------------------------- LoRA Merging with SVD


def test_direct_and_multiplied_merge(stack):
  b_dm, a_dm = sm.direct_merge_stack(stack.b, stack.a, WEIGHTS)
  b_mm, a_mm = sm.multiplied_merge_stack(stack.b, stack.a, WEIGHTS)
  deltas = stack.deltas()
  for l in range(len(stack.modules)):
    sum_b = sum(w * b for w, b in zip(WEIGHTS, stack.b[l]))
    sum_a = sum(w * a for w, a in zip(WEIGHTS, stack.a[l]))
    # DM's defining property: its update is (sum w B)(sum w A).
    np.testing.assert_allclose(b_dm[l] @ a_dm[l], sum_b @ sum_a, atol=TOL)
    # MM is exact: sum w_i B_i A_i.
    np.testing.assert_allclose(b_mm[l] @ a_mm[l], np.einsum("n,noi->oi", WEIGHTS, deltas[l]), atol=TOL)
    assert b_mm.shape[-1] == 3 * stack.b.shape[-1]


def test_cross_term_is_sum_of_b_i_a_j(stack):
  bx, ax = sm.cross_term_stack(stack.b, stack.a, WEIGHTS)
  for l in range(len(stack.modules)):
    b, a, w = stack.b[l], stack.a[l], WEIGHTS
    ref = sum(w[i] * w[j] * b[i] @ a[j] for i in range(3) for j in range(3) if i != j)
    ref = ref + sum((w[i] ** 2 - w[i]) * b[i] @ a[i] for i in range(3))
    np.testing.assert_allclose(bx[l] @ ax[l], ref, atol=TOL)
    np.testing.assert_allclose(sm.cross_term_dense(jnp.asarray(b), jnp.asarray(a), w), ref, atol=TOL)


@pytest.mark.parametrize("weights", [WEIGHTS, np.ones(3)])
def test_svd_r_bound(stack, weights):
  trunc, cross = sm.svd_r_error_bound(stack.b, stack.a, weights)
  r = stack.b.shape[-1]
  for l in range(len(stack.modules)):
    mm = np.einsum("n,noi->oi", weights, stack.deltas()[l])
    dm = (np.einsum("n,nor->or", weights, stack.b[l]) @ np.einsum("n,nri->ri", weights, stack.a[l]))
    s = np.linalg.svd(mm, compute_uv=False)
    np.testing.assert_allclose(trunc[l], np.sqrt(np.sum(s[r:] ** 2)), atol=TOL)
    np.testing.assert_allclose(cross[l], np.linalg.norm(dm - mm), atol=TOL)
  assert sm.svd_r_error_bound_holds(stack.b, stack.a, weights).all()


def test_weights_are_checked(stack):
  with pytest.raises(ValueError, match="one entry per adapter"):
    sm.svd_r_error_bound(stack.b, stack.a, np.ones(2))
  with pytest.raises(ValueError, match="b \\[L, n, out, r\\]"):
    sm.svd_r_error_bound(stack.b[0], stack.a[0], np.ones(3))


# ---------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("mean", ["nonzero", "full"])
def test_iso_c_reference_and_dense(stack, mean):
  b_m, a_m = sm.iso_c_stack(stack.b, stack.a, scaling=1.3, mean=mean)
  dense = sm.iso_c_dense_stack(stack.deltas(), scaling=1.3, mean=mean)
  for l in range(len(stack.modules)):
    ref = np_iso_c(stack.deltas()[l], mean, scaling=1.3)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)


def test_iso_c_spectrum_is_flat_with_the_ta_mean(stack):
  b_m, a_m = sm.iso_c_stack(stack.b, stack.a)
  for l in range(len(stack.modules)):
    s_ta = np.linalg.svd(stack.deltas()[l].sum(0), compute_uv=False)
    s_ta = s_ta[s_ta > RTOL * s_ta.max()]
    s_iso = np.linalg.svd(np.asarray(b_m[l] @ a_m[l]), compute_uv=False)[:len(s_ta)]
    np.testing.assert_allclose(s_iso, np.full_like(s_ta, s_ta.mean()), rtol=1e-10)
    np.testing.assert_allclose(s_iso.mean(), s_ta.mean(), rtol=1e-10)
  with pytest.raises(ValueError, match="mean must be"):
    sm.iso_c_stack(stack.b, stack.a, mean="median")


# -------------------------------------------------------------------- Iso-CTS


def test_iso_cts_sizes():
  assert sm.iso_cts_sizes(3, 10, 0.8) == (7, 1)   # int(8), budget 2 -> round(2/3)*3 = 3
  assert sm.iso_cts_sizes(8, 768, 0.8) == (616, 19)
  assert sm.iso_cts_sizes(3, 5, 0.0) == (2, 1)
  with pytest.raises(ValueError):
    sm.iso_cts_sizes(3, 10, 1.5)


@pytest.mark.parametrize("frac", [0.8, 0.5])
def test_iso_cts_reference_and_dense(stack, frac):
  b_m, a_m = sm.iso_cts_stack(stack.b, stack.a, common_fraction=frac, scaling=0.7)
  dense = sm.iso_cts_dense_stack(stack.deltas(), common_fraction=frac, scaling=0.7)
  for l in range(len(stack.modules)):
    ref = np_iso_cts(stack.deltas()[l], frac, scaling=0.7)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)
    # Flat spectrum on its support.
    s = np.linalg.svd(ref, compute_uv=False)
    s = s[s > 1e-8 * s.max()]
    np.testing.assert_allclose(s, s[0], rtol=1e-8)


def test_iso_cts_fixed_space(stack):
  """An explicit `space` (the paper's min(out, in) for full-rank updates) on both paths."""
  b_m, a_m = sm.iso_cts_stack(stack.b, stack.a, space=6)
  dense = sm.iso_cts_dense_stack(stack.deltas(), space=6)
  ref = np_iso_cts(stack.deltas()[0], 0.8, space=6)
  np.testing.assert_allclose(b_m[0] @ a_m[0], ref, atol=TOL)
  np.testing.assert_allclose(dense[0], ref, atol=TOL)
  with pytest.raises(ValueError, match="common_fraction"):
    sm.iso_cts_stack(stack.b, stack.a, common_fraction=1.5)


# ---------------------------------------------------------------------- TSV-M


def test_tsv_merge_reference_and_dense(stack):
  _, n, out, r = stack.b.shape
  keep = sm.tsv_default_keep(n, out, stack.a.shape[-1])
  b_m, a_m = sm.tsv_merge_stack(stack.b, stack.a, scaling=0.9)
  dense = sm.tsv_merge_dense_stack(stack.deltas(), scaling=0.9)
  for l in range(len(stack.modules)):
    ref, _, _ = np_tsv(stack.deltas()[l], keep, scaling=0.9)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)


def test_tsv_whitened_bases_are_orthonormal(stack):
  b, a = jnp.asarray(stack.b[0]), jnp.asarray(stack.a[0])
  u_o, s, v_o = sm.tsv_whitened(b, a)
  valid = np.asarray(s) > 0
  u_o, v_o = np.asarray(u_o)[:, valid], np.asarray(v_o)[:, valid]
  np.testing.assert_allclose(u_o.T @ u_o, np.eye(valid.sum()), atol=1e-10)
  np.testing.assert_allclose(v_o.T @ v_o, np.eye(valid.sum()), atol=1e-10)
  with pytest.raises(ValueError, match="keep must be"):
    sm.tsv_whitened(b, a, keep=0)


def test_tsv_keep_truncates_each_task(stack):
  """keep=1: one component per task; the update lies in the span of the top vectors."""
  b_m, a_m = sm.tsv_merge_stack(stack.b, stack.a, keep=1)
  ref, _, _ = np_tsv(stack.deltas()[0], 1)
  np.testing.assert_allclose(b_m[0] @ a_m[0], ref, atol=TOL)
  assert np.linalg.matrix_rank(ref, tol=1e-8) == 3


# ----------------------------------------------------------------------- SFTM


def test_sftm_reference_and_dense(stack):
  b_m, a_m, alpha = sm.sftm_stack(stack.b, stack.a, gamma=0.6)
  dense, alpha_d = sm.sftm_dense_stack(stack.deltas(), gamma=0.6)
  for l in range(len(stack.modules)):
    ref, alpha_ref, _ = np_sftm(stack.deltas()[l], gamma=0.6)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)
    got = np.asarray(alpha[l])[np.asarray(alpha[l]) != 0]
    np.testing.assert_allclose(np.sort(got), np.sort(alpha_ref), atol=1e-7)


def test_sftm_alpha_solves_the_system():
  """u_p^T M v_p = sigma_p for every kept component (the system, Sec. 4), when non-singular."""
  s12 = stack_adapters(synthetic.adapter_set(ranks=(2, 3, 4), seed=3), dtype=np.float64)
  st = [s for s in s12 if s.b.shape[2] == 12][0]
  b_m, a_m, _ = sm.sftm_stack(st.b, st.a)
  merged = np.asarray(b_m[0] @ a_m[0])
  _, _, comps = np_sftm(st.deltas()[0])
  for s, u, v in comps:
    np.testing.assert_allclose(u @ merged @ v, s, rtol=1e-9)


def test_sftm_trim_matches_reference(stack):
  dense, _ = sm.sftm_dense_stack(stack.deltas(), eta=0.3)
  ref, _, _ = np_sftm(stack.deltas()[0], eta=0.3)
  np.testing.assert_allclose(dense[0], ref, atol=1e-7 * np.abs(ref).max())
  with pytest.raises(ValueError, match="eta"):
    sm.sftm_dense_stack(stack.deltas(), eta=0.0)


def test_sftm_warns_when_singular(stack):
  b = np.concatenate([stack.b[:, :1], stack.b[:, :1]], axis=1)  # two identical tasks
  a = np.concatenate([stack.a[:, :1], stack.a[:, :1]], axis=1)
  with pytest.warns(RuntimeWarning, match="singular"):
    b_m, a_m, _ = sm.sftm_stack(b, a, modules=stack.modules)
  # The minimum-norm solution still reproduces the task (M = B_1 A_1).
  np.testing.assert_allclose(b_m[0] @ a_m[0], stack.b[0, 0] @ stack.a[0, 0], atol=1e-8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sm.sftm_stack(stack.b, stack.a)
