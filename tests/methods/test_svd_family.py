"""SVD-based merging methods: float64 NumPy references written from the papers'
equations (tests/reference.py), the defining property of each method, and
factor path == dense path."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import knots_jax
from knots_jax.adapters.stacks import stack_adapters
from knots_jax.evaluation import interpolation
from knots_jax.merging import kernels
from knots_jax.methods import svd_family
from tests import reference, synthetic
from tests.reference import iso_c as np_iso_c
from tests.reference import iso_cts as np_iso_cts
from tests.reference import sftm as np_sftm
from tests.reference import tsv as np_tsv

TOL = 1e-8
RTOL = svd_family.DEFAULT_RTOL


@pytest.fixture(scope="module", params=[0, 1], ids=["q_12x10", "k_6x10"])
def stack(request):
  """b [2, 3, out, 4], a [2, 3, 4, 10] float64 (ranks 2, 3, 4 zero-padded to 4)."""
  stacks = stack_adapters(synthetic.adapter_set(ranks=(2, 3, 4), seed=3), dtype=np.float64)
  by_out = {s.b.shape[2]: s for s in stacks}
  return by_out[(12, 6)[request.param]]


WEIGHTS = np.array([0.5, 0.3, 0.8])


# ------------------------------------------------------- LoRA Merging with SVD


def test_direct_and_multiplied_merge(stack):
  b_dm, a_dm = kernels.direct_merge_stack(stack.b, stack.a, WEIGHTS)
  b_mm, a_mm = kernels.multiplied_merge_stack(stack.b, stack.a, WEIGHTS)
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
  bx, ax = kernels.cross_term_stack(stack.b, stack.a, WEIGHTS)
  for l in range(len(stack.modules)):
    b, a, w = stack.b[l], stack.a[l], WEIGHTS
    ref = sum(w[i] * w[j] * b[i] @ a[j] for i in range(3) for j in range(3) if i != j)
    ref = ref + sum((w[i] ** 2 - w[i]) * b[i] @ a[i] for i in range(3))
    np.testing.assert_allclose(bx[l] @ ax[l], ref, atol=TOL)
    np.testing.assert_allclose(svd_family.cross_term_dense(jnp.asarray(b), jnp.asarray(a), w), ref, atol=TOL)


@pytest.mark.parametrize("weights", [WEIGHTS, np.ones(3)])
def test_svd_r_bound(stack, weights):
  trunc, cross = kernels.svd_r_error_bound(stack.b, stack.a, weights)
  r = stack.b.shape[-1]
  for l in range(len(stack.modules)):
    mm = np.einsum("n,noi->oi", weights, stack.deltas()[l])
    dm = (np.einsum("n,nor->or", weights, stack.b[l]) @ np.einsum("n,nri->ri", weights, stack.a[l]))
    s = np.linalg.svd(mm, compute_uv=False)
    np.testing.assert_allclose(trunc[l], np.sqrt(np.sum(s[r:] ** 2)), atol=TOL)
    np.testing.assert_allclose(cross[l], np.linalg.norm(dm - mm), atol=TOL)
  assert kernels.svd_r_error_bound_holds(stack.b, stack.a, weights).all()


def test_weights_are_checked(stack):
  with pytest.raises(ValueError, match="one entry per adapter"):
    kernels.svd_r_error_bound(stack.b, stack.a, np.ones(2))
  with pytest.raises(ValueError, match="b \\[L, n, out, r\\]"):
    kernels.svd_r_error_bound(stack.b[0], stack.a[0], np.ones(3))


# ---------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("mean", ["nonzero", "full"])
def test_iso_c_reference_and_dense(stack, mean):
  b_m, a_m = kernels.iso_c_stack(stack.b, stack.a, scaling=1.3, mean=mean)
  dense = kernels.iso_c_dense_stack(stack.deltas(), scaling=1.3, mean=mean)
  for l in range(len(stack.modules)):
    ref = np_iso_c(stack.deltas()[l], mean, scaling=1.3)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)


def test_iso_c_spectrum_is_flat_with_the_ta_mean(stack):
  b_m, a_m = kernels.iso_c_stack(stack.b, stack.a)
  for l in range(len(stack.modules)):
    s_ta = np.linalg.svd(stack.deltas()[l].sum(0), compute_uv=False)
    s_ta = s_ta[s_ta > RTOL * s_ta.max()]
    s_iso = np.linalg.svd(np.asarray(b_m[l] @ a_m[l]), compute_uv=False)[:len(s_ta)]
    np.testing.assert_allclose(s_iso, np.full_like(s_ta, s_ta.mean()), rtol=1e-10)
    np.testing.assert_allclose(s_iso.mean(), s_ta.mean(), rtol=1e-10)
  with pytest.raises(ValueError, match="mean must be"):
    kernels.iso_c_stack(stack.b, stack.a, mean="median")


# -------------------------------------------------------------------- Iso-CTS


def test_iso_cts_sizes():
  assert svd_family.iso_cts_sizes(3, 10, 0.8) == (7, 1)   # int(8), budget 2 -> round(2/3)*3 = 3
  assert svd_family.iso_cts_sizes(8, 768, 0.8) == (616, 19)
  assert svd_family.iso_cts_sizes(3, 5, 0.0) == (2, 1)
  with pytest.raises(ValueError):
    svd_family.iso_cts_sizes(3, 10, 1.5)


@pytest.mark.parametrize("frac", [0.8, 0.5])
def test_iso_cts_reference_and_dense(stack, frac):
  b_m, a_m = kernels.iso_cts_stack(stack.b, stack.a, common_fraction=frac, scaling=0.7)
  dense = kernels.iso_cts_dense_stack(stack.deltas(), common_fraction=frac, scaling=0.7)
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
  b_m, a_m = kernels.iso_cts_stack(stack.b, stack.a, space=6)
  dense = kernels.iso_cts_dense_stack(stack.deltas(), space=6)
  ref = np_iso_cts(stack.deltas()[0], 0.8, space=6)
  np.testing.assert_allclose(b_m[0] @ a_m[0], ref, atol=TOL)
  np.testing.assert_allclose(dense[0], ref, atol=TOL)
  with pytest.raises(ValueError, match="common_fraction"):
    kernels.iso_cts_stack(stack.b, stack.a, common_fraction=1.5)


# ---------------------------------------------------------------------- TSV-M


def test_tsv_merge_reference_and_dense(stack):
  _, n, out, r = stack.b.shape
  keep = svd_family.tsv_default_keep(n, out, stack.a.shape[-1])
  b_m, a_m = kernels.tsv_merge_stack(stack.b, stack.a, scaling=0.9)
  dense = kernels.tsv_merge_dense_stack(stack.deltas(), scaling=0.9)
  for l in range(len(stack.modules)):
    ref, _, _ = np_tsv(stack.deltas()[l], keep, scaling=0.9)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)


def test_tsv_whitened_bases_are_orthonormal(stack):
  b, a = jnp.asarray(stack.b[0]), jnp.asarray(stack.a[0])
  u_o, s, v_o = svd_family.tsv_whitened(b, a)
  valid = np.asarray(s) > 0
  u_o, v_o = np.asarray(u_o)[:, valid], np.asarray(v_o)[:, valid]
  np.testing.assert_allclose(u_o.T @ u_o, np.eye(valid.sum()), atol=1e-10)
  np.testing.assert_allclose(v_o.T @ v_o, np.eye(valid.sum()), atol=1e-10)
  with pytest.raises(ValueError, match="keep must be"):
    svd_family.tsv_whitened(b, a, keep=0)


def test_tsv_keep_truncates_each_task(stack):
  """keep=1: one component per task; the update lies in the span of the top vectors."""
  b_m, a_m = kernels.tsv_merge_stack(stack.b, stack.a, keep=1)
  ref, _, _ = np_tsv(stack.deltas()[0], 1)
  np.testing.assert_allclose(b_m[0] @ a_m[0], ref, atol=TOL)
  assert np.linalg.matrix_rank(ref, tol=1e-8) == 3


# ----------------------------------------------------------------------- SFTM


def test_sftm_reference_and_dense(stack):
  b_m, a_m, alpha = kernels.sftm_stack(stack.b, stack.a, gamma=0.6)
  dense, alpha_d = kernels.sftm_dense_stack(stack.deltas(), gamma=0.6)
  for l in range(len(stack.modules)):
    ref, alpha_ref, _ = np_sftm(stack.deltas()[l], gamma=0.6)
    np.testing.assert_allclose(b_m[l] @ a_m[l], ref, atol=TOL)
    np.testing.assert_allclose(dense[l], ref, atol=TOL)
    got = np.asarray(alpha[l])[np.asarray(alpha[l]) != 0]
    np.testing.assert_allclose(np.sort(got), np.sort(alpha_ref), atol=1e-7)


def test_sftm_alpha_solves_the_system():
  """u_p^T M v_p = sigma_p for every kept component (eq. (3)), when non-singular."""
  s12 = stack_adapters(synthetic.adapter_set(ranks=(2, 3, 4), seed=3), dtype=np.float64)
  st = [s for s in s12 if s.b.shape[2] == 12][0]
  b_m, a_m, _ = kernels.sftm_stack(st.b, st.a)
  merged = np.asarray(b_m[0] @ a_m[0])
  _, _, comps = np_sftm(st.deltas()[0])
  for s, u, v in comps:
    np.testing.assert_allclose(u @ merged @ v, s, rtol=1e-9)


def test_sftm_trim_matches_reference(stack):
  dense, _ = kernels.sftm_dense_stack(stack.deltas(), eta=0.3)
  ref, _, _ = np_sftm(stack.deltas()[0], eta=0.3)
  np.testing.assert_allclose(dense[0], ref, atol=1e-7 * np.abs(ref).max())
  with pytest.raises(ValueError, match="eta"):
    kernels.sftm_dense_stack(stack.deltas(), eta=0.0)


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-8), (np.float32, 1e-5)])
def test_sftm_warns_when_singular(stack, dtype, atol):
  b = np.concatenate([stack.b[:, :1], stack.b[:, :1]], axis=1).astype(dtype)  # identical tasks
  a = np.concatenate([stack.a[:, :1], stack.a[:, :1]], axis=1).astype(dtype)
  with pytest.warns(RuntimeWarning, match="singular"):
    b_m, a_m, _ = kernels.sftm_stack(b, a, modules=stack.modules)
  # The least-squares solution still reproduces the task (M = B_1 A_1).
  np.testing.assert_allclose(b_m[0] @ a_m[0], stack.b[0, 0] @ stack.a[0, 0],
                             atol=atol * np.abs(stack.b[0, 0] @ stack.a[0, 0]).max())
  with pytest.warns(RuntimeWarning, match="singular"):
    kernels.sftm_dense_stack(np.einsum("lnor,lnri->lnoi", b, a), eta=0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kernels.sftm_stack(stack.b.astype(dtype), stack.a.astype(dtype))


def _spectra(n, out, inp, rank, lowest, spread, seed=0):
  """b [1, n, out, rank], a [1, n, rank, in]: task i's singular values
  10^spread_i * logspace(0, lowest, rank) (spread_i from 0 to `spread`), random vectors."""
  rng = np.random.default_rng(seed)
  s, scale = np.logspace(0, lowest, rank), np.logspace(0, spread, n)
  bs, as_ = [], []
  for i in range(n):
    u = np.linalg.qr(rng.normal(size=(out, rank)))[0]
    v = np.linalg.qr(rng.normal(size=(inp, rank)))[0]
    bs.append(u * s * scale[i]), as_.append(v.T)
  return np.stack(bs)[None], np.stack(as_)[None]


def _eq3_error(merged, comps):
  """max_p |u_p^T M v_p - sigma_p| / max sigma: how far M is from eq. (3)."""
  return max(abs(u @ merged @ v - s) for s, u, v in comps) / max(c[0] for c in comps)


@pytest.mark.parametrize("shape", [(4, 32, 24, 24, -4, -3), (8, 64, 48, 48, -4, -3),
                                   (4, 32, 24, 24, -2, -4)], ids=["4x32x24", "8x64x48", "4x32x24b"])
def test_sftm_float32_with_decaying_spectra_matches_float64(shape):
  """Issue #8 item 3: at float32 (the default) and eta = 0.2, decaying spectra (and
  tasks of different sizes) gave M 2-15 % off the float64 answer, eq. (3) violated by
  several % of sigma_max and a "singular" warning for a non-singular system. Now
  <= 1e-3 of the float64 NumPy reference (measured ~1e-5), no warning."""
  b, a = _spectra(*shape)
  delta = np.einsum("lnor,lnri->lnoi", b, a)
  ref, _, comps = np_sftm(delta[0], eta=0.2, gamma=0.8)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got, _ = kernels.sftm_dense_stack(delta.astype(np.float32), eta=0.2, gamma=0.8)
  assert got.dtype == jnp.float32
  got = np.asarray(got[0], np.float64)
  assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref)
  assert _eq3_error(got / 0.8, comps) <= 1e-3


def test_sftm_float32_factors_with_decaying_spectra_match_float64():
  """The factor path (eta = 1) at float32: rank-8 LoRAs, spectra down to 10^-4.5."""
  b, a = _spectra(4, 32, 24, 8, -4.5, -1)
  ref, _, comps = np_sftm(np.einsum("lnor,lnri->lnoi", b, a)[0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    b_m, a_m, _ = kernels.sftm_stack(b.astype(np.float32), a.astype(np.float32))
  got = np.asarray(b_m[0] @ a_m[0], np.float64)
  assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref)
  assert _eq3_error(got, comps) <= 1e-3


def test_sftm_keeps_every_component_of_a_small_task(stack):
  """Issue #8 item 4: components are thresholded per task (the paper keeps every
  component of every task), so a task scaled by 1e-6 keeps its features: alpha as the
  reference's and u_p^T M v_p = sigma_p for its components too (eq. (3))."""
  scale = np.array([1.0, 1e-6, 1.0])
  b = stack.b * scale[None, :, None, None]
  deltas = np.einsum("lnor,lnri->lnoi", b, stack.a)
  b_m, a_m, alpha = kernels.sftm_stack(b, stack.a, gamma=0.6)
  dense, alpha_d = kernels.sftm_dense_stack(deltas, gamma=0.6)
  for l in range(len(stack.modules)):
    ref, alpha_ref, comps = np_sftm(deltas[l], gamma=0.6)
    assert len(comps) == 2 + 3 + 4
    for got, got_alpha in ((np.asarray(b_m[l] @ a_m[l]), alpha[l]), (dense[l], alpha_d[l])):
      np.testing.assert_allclose(got, ref, atol=TOL)
      kept = np.asarray(got_alpha)
      np.testing.assert_allclose(np.sort(kept[kept != 0]), np.sort(alpha_ref), rtol=1e-7)
      assert np.count_nonzero(kept[1]) == 3   # the small task: all its components
      for s, u, v in comps:
        np.testing.assert_allclose(u @ got @ v / 0.6, s, rtol=1e-6)


