"""Identities and options of `merge`."""

import numpy as np
import pytest

import knots_jax
from knots_jax.alignment import decompose
from knots_jax.merging import orchestrate
from knots_jax.methods import registry
from tests import reference, synthetic


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(4, 2, 3), seed=5)


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_knots_ta_equals_ta(adapters):
  ta = orchestrate.merge(adapters, "ta", scaling=0.7)
  knots_ta = orchestrate.merge(adapters, "knots_ta", scaling=0.7)
  assert ta.is_factored and knots_ta.is_factored
  for m in adapters.module_names:
    expected = 0.7 * synthetic.dense_deltas(adapters)[m].sum(axis=0)
    np.testing.assert_allclose(ta.delta(m), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(knots_ta.delta(m), ta.delta(m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,kw", [("knots_ties", dict(top_k=20, scaling=0.6)),
                                       ("knots_ties", dict(top_k=100, scaling=1.0)),
                                       ("knots_dare_ties", dict(top_k=100, drop_rate=0.1)),
                                       ("knots_dare_ties", dict(top_k=40, drop_rate=0.5))])
@pytest.mark.parametrize("concat", ["columns", "rows"])
def test_core_path_equals_dense_path(adapters, method, kw, concat):
  core = orchestrate.merge(adapters, method, path="core", concat=concat, dtype="float64", **kw)
  dense = orchestrate.merge(adapters, method, path="dense", concat=concat, dtype="float64", **kw)
  for m in adapters.module_names:
    assert _rel(core.delta(m), dense.delta(m)) < 1e-5


def test_rows_concatenation_differs_from_columns(adapters):
  cols = orchestrate.merge(adapters, "knots_ties", top_k=20, dtype="float64")
  rows = orchestrate.merge(adapters, "knots_ties", top_k=20, concat="rows", dtype="float64")
  m = adapters.module_names[0]
  assert _rel(rows.delta(m), cols.delta(m)) > 1e-3


def test_sweep_on_one_alignment_equals_fresh_merges(adapters):
  alignment = decompose.align(adapters)
  for top_k in (10, 60):
    swept = orchestrate.merge(alignment, "knots_ties", top_k=top_k, scaling=0.5)
    fresh = orchestrate.merge(adapters, "knots_ties", top_k=top_k, scaling=0.5)
    for m in adapters.module_names:
      np.testing.assert_array_equal(swept.delta(m), fresh.delta(m))


def test_dare_is_deterministic_given_a_seed(adapters):
  a = orchestrate.merge(adapters, "knots_dare_ties", seed=3, drop_rate=0.5)
  b = orchestrate.merge(adapters, "knots_dare_ties", seed=3, drop_rate=0.5)
  c = orchestrate.merge(adapters, "knots_dare_ties", seed=4, drop_rate=0.5)
  m = adapters.module_names[0]
  np.testing.assert_array_equal(a.delta(m), b.delta(m))
  assert _rel(c.delta(m), a.delta(m)) > 1e-3


def test_dare_drop_rates_share_one_program(adapters):
  """p is traced, not static: a sweep over drop rates compiles the DARE kernel once."""
  orchestrate.merge(adapters, "dare_ties", seed=3, drop_rate=0.2)
  compiled = orchestrate._dare_stack._cache_size()
  results = [orchestrate.merge(adapters, "dare_ties", seed=3, drop_rate=p) for p in (0.3, 0.7, 0.9)]
  assert orchestrate._dare_stack._cache_size() == compiled
  m = adapters.module_names[0]
  assert _rel(results[0].delta(m), results[2].delta(m)) > 1e-3


def test_layer_scope_matches_per_module_reference(adapters):
  """top_k_scope="layer": the reference applied to each module on its own."""
  result = orchestrate.merge(adapters, "ties", top_k=30, scaling=0.9, top_k_scope="layer",
                           dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    expected = reference.merge({m: d}, "ties", top_k=30, scaling=0.9)[m]
    np.testing.assert_allclose(result.delta(m), expected, atol=1e-6 * np.abs(expected).max())
  model = orchestrate.merge(adapters, "ties", top_k=30, scaling=0.9, dtype="float64")
  assert any(_rel(model.delta(m), result.delta(m)) > 1e-3 for m in adapters.module_names)


def test_top_k_100_keeps_everything_so_ties_is_sign_consensus_mean(adapters):
  result = orchestrate.merge(adapters, "ties", top_k=100, dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    sign = np.sign(d.sum(0))
    agree = np.where(sign > 0, d > 0, d < 0)
    expected = (d * agree).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(result.delta(m), expected, atol=1e-6)


def test_dense_baselines_are_dense_and_need_a_rank_for_lora(adapters):
  result = orchestrate.merge(adapters, "ties")
  assert not result.is_factored
  with pytest.raises(ValueError, match="dense"):
    next(result.factors())


def test_output_rank_and_stats(adapters):
  result = orchestrate.merge(adapters, "knots_ties")
  assert result.stats["output_rank"] == 3 * 4  # n * max rank (zero-padded)
  assert result.stats["kept_components"]["max"] == 4 + 2 + 3
  assert result.settings["method"] == "knots_ties"


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="knots_magic"), "valid methods: ta, mean, ties"),
    (dict(method="ties", drop_rate=1.0), "drop_rate"),
    (dict(method="ties", top_k=0), "top_k"),
    (dict(method="ties", top_k_scope="tensor"), "top_k_scope"),
    (dict(method="knots_ties", concat="diagonal"), "concat"),
    (dict(method="knots_ties", path="fast"), "alignment path"),
])
def test_bad_options_are_refused(adapters, kwargs, match):
  with pytest.raises(ValueError, match=match):
    orchestrate.merge(adapters, **kwargs)


