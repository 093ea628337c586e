"""Identities and options of `merge`."""

import numpy as np
import pytest

import knots_jax
from knots_jax.merging import kernels
from knots_jax.methods import registry
from tests import reference, synthetic


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(4, 2, 3), seed=5)


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_knots_ta_equals_ta(adapters):
  ta = knots_jax.merge(adapters, "ta", scaling=0.7)
  knots_ta = knots_jax.merge(adapters, "knots_ta", scaling=0.7)
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
  core = knots_jax.merge(adapters, method, path="core", concat=concat, dtype="float64", **kw)
  dense = knots_jax.merge(adapters, method, path="dense", concat=concat, dtype="float64", **kw)
  for m in adapters.module_names:
    assert _rel(core.delta(m), dense.delta(m)) < 1e-5


def test_rows_concatenation_differs_from_columns(adapters):
  cols = knots_jax.merge(adapters, "knots_ties", top_k=20, dtype="float64")
  rows = knots_jax.merge(adapters, "knots_ties", top_k=20, concat="rows", dtype="float64")
  m = adapters.module_names[0]
  assert _rel(rows.delta(m), cols.delta(m)) > 1e-3


def test_sweep_on_one_alignment_equals_fresh_merges(adapters):
  alignment = knots_jax.align(adapters)
  for top_k in (10, 60):
    swept = knots_jax.merge(alignment, "knots_ties", top_k=top_k, scaling=0.5)
    fresh = knots_jax.merge(adapters, "knots_ties", top_k=top_k, scaling=0.5)
    for m in adapters.module_names:
      np.testing.assert_array_equal(swept.delta(m), fresh.delta(m))


def test_dare_is_deterministic_given_a_seed(adapters):
  a = knots_jax.merge(adapters, "knots_dare_ties", seed=3, drop_rate=0.5)
  b = knots_jax.merge(adapters, "knots_dare_ties", seed=3, drop_rate=0.5)
  c = knots_jax.merge(adapters, "knots_dare_ties", seed=4, drop_rate=0.5)
  m = adapters.module_names[0]
  np.testing.assert_array_equal(a.delta(m), b.delta(m))
  assert _rel(c.delta(m), a.delta(m)) > 1e-3


def test_dare_drop_rates_share_one_program(adapters):
  """p is traced, not static: a sweep over drop rates compiles the DARE kernel once."""
  knots_jax.merge(adapters, "dare_ties", seed=3, drop_rate=0.2)
  compiled = kernels.dare_stack._cache_size()
  results = [knots_jax.merge(adapters, "dare_ties", seed=3, drop_rate=p) for p in (0.3, 0.7, 0.9)]
  assert kernels.dare_stack._cache_size() == compiled
  m = adapters.module_names[0]
  assert _rel(results[0].delta(m), results[2].delta(m)) > 1e-3