def test_tsv_merge_ranked_keeps_rank_over_n_per_task(stack):
  """Keep floor(rank / n) per task (the Core Space authors' rule), rank given as an array."""
  deltas = stack.deltas()
  for rank in (9, 6, 3, 2):
    got = kernels.tsv_merge_ranked_stack(deltas, np.full(len(stack.modules), rank), scaling=0.8)
    for l in range(len(stack.modules)):
      ref, _, _ = np_tsv(deltas[l], max(rank // 3, 1), scaling=0.8)
      np.testing.assert_allclose(got[l], ref, atol=TOL)


# ------------------------------------------- LoRA Merging with SVD: SVD_r, noise


def test_mm_svd_is_the_best_rank_r_approximation_of_mm(stack):
  b_r, a_r = kernels.mm_svd_stack(stack.b, stack.a, WEIGHTS)
  r = stack.b.shape[-1]
  assert b_r.shape[-1] == r
  for l in range(len(stack.modules)):
    mm = np.einsum("n,noi->oi", WEIGHTS, stack.deltas()[l])
    np.testing.assert_allclose(b_r[l] @ a_r[l], reference.best_rank(mm, r), atol=TOL)
  b_2, a_2 = kernels.mm_svd_stack(stack.b, stack.a, WEIGHTS, rank=2)
  mm = np.einsum("n,noi->oi", WEIGHTS, stack.deltas()[0])
  np.testing.assert_allclose(b_2[0] @ a_2[0], reference.best_rank(mm, 2), atol=TOL)


def test_cross_term_noise_has_the_cross_terms_norm(stack):
  got = np.asarray(kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 3, stack.modules))
  for l in range(len(stack.modules)):
    b, a, w = stack.b[l], stack.a[l], WEIGHTS
    mm = np.einsum("n,noi->oi", w, stack.deltas()[l])
    dm = np.einsum("n,nor->or", w, b) @ np.einsum("n,nri->ri", w, a)
    noise = got[l] - mm
    np.testing.assert_allclose(np.linalg.norm(noise), np.linalg.norm(dm - mm), rtol=1e-10)
    assert np.linalg.matrix_rank(noise) == min(noise.shape)   # full rank: not the cross term
    assert abs(np.sum(noise * (dm - mm))) < 0.9 * np.linalg.norm(dm - mm) ** 2


def test_cross_term_noise_moments_is_the_papers_sampling(stack):
  """noise="moments": N_ij ~ N(mean(M), std(M)) ("LoRA Merging with SVD", §4), M = DM - MM."""
  got = np.asarray(kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 3, stack.modules,
                                                  noise="moments"))
  keys = kernels.module_keys(3, stack.modules)
  for l in range(len(stack.modules)):
    b, a, w = stack.b[l], stack.a[l], WEIGHTS
    mm = np.einsum("n,noi->oi", w, stack.deltas()[l])
    m = np.einsum("n,nor->or", w, b) @ np.einsum("n,nri->ri", w, a) - mm
    standard = (got[l] - mm - m.mean()) / m.std()
    g = np.asarray(jax.random.normal(keys[l], m.shape, jnp.float64))
    np.testing.assert_allclose(standard, g, atol=1e-8)
    assert abs(standard.mean()) < 0.4 and 0.7 < standard.std() < 1.3


