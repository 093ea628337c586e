"""The linear search: it picks the best validation setting, aligns once, rescales exactly."""

import numpy as np
import pytest

import knots_jax
from knots_jax.alignment import decompose, knots_svd
from knots_jax.evaluation import search
from knots_jax.methods import registry
from tests import synthetic

SCALINGS = (0.3, 0.7, 1.0)
TOP_KS = (20.0, 40.0, 60.0)
DROPS = (0.9, 0.5)   # each p compiles its own DARE kernel (static in merging)


@pytest.fixture(scope="module")
def adapters():
  return synthetic.adapter_set(ranks=(2, 3, 2))


@pytest.fixture(scope="module")
def alignment(adapters):
  return knots_jax.align(adapters)


class Recorder:
  """evaluate(result, split): a known function of the merge's settings, with a call log."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, result, split):
    self.calls.append((split, dict(result.settings)))
    return self.fn(result.settings)


def _peak(alpha, k=None, p=None):
  """Single-peaked in each hyper-parameter: best at alpha 0.7, top-K 40, p 0.5."""
  return lambda s: (-(s["scaling"] - alpha) ** 2
                    - (0 if k is None else (s["top_k"] - k) ** 2 / 1e4)
                    - (0 if p is None else (s["drop_rate"] - p) ** 2))


def _max_diff(a, b):
  return max(float(np.max(np.abs(a.delta(m) - b.delta(m)))) for m in a.module_names)


def test_picks_the_best_alpha_then_top_k_and_evaluates_test_once(alignment):
  evaluate = Recorder(_peak(0.7, k=40))
  found = search.linear_search(alignment, "knots_ties", evaluate, scalings=SCALINGS, top_ks=TOP_KS)
  assert found.best == {"scaling": 0.7, "top_k": 40.0}
  # stage 1: alpha at the default top-K 30; stage 2: top-K at alpha 0.7
  assert [t.settings for t in found.trials] == (
      [{"scaling": a, "top_k": 30.0} for a in SCALINGS]
      + [{"scaling": 0.7, "top_k": k} for k in TOP_KS])
  assert [c[0] for c in evaluate.calls] == ["val"] * 6 + ["test"]
  assert evaluate.calls[-1][1]["scaling"] == 0.7 and evaluate.calls[-1][1]["top_k"] == 40.0
  assert found.val_score == pytest.approx(_peak(0.7, k=40)({"scaling": 0.7, "top_k": 40.0}))
  assert found.test_score == found.val_score
  # one merge at alpha = 1 rescaled for stage 1, then one per top-K
  assert found.merges == 1 + len(TOP_KS)
  assert all(t.rescaled for t in found.trials[:3]) and not any(t.rescaled for t in found.trials[3:])
  # the returned merge is the chosen setting's
  direct = knots_jax.merge(alignment, "knots_ties", scaling=0.7, top_k=40)
  assert _max_diff(found.result, direct) < 1e-6
  records = found.to_records()
  assert len(records) == 7 and records[-1]["split"] == "test" and records[-1]["top_k"] == 40.0


def test_dare_like_methods_search_the_drop_rate(alignment):
  evaluate = Recorder(_peak(0.3, p=0.5))
  found = search.linear_search(alignment, "knots_dare_ties", evaluate, scalings=SCALINGS,
                               drop_rates=DROPS, seed=3)
  # DARE-TIES keeps top-K at 100 (the paper's KnOTS-DARE-TIES); p is 0.9 while alpha is searched
  assert found.best == {"scaling": 0.3, "top_k": 100.0, "drop_rate": 0.5}
  assert found.trials[0].settings == {"scaling": 0.3, "top_k": 100.0, "drop_rate": 0.9}
  assert found.trials[3].reused     # p 0.9 at alpha 0.3 was stage 1's best: not evaluated again
  assert found.merges == 1 + 1
  direct = knots_jax.merge(alignment, "knots_dare_ties", scaling=0.3, top_k=100, drop_rate=0.5,
                           seed=3)
  assert _max_diff(found.result, direct) < 1e-6


def test_linear_methods_only_search_alpha(alignment):
  evaluate = Recorder(_peak(0.7))
  found = search.linear_search(alignment, "ta", evaluate, scalings=SCALINGS)
  assert found.best == {"scaling": 0.7} and len(found.trials) == 3 and found.merges == 1
  direct = knots_jax.merge(alignment, "ta", scaling=0.7)
  assert _max_diff(found.result, direct) < 1e-6


# Every method the search rescales (any added to the table later too), without the DARE
# ones that compile slowly; two DARE methods are checked on their own.
RESCALED = sorted(m for m in registry.METHODS
                  if search.is_homogeneous(m) and not registry.METHODS[m].dare)


@pytest.mark.parametrize("method", RESCALED + ["dare", "knots_dare_ties"])
def test_rescaled_merge_equals_a_direct_merge(alignment, method):
  unit = knots_jax.merge(alignment, method, scaling=1.0, top_k=30, drop_rate=0.5, seed=1)
  for alpha in (0.3, -0.6):
    direct = knots_jax.merge(alignment, method, scaling=alpha, top_k=30, drop_rate=0.5, seed=1)
    scaled = search.rescale(unit, alpha, alpha)
    scale = max(float(np.max(np.abs(direct.delta(m)))) for m in direct.module_names)
    # SVD-based methods: float32 SVDs of alpha * X and X round differently (~1e-6).
    rtol = 1e-5 if registry.METHODS[method].combine in ("factors", "matrices") else 1e-6
    assert _max_diff(scaled, direct) <= rtol * scale
    assert scaled.settings["scaling"] == alpha


@pytest.mark.parametrize("method", sorted(m for m in registry.METHODS
                                          if not search.is_homogeneous(m)))
def test_non_homogeneous_methods_are_not_proportional_to_alpha(alignment, method):
  """The methods the search merges for every alpha really are not alpha times the
  alpha = 1 merge (so the flag is not merely conservative)."""
  unit = knots_jax.merge(alignment, method, scaling=1.0, seed=1)
  direct = knots_jax.merge(alignment, method, scaling=0.3, seed=1)
  scale = max(float(np.max(np.abs(direct.delta(m)))) for m in direct.module_names)
  assert _max_diff(search.rescale(unit, 0.3, 0.3), direct) > 1e-3 * scale


def test_non_homogeneous_methods_are_merged_for_every_alpha(alignment):
  found = search.linear_search(alignment, "direct_merge", Recorder(_peak(0.3)),
                               scalings=SCALINGS)
  assert found.merges == len(SCALINGS) and not any(t.rescaled for t in found.trials)
  assert found.best == {"scaling": 0.3}


def test_dm_ties_searches_alpha_by_merging_then_top_k(alignment):
  """dm_ties: alpha weighs both factors (merged per alpha), then top-K; the chosen merge is
  the direct one."""
  found = search.linear_search(alignment, "dm_ties", Recorder(_peak(0.7, k=40)),
                               scalings=SCALINGS, top_ks=TOP_KS)
  assert found.best == {"scaling": 0.7, "top_k": 40.0}
  assert [t.settings for t in found.trials] == (
      [{"scaling": a, "top_k": 30.0} for a in SCALINGS]
      + [{"scaling": 0.7, "top_k": k} for k in TOP_KS])
  assert not any(t.rescaled for t in found.trials)
  direct = knots_jax.merge(alignment, "dm_ties", scaling=0.7, top_k=40)
  assert _max_diff(found.result, direct) < 1e-6


def test_an_adapter_set_is_aligned_exactly_once(adapters, monkeypatch):
  calls = {"align": 0, "stacks": 0}
  align, align_stack = decompose.align, knots_svd.align_stack

  def counting_align(*args, **kwargs):
    calls["align"] += 1
    return align(*args, **kwargs)

  def counting_stack(*args, **kwargs):
    calls["stacks"] += 1
    return align_stack(*args, **kwargs)

  monkeypatch.setattr(decompose, "align", counting_align)
  monkeypatch.setattr(knots_svd, "align_stack", counting_stack)
  found = search.linear_search(adapters, "knots_ties", Recorder(_peak(0.7, k=40)),
                               scalings=SCALINGS, top_ks=TOP_KS, dtype="float64")
  stacks = len({shape for shape in synthetic.SHAPES.values()})
  assert calls == {"align": 1, "stacks": stacks}
  assert found.result.settings["dtype"] == "float64"
  calls.update(align=0, stacks=0)
  aligned = align(adapters)
  search.linear_search(aligned, "knots_ties", Recorder(_peak(0.7, k=40)), scalings=SCALINGS,
                       top_ks=TOP_KS)
  assert calls == {"align": 0, "stacks": stacks}   # only the explicit align above


def test_ties_keep_the_first_best(alignment):
  found = search.linear_search(alignment, "knots_ties", Recorder(lambda s: 1.0),
                               scalings=SCALINGS, top_ks=TOP_KS)
  # every score equal: alpha 0.3 (first), and stage 2 never beats stage 1's (0.3, 30)
  assert found.best == {"scaling": 0.3, "top_k": 30.0}


def test_stop_early_follows_the_reference_rule(alignment):
  table = {0.1: 1.0, 0.2: 2.0, 0.3: 1.5, 0.4: 5.0}
  evaluate = Recorder(lambda s: table[round(s["scaling"], 1)])
  grid = (0.1, 0.2, 0.3, 0.4)
  full = search.linear_search(alignment, "ta", evaluate, scalings=grid)
  assert full.best == {"scaling": 0.4}
  early = search.linear_search(alignment, "ta", evaluate, scalings=grid, stop_early=True)
  assert early.best == {"scaling": 0.2} and len(early.trials) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(scaling=0.5), "scalings="),
    (dict(drop_rates=(0.5, 1.0)), "drop_rates"),
    (dict(top_ks=(10, 0)), "positive"),
    (dict(scalings=()), "empty"),
    (dict(path="dense"), "only apply when aligning"),
])
def test_bad_arguments(alignment, kwargs, match):
  with pytest.raises(ValueError, match=match):
    search.linear_search(alignment, "knots_dare_ties" if "drop_rates" in kwargs else "knots_ties",
                         Recorder(lambda s: 0.0), **kwargs)


def test_bad_evaluate_and_method(alignment):
  with pytest.raises(ValueError, match="finite"):
    search.linear_search(alignment, "ta", lambda r, s: float("nan"), scalings=SCALINGS)
  with pytest.raises(ValueError, match="number"):
    search.linear_search(alignment, "ta", lambda r, s: "good", scalings=SCALINGS)
  with pytest.raises(ValueError, match="unknown method"):
    search.linear_search(alignment, "nope", lambda r, s: 0.0)


def test_which_methods_are_rescaled():
  for method in ("ta", "knots_ta", "mean", "ties", "knots_ties", "dare", "knots_dare_ties",
                 "iso_c", "iso_cts", "tsv_m", "sftm", "mm_svd", "core_tsv_m", "knots_tsv_m"):
    assert search.is_homogeneous(method), method
  for method in ("direct_merge", "dm_ties", "dm_dare", "dm_dare_ties", "mm_noise"):
    assert not search.is_homogeneous(method), method


def test_searched_parameter_per_method():
  assert search.searched_parameter("knots_ties") == "top_k"
  assert search.searched_parameter("ties") == "top_k"
  assert search.searched_parameter("dare") == "drop_rate"
  assert search.searched_parameter("knots_dare_ties") == "drop_rate"
  assert search.searched_parameter("knots_ta") is None
  assert search.searched_parameter("tsv_m") is None
  assert search.searched_parameter("dm_ties") == "top_k"
  assert search.searched_parameter("dm_dare") == "drop_rate"
  assert search.searched_parameter("dm_dare_ties") == "drop_rate"
  assert search.searched_parameter("direct_merge") is None


def test_dm_dare_ties_search_keeps_top_k_100_and_sweeps_the_drop_rate():
  """Like DARE-TIES, dm_dare_ties holds top-K at 100 while alpha and p are searched."""
  config = search._search_config("dm_dare_ties", None, None, 0, {})
  assert config.top_k == search.DARE_TIES_TOP_K
  assert search._search_config("dm_ties", None, None, 0, {}).top_k == search.DEFAULT_TOP_K