def test_layer_scope_matches_per_module_reference(adapters):
  """top_k_scope="layer": the reference applied to each module on its own."""
  result = knots_jax.merge(adapters, "ties", top_k=30, scaling=0.9, top_k_scope="layer",
                           dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    expected = reference.merge({m: d}, "ties", top_k=30, scaling=0.9)[m]
    np.testing.assert_allclose(result.delta(m), expected, atol=1e-6 * np.abs(expected).max())
  model = knots_jax.merge(adapters, "ties", top_k=30, scaling=0.9, dtype="float64")
  assert any(_rel(model.delta(m), result.delta(m)) > 1e-3 for m in adapters.module_names)


def test_top_k_100_keeps_everything_so_ties_is_sign_consensus_mean(adapters):
  result = knots_jax.merge(adapters, "ties", top_k=100, dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    sign = np.sign(d.sum(0))
    agree = np.where(sign > 0, d > 0, d < 0)
    expected = (d * agree).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(result.delta(m), expected, atol=1e-6)


def test_dense_baselines_are_dense_and_need_a_rank_for_lora(adapters):
  result = knots_jax.merge(adapters, "ties")
  assert not result.is_factored
  with pytest.raises(ValueError, match="dense"):
    next(result.factors())


def test_output_rank_and_stats(adapters, tmp_path):
  """stats.output_rank is the rank of the adapter that is written (zero components left
  out: 4 + 2 + 3), not the padded n * max rank (12)."""
  result = knots_jax.merge(adapters, "knots_ties")
  report = knots_jax.save_peft_adapter(result, str(tmp_path / "a"))
  assert result.stats["output_rank"] == report["rank"] == 4 + 2 + 3
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
    knots_jax.merge(adapters, **kwargs)


def test_modules_to_save_need_an_explicit_choice():
  base = synthetic.adapter_set(ranks=(2, 2), seed=1)
  extra = [np.full((3, 2), float(i + 1), np.float32) for i in range(2)]
  adapters = knots_jax.AdapterSet(tuple(
      knots_jax.Adapter(a.path, a.name, a.config, a.modules, {"lm_head.weight": e})
      for a, e in zip(base.adapters, extra)))
  with pytest.raises(ValueError, match="lm_head.weight.*modules_to_save="):
    knots_jax.merge(adapters, "knots_ta")
  mean = knots_jax.merge(adapters, "knots_ta", modules_to_save="mean")
  assert mean.stats["modules_to_save"] == {"tensors": ["lm_head.weight"], "mode": "mean"}
  np.testing.assert_array_equal(mean.extra["lm_head.weight"], np.full((3, 2), 1.5))
  first = knots_jax.merge(adapters, "knots_ta", modules_to_save="first")
  np.testing.assert_array_equal(first.extra["lm_head.weight"], extra[0])
  assert knots_jax.merge(adapters, "knots_ta", modules_to_save="drop").extra == {}


@pytest.mark.parametrize("method", ["direct_merge", "tsv_m", "sftm"])
def test_factor_methods_reproduce_a_single_adapter(method):
  """With one adapter and scaling 1, DM, TSV-M and SFTM return that adapter's update."""
  single = synthetic.adapter_set(ranks=(3,), seed=9)
  result = knots_jax.merge(single, method, scaling=1.0, dtype="float64")
  assert result.is_factored
  for m, d in synthetic.dense_deltas(single).items():
    np.testing.assert_allclose(result.delta(m), d[0], atol=1e-8 * np.abs(d).max())


def test_iso_c_flattens_the_task_arithmetic_spectrum(adapters):
  result = knots_jax.merge(adapters, "iso_c", scaling=0.5, dtype="float64")
  for m, d in synthetic.dense_deltas(adapters).items():
    ta = np.linalg.svd(d.sum(0), compute_uv=False)
    ta = ta[ta > 1e-5 * ta[0]]
    merged = np.linalg.svd(result.delta(m), compute_uv=False)[:len(ta)]
    np.testing.assert_allclose(merged, 0.5 * ta.mean(), rtol=1e-8)


def test_factor_methods_run_from_the_cli_table(adapters):
  for method in ("iso_cts", "tsv_m", "direct_merge"):
    assert method in registry.METHODS
    result = knots_jax.merge(adapters, method)
    assert result.is_factored and result.settings["method"] == method


def _scaled(adapters, factor):
  """The same adapters with every B multiplied by `factor` (finite, e.g. 1e30)."""
  return knots_jax.AdapterSet(tuple(
      knots_jax.Adapter(a.path, a.name, a.config,
                        {m: knots_jax.LoraFactors(f.a, (f.b * np.float32(factor)), f.scale)
                         for m, f in a.modules.items()}, a.extra)
      for a in adapters.adapters))


@pytest.mark.parametrize("method", ["ta", "ties", "knots_ties", "mm_svd"])
def test_a_merge_that_overflows_float32_is_refused_naming_the_modules(method):
  """Finite factors whose products overflow float32 (1e30 * 1e30) give inf: refused,
  with the modules named, instead of a result full of inf/NaN."""
  adapters = _scaled(synthetic.adapter_set(ranks=(2, 3), seed=0), 1e30)
  assert all(np.isfinite(f.b).all() for a in adapters.adapters for f in a.modules.values())
  with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in \d+ module\(s\): "
                                       r"model\.layers\.\d\.self_attn"):
    knots_jax.merge(adapters, method, scaling=1e30)


def test_a_tol_that_drops_every_component_is_refused(adapters):
  with pytest.raises(ValueError, match="tol=1000.0 drops every singular component of 4 module"):
    knots_jax.merge(adapters, "knots_ties", tol=1e3)
  # the reference's tol keeps the components of these updates
  assert knots_jax.merge(adapters, "knots_ties").stats["kept_components"]["min"] > 0


@pytest.mark.parametrize("method", ["dare", "dare_ties", "knots_dare_ties", "core_dare_ties"])
def test_a_modules_dare_mask_does_not_depend_on_how_modules_are_stacked(method):
  """The same module merged alone or beside others gets the same DARE mask (docs/design.md:
  one key per module, from the seed and its name)."""
  full = synthetic.adapter_set(ranks=(2, 3, 4), seed=7)
  module = "model.layers.1.self_attn.q_proj"
  alone = knots_jax.AdapterSet(tuple(
      knots_jax.Adapter(a.path, a.name, a.config, {module: a.modules[module]}, a.extra)
      for a in full.adapters))
  kw = dict(seed=5, drop_rate=0.5, top_k=100, dtype="float64")
  together = knots_jax.merge(full, method, **kw).delta(module)
  single = knots_jax.merge(alone, method, **kw).delta(module)
  np.testing.assert_allclose(single, together, rtol=1e-9, atol=1e-12 * np.abs(together).max())
  other_seed = knots_jax.merge(alone, method, **{**kw, "seed": 6}).delta(module)
  assert _rel(other_seed, single) > 1e-3