def test_merge_passes_the_noise_option():
  adapters = synthetic.adapter_set(ranks=(2, 3), seed=5)
  default = knots_jax.merge(adapters, "mm_noise", seed=1, dtype="float64")
  moments = knots_jax.merge(adapters, "mm_noise", seed=1, noise="moments", dtype="float64")
  norm = knots_jax.merge(adapters, "mm_noise", seed=1, noise="norm", dtype="float64")
  assert default.settings["noise"] == "moments" and norm.settings["noise"] == "norm"
  for d, mo, no in zip(default.stacks, moments.stacks, norm.stacks):
    np.testing.assert_array_equal(np.asarray(d.delta), np.asarray(mo.delta))
    assert np.abs(np.asarray(no.delta) - np.asarray(mo.delta)).max() > 1e-6
  with pytest.raises(ValueError, match="noise"):
    knots_jax.merge(adapters, "mm_noise", noise="uniform")
  with pytest.raises(ValueError, match="noise"):
    knots_jax.merge(adapters, "ta", noise="norm")


def test_cross_term_noise_is_seeded_per_module(stack):
  same = kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 3, stack.modules)
  again = kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 3, stack.modules)
  other = kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 4, stack.modules)
  np.testing.assert_array_equal(same, again)
  assert np.abs(np.asarray(other) - np.asarray(same)).max() > 1e-3
  # A module's noise depends on its name, not on where it sits in the stack.
  flipped = kernels.cross_term_noise_stack(stack.b[::-1], stack.a[::-1], WEIGHTS, 3,
                                      stack.modules[::-1])
  np.testing.assert_allclose(flipped[::-1], same, atol=1e-12)
  # Different modules draw different noise: the normalised noise differs.
  mm = np.einsum("n,lnoi->loi", WEIGHTS, stack.deltas())
  unit = [(x - m) / np.linalg.norm(x - m) for x, m in zip(np.asarray(same), mm)]
  assert np.abs(unit[0] - unit[1]).max() > 1e-3
  with pytest.raises(ValueError, match="one module name per"):
    kernels.cross_term_noise_stack(stack.b, stack.a, WEIGHTS, 3, stack.modules[:1])
  with pytest.raises(ValueError, match="seed must be an integer"):
    kernels.module_keys(1.5, stack.modules)