def test_modules_to_save_need_an_explicit_choice():
  base = synthetic.adapter_set(ranks=(2, 2), seed=1)
  extra = [np.full((3, 2), float(i + 1), np.float32) for i in range(2)]
  adapters = knots_jax.AdapterSet(tuple(
      knots_jax.Adapter(a.path, a.name, a.config, a.modules, {"lm_head.weight": e})
      for a, e in zip(base.adapters, extra)))
  with pytest.raises(ValueError, match="lm_head.weight.*modules_to_save="):
    orchestrate.merge(adapters, "knots_ta")
  mean = orchestrate.merge(adapters, "knots_ta", modules_to_save="mean")
  assert mean.stats["modules_to_save"] == {"tensors": ["lm_head.weight"], "mode": "mean"}
  np.testing.assert_array_equal(mean.extra["lm_head.weight"], np.full((3, 2), 1.5))
  first = orchestrate.merge(adapters, "knots_ta", modules_to_save="first")
  np.testing.assert_array_equal(first.extra["lm_head.weight"], extra[0])
  assert orchestrate.merge(adapters, "knots_ta", modules_to_save="drop").extra == {}


@pytest.mark.parametrize("method", ["direct_merge", "tsv_m", "sftm"])
def test_factor_methods_reproduce_a_single_adapter(method):
  """With one adapter and scaling 1, DM, TSV-M and SFTM return that adapter's update."""
  single = synthetic.adapter_set(ranks=(3,), seed=9)
  result = orchestrate.merge(single, method, scaling=1.0, dtype="float64")
  assert result.is_factored
  for m, d in synthetic.dense_deltas(single).items():
    np.testing.assert_allclose(result.delta(m), d[0], atol=1e-8 * np.abs(d).max())


def test_iso_c_flattens_the_task_arithmetic_spectrum(adapters):
  result = orchestrate.merge(adapters, "iso_c", scaling=0.5, dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    ta = np.linalg.svd(d.sum(0), compute_uv=False)
    ta = ta[ta > 1e-5 * ta[0]]
    merged = np.linalg.svd(result.delta(m), compute_uv=False)[:len(ta)]
    np.testing.assert_allclose(merged, 0.5 * ta.mean(), rtol=1e-8)


def test_factor_methods_run_from_the_cli_table(adapters):
  for method in ("iso_cts", "tsv_m", "direct_merge"):
    assert method in registry.METHODS
    result = orchestrate.merge(adapters, method)
    assert result.is_factored and result.settings["method"] == method
