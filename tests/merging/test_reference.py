"""The JAX merges against the float64 NumPy reference written from DESIGN.md §3."""

import zlib

import jax
import numpy as np
import pytest

import knots_jax
from knots_jax.alignment import decompose
from tests import reference, synthetic


def module_mask(seed, module, shape, drop_rate):
  """DARE's keep mask of one module as docs/design.md defines it: a key from the seed and
  the module's name only (`fold_in(key(seed), crc32(name))`), Bernoulli(1 - p)."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(module.encode()))
  return np.asarray(jax.random.bernoulli(key, 1.0 - drop_rate, shape))


def _dare_masks(alignment, seed, drop_rate, knots):
  """The keep masks the JAX code draws, per module, cut to the reference's shapes."""
  masks = {}
  if knots:
    for st in alignment.aligned:
      for l, m in enumerate(st.modules):
        keep = module_mask(seed, m, st.rep.shape[1:], drop_rate)
        masks[m] = keep[:, :int(st.num_valid[l])]
  else:
    for f in alignment.factors:
      shape = f.b.shape[1:3] + (f.a.shape[-1],)
      for m in f.modules:
        masks[m] = module_mask(seed, m, shape, drop_rate)
  return masks


def assert_merges_equal(result, expected, rtol=1e-5):
  for m, exp in expected.items():
    np.testing.assert_allclose(result.delta(m), exp, rtol=0, atol=rtol * np.abs(exp).max(),
                               err_msg=f"module {m}")


METHODS = ["ta", "mean", "ties", "dare", "dare_ties",
           "knots_ta", "knots_mean", "knots_ties", "knots_dare", "knots_dare_ties"]


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(2, 3, 4), seed=0)


@pytest.fixture(scope="module")
def alignments(adapters):
  return {"core": knots_jax.align(adapters, dtype="float64"),
          "dense": knots_jax.align(adapters, path="dense", dtype="float64"),
          "factors": decompose.factor_alignment(adapters)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scaling,top_k", [(1.0, 100), (0.6, 20), (0.3, 55), (1.0, 0.1)])
def test_matches_reference(adapters, alignments, method, scaling, top_k):
  knots = method.startswith("knots_")
  seed, p = 7, 0.4
  paths = ["core", "dense"] if knots else ["factors"]
  for path in paths:
    alignment = alignments[path]
    result = knots_jax.merge(alignment, method, scaling=scaling, top_k=top_k, drop_rate=p,
                             seed=seed, dtype="float64")
    masks = _dare_masks(alignment, seed, p, knots) if "dare" in method else None
    expected = reference.merge(synthetic.dense_deltas(adapters), method, scaling=scaling,
                               top_k=top_k, drop_rate=p, keep_masks=masks)
    assert_merges_equal(result, expected)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("top_k", [10, 50, 100])
def test_matches_reference_with_ties_in_magnitude(method, top_k):
  """Factors in {-1, 0, 1}: many task-update entries share one magnitude (and many are 0).

  (Not for KnOTS: such updates have exactly repeated singular values, where the
  aligned basis is not unique; ties at the threshold are covered in test_kth.)
  """
  adapters = synthetic.adapter_set(ranks=(2, 2, 3), seed=3, integer=True)
  deltas = synthetic.dense_deltas(adapters)
  flat = np.concatenate([d.reshape(3, -1) for d in deltas.values()], axis=1)
  assert len(np.unique(np.abs(flat))) < flat.size / 50  # the case really has ties
  alignment = (knots_jax.align(adapters, dtype="float64") if method.startswith("knots")
               else decompose.factor_alignment(adapters))
  result = knots_jax.merge(alignment, method, scaling=0.8, top_k=top_k, drop_rate=0.5, seed=1,
                           dtype="float64")
  masks = _dare_masks(alignment, 1, 0.5, method.startswith("knots")) if "dare" in method else None
  expected = reference.merge(deltas, method, scaling=0.8, top_k=top_k, drop_rate=0.5,
                             keep_masks=masks)
  assert_merges_equal(result, expected)


def test_float32_default_close_to_reference(adapters):
  result = knots_jax.merge(adapters, "knots_ties", scaling=0.6, top_k=20)
  expected = reference.merge(synthetic.dense_deltas(adapters), "knots_ties", scaling=0.6, top_k=20)
  rel = [np.linalg.norm(result.delta(m) - e) / np.linalg.norm(e) for m, e in expected.items()]
  assert max(rel) < 1e-3, rel  # a few near-threshold entries may flip in float32