# --------------------------------------------------- linear mode connectivity


def test_lmc_barrier_against_its_definition():
  ts = [0.0, 0.25, 0.5, 0.75, 1.0]
  acc = [0.80, 0.70, 0.50, 0.88, 0.90]
  line = [(1 - t) * 0.80 + t * 0.90 for t in ts]
  expected = max(l - s for l, s in zip(line, acc))
  assert interpolation.lmc_barrier(ts, acc) == pytest.approx(expected) == pytest.approx(0.35)
  loss = [1.0, 1.4, 1.2, 0.8, 0.6]
  expected = max(s - ((1 - t) * 1.0 + t * 0.6) for t, s in zip(ts, loss))
  assert interpolation.lmc_barrier(ts, loss, higher_is_better=False) == pytest.approx(expected)
  # Order of the points does not matter; a path above the line has barrier 0.
  assert interpolation.lmc_barrier(ts[::-1], acc[::-1]) == pytest.approx(0.35)
  assert interpolation.lmc_barrier([0, 0.5, 1], [0.5, 0.9, 0.6]) == 0.0


@pytest.mark.parametrize("ts,scores,match", [
    ([0.0, 0.5], [1.0, 2.0], "end points 0 and 1"),
    ([0.0, 1.0], [1.0], "one finite score per t"),
    ([0.0, 1.0, 1.0], [1.0, 2.0, 2.0], "distinct"),
    ([0.0, 1.0], [1.0, float("nan")], "finite score"),
    ([], [], "non-empty"),
])
def test_lmc_barrier_refuses_bad_input(ts, scores, match):
  with pytest.raises(ValueError, match=match):
    interpolation.lmc_barrier(ts, scores)


