"""Per-adapter weights (`weights=(w_1, ..., w_n)`): every method against float64 NumPy
references written from the definitions (docs/methods.md, "Per-adapter weights")."""

import numpy as np
import pytest

import knots_jax
from knots_jax.merging import kernels
from tests import reference, synthetic
from tests.merging.test_reference import _dare_masks, assert_merges_equal

WEIGHTS = (0.5, -1.25, 2.0)


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(2, 3, 4), seed=7)


@pytest.fixture(scope="module")
def alignment(adapters):
  return knots_jax.align(adapters, dtype="float64")


@pytest.mark.parametrize("method", ["ta", "mean", "ties", "dare", "dare_ties", "knots_ta",
                                    "knots_ties", "knots_dare_ties", "core_ta", "core_ties"])
@pytest.mark.parametrize("scaling", [1.0, 0.6])
def test_entrywise_methods_weigh_each_task(adapters, alignment, method, scaling):
  """TA: sum alpha w_i x_i; TIES / DARE-TIES: the sign is elected on the unweighted
  pruned values, then alpha w_i multiplies each kept value before the disjoint mean
  (PEFT's `ties`); KnOTS on w_i diag(s) V_i^T; Core Space on w_i M_i."""
  options = dict(top_k=40, drop_rate=0.5, seed=2, dtype="float64")
  source = alignment if method.startswith("knots_") else adapters
  got = knots_jax.merge(source, method, scaling=scaling, weights=WEIGHTS, **options)
  assert got.settings["weights"] == WEIGHTS
  masks = None
  if "dare" in method:
    masks = _dare_masks(alignment, 2, 0.5, method.startswith("knots_"))
  if method.startswith("core_"):
    expected = reference.core_merge(reference.lora_factors(adapters), method, scaling=scaling,
                                    top_k=40, weights=WEIGHTS)
  else:
    expected = reference.merge(synthetic.dense_deltas(adapters), method, scaling=scaling,
                               top_k=40, drop_rate=0.5, keep_masks=masks, weights=WEIGHTS)
  assert_merges_equal(got, expected, rtol=1e-9)


def test_weights_of_one_change_nothing_and_equal_weights_are_alpha(adapters):
  for method in ("ta", "ties", "knots_ties", "direct_merge", "iso_c", "tsv_m", "core_tsv_m"):
    plain = knots_jax.merge(adapters, method, dtype="float64")
    ones = knots_jax.merge(adapters, method, weights=(1.0, 1.0, 1.0), dtype="float64")
    for m in adapters.module_names:
      np.testing.assert_allclose(ones.delta(m), plain.delta(m), atol=1e-12, err_msg=method)
  # Entry-wise methods: equal weights c are the same as alpha = c.
  for method in ("ta", "ties", "knots_ties"):
    alpha = knots_jax.merge(adapters, method, scaling=0.7, dtype="float64")
    equal = knots_jax.merge(adapters, method, weights=(0.7, 0.7, 0.7), dtype="float64")
    for m in adapters.module_names:
      np.testing.assert_allclose(equal.delta(m), alpha.delta(m), atol=1e-12, err_msg=method)


def test_factor_methods_weigh_the_factors_or_the_updates(adapters):
  """DM: (sum alpha w_i B_i)(sum alpha w_i A_i); MM = TA; Iso-C, TSV-M: the method on the
  updates w_i dW_i, then alpha."""
  deltas = synthetic.dense_deltas(adapters)
  factors = reference.lora_factors(adapters)
  w = 0.8 * np.asarray(WEIGHTS)
  dm = knots_jax.merge(adapters, "direct_merge", scaling=0.8, weights=WEIGHTS, dtype="float64")
  iso = knots_jax.merge(adapters, "iso_c", scaling=0.8, weights=WEIGHTS, dtype="float64")
  tsv = knots_jax.merge(adapters, "tsv_m", scaling=0.8, weights=WEIGHTS, dtype="float64")
  for m in adapters.module_names:
    bs, as_ = factors[m]
    r = max(b.shape[1] for b in bs)   # ragged ranks are zero-padded to the largest
    bs = [np.pad(b, ((0, 0), (0, r - b.shape[1]))) for b in bs]
    as_ = [np.pad(a, ((0, r - a.shape[0]), (0, 0))) for a in as_]
    np.testing.assert_allclose(dm.delta(m), sum(wi * b for wi, b in zip(w, bs))
                               @ sum(wi * a for wi, a in zip(w, as_)), atol=1e-10)
    weighted = np.asarray(WEIGHTS)[:, None, None] * deltas[m]
    np.testing.assert_allclose(iso.delta(m), reference.iso_c(weighted, scaling=0.8), atol=1e-9)
    keep = min(weighted.shape[1:]) // len(weighted)
    np.testing.assert_allclose(tsv.delta(m), reference.tsv(weighted, keep, 0.8)[0], atol=1e-9)


def test_knots_ta_equals_ta_with_weights(adapters, alignment):
  ta = knots_jax.merge(adapters, "ta", weights=WEIGHTS, dtype="float64")
  knots_ta = knots_jax.merge(alignment, "knots_ta", weights=WEIGHTS)
  for m in adapters.module_names:
    np.testing.assert_allclose(knots_ta.delta(m), ta.delta(m), atol=1e-10)


def test_bad_weights_are_refused_by_name(adapters):
  with pytest.raises(ValueError, match=r"weights: 2 weight\(s\) for 3 adapter\(s\) \(task0"):
    knots_jax.merge(adapters, "ta", weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="weights item 1 must be a finite number"):
    knots_jax.merge(adapters, "ta", weights=(1.0, float("nan"), 1.0))
  with pytest.raises(ValueError, match="weights item 0 must be a finite number, got 'x'"):
    knots_jax.merge(adapters, "ta", weights="x,1,1")
  assert knots_jax.MergeConfig(weights="0.5, 1,2").weights == (0.5, 1.0, 2.0)


def test_the_search_takes_weights(adapters):
  """linear_search rescales the alpha = 1 merge of homogeneous methods; with weights the
  chosen merge equals a direct merge with the same weights and alpha."""
  from knots_jax.evaluation import search
  target = knots_jax.merge(adapters, "ta", scaling=0.5, weights=WEIGHTS, dtype="float64")

  def evaluate(result, split):
    return -sum(float(np.abs(result.delta(m) - target.delta(m)).max())
                for m in adapters.module_names)

  found = search.linear_search(adapters, "ta", evaluate, scalings=(0.3, 0.5, 1.0),
                               weights=WEIGHTS, dtype="float64")
  assert found.best["scaling"] == 0.5
  for m in adapters.module_names:
    np.testing.assert_allclose(found.result.delta(m), target.delta(m), atol=1e-12)
  assert found.result.settings["weights"] == WEIGHTS