@pytest.fixture(scope="module")
def merges():
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=3)
  return adapters, {m: knots_jax.merge(adapters, m, scaling=0.7, dtype="float64")
                    for m in ("ta", "tsv_m", "ties")}


@pytest.mark.parametrize("pair", [("ta", "tsv_m"), ("ta", "ties")])
def test_interpolation_path(merges, pair):
  adapters, results = merges
  a, b = (results[m] for m in pair)
  ts = [0.0, 0.3, 1.0]
  path = interpolation.interpolation_path(a, b, ts)
  assert len(path) == 3
  for t, res in zip(ts, path):
    assert res.is_factored == (a.is_factored and b.is_factored)
    assert res.settings["t"] == t
    for m in adapters.module_names:
      np.testing.assert_allclose(res.delta(m), (1 - t) * a.delta(m) + t * b.delta(m), atol=1e-12)


def test_the_direct_merge_path_interpolates_the_factors():
  """path="dm": ((1-t) B_1 + t B_2)((1-t) A_1 + t A_2) of a pair of LoRAs, against NumPy;
  it leaves the straight MM line by the cross terms t(1-t)(B_1 A_2 + B_2 A_1 - ...)."""
  pair = synthetic.adapter_set(ranks=(3, 3), seed=11)
  one = [knots_jax.merge(knots_jax.AdapterSet((ad,)), "ta", dtype="float64") for ad in pair.adapters]
  ts = [0.0, 0.4, 1.0]
  dm = interpolation.interpolation_path(*one, ts, path="dm")
  mm = interpolation.interpolation_path(*one, ts, path="mm")
  for t, d, l in zip(ts, dm, mm):
    assert d.settings["path"] == "dm" and d.is_factored
    for m in pair.module_names:
      (f1, f2) = pair.factors(m)
      b = (1 - t) * f1.scale * f1.b.astype(np.float64) + t * f2.scale * f2.b.astype(np.float64)
      a = (1 - t) * f1.a.astype(np.float64) + t * f2.a.astype(np.float64)
      np.testing.assert_allclose(d.delta(m), b @ a, atol=1e-12 * np.abs(b @ a).max())
      gap = np.linalg.norm(d.delta(m) - l.delta(m)) / np.linalg.norm(l.delta(m))
      assert (gap < 1e-12) if t in (0.0, 1.0) else (gap > 1e-2)
  dense = knots_jax.merge(pair, "ties", dtype="float64")
  with pytest.raises(ValueError, match="path='dm'.*factors of equal shapes"):
    interpolation.interpolation_path(dense, dense, ts, path="dm")
  with pytest.raises(ValueError, match="path must be `mm` or `dm`"):
    interpolation.interpolation_path(*one, ts, path="both")


def test_interpolation_path_needs_the_same_modules(merges):
  _, results = merges
  single = synthetic.adapter_set(ranks=(2,), seed=1, shapes={"model.layers.0.mlp.up_proj": (5, 4)})
  other = knots_jax.merge(single, "ta")
  with pytest.raises(ValueError, match="same stacks of modules"):
    interpolation.interpolation_path(results["ta"], other, [0.0, 1.0])
  with pytest.raises(ValueError, match="1-D sequence"):
    interpolation.interpolation_path(results["ta"], results["ties"], [[0.0, 1.0]])


# ------------------------------------------------------------- KnOTS-TSV-M


@pytest.mark.parametrize("path,concat", [("core", "columns"), ("dense", "columns"),
                                         ("core", "rows")])
def test_knots_tsv_m_matches_reference(path, concat):
  """TSV-M on KnOTS' V_i^T (all components), then U diag(s) in front (float64 reference)."""
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=3)
  result = knots_jax.merge(adapters, "knots_tsv_m", scaling=0.8, path=path, concat=concat,
                         dtype="float64")
  assert result.is_factored
  for m, d in reference.factor_deltas(reference.lora_factors(adapters)).items():
    if concat == "rows":
      expected = reference.knots_tsv(np.swapaxes(d, 1, 2), scaling=0.8).T
    else:
      expected = reference.knots_tsv(d, scaling=0.8)
    np.testing.assert_allclose(result.delta(m), expected, atol=1e-8 * np.abs(expected).max())
  # Not a rotation of TSV-M on the updates: a method of its own.
  plain = knots_jax.merge(adapters, "tsv_m", scaling=0.8, dtype="float64")
  m = adapters.module_names[0]
  assert np.linalg.norm(plain.delta(m) - result.delta(m)) > 1e-3 * np.linalg.norm(plain.delta(m))


def test_knots_v_are_partial_isometries_for_generic_loras():
  """Why `knots_tsv_m` keeps every component: with sum r_i <= out, the V_i^T of the
  joint SVD satisfy sum_i V_i^T V_i = I_K with ranks adding up to K, so each
  V_i^T V_i is a projection and every non-zero singular value of V_i^T is 1."""
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=3)
  for st in knots_jax.align(adapters, dtype="float64", path="dense").aligned:
    v = np.asarray(st.rep) / np.where(np.asarray(st.valid), np.asarray(st.s), 1)[:, None, :, None]
    for l in range(len(st.modules)):
      k = int(np.sum(np.asarray(st.valid[l])))
      gram = sum(v[l, i, :k] @ v[l, i, :k].T for i in range(3))
      np.testing.assert_allclose(gram, np.eye(k), atol=1e-10)
      sv = [np.linalg.svd(v[l, i, :k], compute_uv=False) for i in range(3)]
      if st.u.shape[1] >= 9:     # q_proj, out 12 >= sum of ranks 9: partial isometries
        for r, s in zip((2, 3, 4), sv):
          np.testing.assert_allclose(s[:r], 1.0, atol=1e-10)
          assert np.all(s[r:] < 1e-10)
      else:                      # k_proj, out 6 < 9: not
        assert any(np.any((s > 1e-6) & (s < 1 - 1e-6)) for s in sv)


# ---------------------------------------------------------- the method table


def _doc_table_names(text: str) -> tuple[set[str], set[str]]:
  """Names in the first column of the method table of docs/methods.md, and the data-based ones."""
  import re
  section = text.split("<!-- method-table -->")[1].split("<!-- /method-table -->")[0]
  names, data_based = set(), set()
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) < 2 or not cells[0].startswith("`"):
      continue
    found = re.findall(r"`([a-z0-9_]+)`", cells[0])
    names.update(found)
    if "rather than a `method=` name" in line:
      data_based.update(found)
  return names, data_based


def test_docs_method_table_lists_every_method():
  import pathlib

  from knots_jax.methods import registry
  text = (pathlib.Path(__file__).parents[2] / "docs" / "methods.md").read_text()
  names, data_based = _doc_table_names(text)
  missing = sorted(set(registry.METHODS) - names)
  unknown = sorted(names - set(registry.METHODS) - data_based)
  assert not missing, f"methods missing from the table in docs/methods.md: {missing}"
  assert not unknown, f"rows of docs/methods.md that are not in METHODS: {unknown}"
  assert data_based and not data_based & set(registry.METHODS)
  from knots_jax.merging import fisher, regmean
  assert regmean.regmean_merge and fisher.fisher_merge


# ------------------------------------------------------ options through merge()


def _best_rank(x: np.ndarray, k: int) -> np.ndarray:
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("method,options,reference_fn", [
    ("iso_cts", dict(common_fraction=0.5), lambda d: np_iso_cts(d, 0.5, scaling=0.7)),
    ("core_iso_cts", dict(common_fraction=0.3), lambda d: np_iso_cts(d, 0.3, scaling=0.7)),
    ("tsv_m", dict(tsv_keep=1), lambda d: np_tsv(d, 1, scaling=0.7)[0]),
    ("mm_svd", dict(output_rank=2), lambda d: _best_rank(0.7 * d.sum(0), 2)),
    ("sftm", dict(eta=0.4), lambda d: np_sftm(d, eta=0.4, gamma=0.7)[0]),
])
def test_method_options_through_merge(method, options, reference_fn):
  """The per-method options of `merge` reach the methods: each module against the float64
  reference with that option, and recorded in the settings."""
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=3)
  result = knots_jax.merge(adapters, method, scaling=0.7, dtype="float64", **options)
  default = knots_jax.merge(adapters, method, scaling=0.7, dtype="float64")
  changed = False
  for m, deltas in synthetic.dense_deltas(adapters).items():
    ref = reference_fn(deltas)
    np.testing.assert_allclose(result.delta(m), ref, atol=1e-7 * np.abs(ref).max(), err_msg=m)
    changed |= not np.allclose(default.delta(m), ref, atol=1e-6 * np.abs(ref).max())
  assert changed, "the option did not change the merge"
  for name, value in options.items():
    assert result.settings[name] == value


def test_method_options_are_checked():
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=3)
  with pytest.raises(ValueError, match="eta=0.5 applies to sftm, not to `ties`"):
    knots_jax.merge(adapters, "ties", eta=0.5)
  with pytest.raises(ValueError, match="common_fraction=0.5 applies to iso_cts and core_iso_cts"):
    knots_jax.merge(adapters, "tsv_m", common_fraction=0.5)
  with pytest.raises(ValueError, match="eta must be in"):
    knots_jax.merge(adapters, "sftm", eta=0.0)
  with pytest.raises(ValueError, match="tsv_keep must be a non-negative integer"):
    knots_jax.merge(adapters, "tsv_m", tsv_keep=-1)
  assert "eta" not in knots_jax.merge(adapters, "ta").settings   # only the method's own options
