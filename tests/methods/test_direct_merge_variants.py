"""DM with TIES / DARE ("LoRA Merging with SVD", §3.2 and Table 1): `dm_ties`, `dm_dare`,
`dm_dare_ties` merge the stacked B_i and the stacked A_i separately, then B_m A_m.

Checked against float64 NumPy written from the definitions (TIES, Yadav et al. 2023:
trim each factor tensor to its top-K magnitudes, elect the sign by the sum, disjoint
mean; DARE, Yu et al. 2024: Bernoulli keep masks, 1 / (1 - p) rescale, with the masks
drawn from the package's documented key scheme), against PEFT's own
`add_weighted_adapter(combination_type="ties" | "dare_linear" | "dare_ties")` where the
semantics agree, and through the command line.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import knots_jax
from knots_jax.adapters.peft_files import AdapterSet, LoraFactors
from knots_jax.merging import kernels
from knots_jax.methods import entrywise, registry
from knots_jax.methods.options import MergeConfig, users
from tests import reference, synthetic

WEIGHTS = (0.5, -1.25, 2.0)
SCALING = 0.7


@pytest.fixture(scope="module")
def adapters():
  """Ranks 2, 3, 4 (ragged: zero-padded to 4 in the stacks), scales 0.5, 0.75, 1."""
  return synthetic.adapter_set(ranks=(2, 3, 4), seed=11)


# ------------------------------------------------ float64 NumPy, from the definitions


def np_ties(xs, top_k: float, w, shape):
  """TIES of one factor: xs[i] is task i's unpadded tensor; trim each to its top-K share
  of entries (|x| >= the (d - int(d K))-th smallest), zero-pad to `shape`, elect
  sign(sum) (zero sums: the sign of the sum of elected signs of this tensor), then the
  disjoint mean of the w_i-weighted agreeing values."""
  pruned = []
  for x in xs:
    kept = x * reference.topk_values_mask(x.reshape(1, -1), top_k).reshape(x.shape)
    pruned.append(np.pad(kept, [(0, s - d) for s, d in zip(shape, x.shape)]))
  pruned = np.stack(pruned).reshape(len(xs), -1)
  sign = reference.resolve_sign(pruned)
  agree = np.where(sign[None] > 0, pruned > 0, pruned < 0)
  total = np.sum(np.asarray(w)[:, None] * pruned * agree, axis=0)
  return (total / np.maximum(agree.sum(axis=0), 1)).reshape(shape)


def pad_to(x, shape):
  return np.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def our_masks(module: str, n: int, out: int, r: int, inp: int, seed: int, p: float):
  """The keep masks of one module as the docs state them: key = module_keys(seed, [m]),
  B's masks [n, out, r] from fold_in(key, 0), A's [n, r, in] from fold_in(key, 1)."""
  key = kernels.module_keys(seed, [module])[0]
  keep = kernels.keep_probability(p)
  mb = entrywise.keep_mask(jax.random.fold_in(key, 0), (n, out, r), keep)
  ma = entrywise.keep_mask(jax.random.fold_in(key, 1), (n, r, inp), keep)
  return np.asarray(mb), np.asarray(ma)


def np_dm(adapters, method: str, scaling: float, weights, top_k: float = 100.0,
          drop_rate: float = 0.0, seed: int = 0):
  """{module: (B_m, A_m)} of dm_ties / dm_dare / dm_dare_ties in float64."""
  w = scaling * np.asarray(weights)
  out = {}
  for m, (bs, as_) in reference.lora_factors(adapters).items():
    r = max(b.shape[1] for b in bs)
    o, i = bs[0].shape[0], as_[0].shape[1]
    if "dare" in method:
      mb, ma = our_masks(m, len(bs), o, r, i, seed, drop_rate)
      bs = [np.where(mb[t, :, :b.shape[1]], b / (1 - drop_rate), 0) for t, b in enumerate(bs)]
      as_ = [np.where(ma[t, :a.shape[0]], a / (1 - drop_rate), 0) for t, a in enumerate(as_)]
    if method == "dm_dare":
      out[m] = (sum(wt * pad_to(b, (o, r)) for wt, b in zip(w, bs)),
                sum(wt * pad_to(a, (r, i)) for wt, a in zip(w, as_)))
    else:
      out[m] = (np_ties(bs, top_k, w, (o, r)), np_ties(as_, top_k, w, (r, i)))
  return out


def assert_factors_equal(result, expected, atol=1e-12):
  got = {m: (b, a) for m, b, a in result.factors()}
  assert sorted(got) == sorted(expected)
  for m, (b, a) in expected.items():
    np.testing.assert_allclose(got[m][0], b, atol=atol, err_msg=m)
    np.testing.assert_allclose(got[m][1], a, atol=atol, err_msg=m)
    np.testing.assert_allclose(result.delta(m), b @ a, atol=atol * 10, err_msg=m)


# ----------------------------------------------------------------- the method table


def test_rows_options_and_listing():
  for name in ("dm_ties", "dm_dare", "dm_dare_ties"):
    row = registry.get_method(name)
    assert row.combine == "factors" and row.space == "full" and not row.homogeneous
    assert "LoRA Merging with SVD" in row.reference and "Table 1" in row.reference
    assert name in kernels.FACTOR_KERNELS
  assert registry.METHODS["dm_dare"].dare and registry.METHODS["dm_dare_ties"].dare
  assert not registry.METHODS["dm_ties"].dare
  assert {"dm_ties", "dm_dare_ties"} <= set(users("top_k"))
  assert "dm_dare" not in users("top_k") and "direct_merge" not in users("top_k")
  assert {"dm_dare", "dm_dare_ties"} <= set(users("drop_rate")) & set(users("seed"))
  assert "dm_ties" not in users("drop_rate") and "dm_ties" not in users("seed")
  # TIES on factor tensors is per tensor: top_k_scope is not one of their options.
  assert not any(m.startswith("dm_") for m in users("top_k_scope"))
  settings = MergeConfig(method="dm_dare_ties", top_k=20, drop_rate=0.3, seed=4).applicable()
  assert settings["top_k"] == 20 and settings["drop_rate"] == 0.3 and settings["seed"] == 4
  from knots_jax.cli import main
  table = main.methods_table()
  assert all(f"\n{name} " in table for name in ("dm_ties", "dm_dare", "dm_dare_ties"))


# ------------------------------------------------------------------ against NumPy


@pytest.mark.parametrize("top_k", [20, 55, 100])
@pytest.mark.parametrize("integer", [False, True], ids=["normal", "ties_in_magnitude"])
def test_dm_ties_equals_the_numpy_definition(top_k, integer):
  """Ragged ranks (thresholds count each task's unpadded B_i, A_i), per-adapter weights
  (negative included) and integer factors, whose many equal magnitudes and zero sign
  sums exercise the `>=` threshold and the majority rule."""
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=5, integer=integer)
  got = knots_jax.merge(adapters, "dm_ties", top_k=top_k, scaling=SCALING, weights=WEIGHTS,
                        dtype="float64")
  assert got.settings["top_k"] == top_k and got.is_factored
  assert_factors_equal(got, np_dm(adapters, "dm_ties", SCALING, WEIGHTS, top_k=top_k))


@pytest.mark.parametrize("method", ["dm_dare", "dm_dare_ties"])
def test_dm_dare_equals_the_numpy_definition_with_the_same_masks(adapters, method):
  got = knots_jax.merge(adapters, method, top_k=40, drop_rate=0.4, seed=9, scaling=SCALING,
                        weights=WEIGHTS, dtype="float64")
  expected = np_dm(adapters, method, SCALING, WEIGHTS, top_k=40, drop_rate=0.4, seed=9)
  assert_factors_equal(got, expected, atol=1e-11)


def test_float32_merge_is_the_float64_one(adapters):
  for method in ("dm_ties", "dm_dare_ties"):
    lo = knots_jax.merge(adapters, method, top_k=40, drop_rate=0.2, seed=1)
    hi = knots_jax.merge(adapters, method, top_k=40, drop_rate=0.2, seed=1, dtype="float64")
    for m in adapters.module_names:
      scale = np.abs(hi.delta(m)).max()
      np.testing.assert_allclose(lo.delta(m), hi.delta(m), atol=1e-5 * scale, err_msg=method)


def _positive(adapters: AdapterSet) -> AdapterSet:
  """The same adapters with |A|, |B|: every factor entry has one sign."""
  return AdapterSet(tuple(dataclasses.replace(ad, modules={
      m: LoraFactors(np.abs(f.a), np.abs(f.b), f.scale) for m, f in ad.modules.items()})
      for ad in adapters.adapters))


def test_dm_ties_keeping_all_of_one_sign_data_is_direct_merge_of_the_means():
  """top_k 100 keeps every entry, one sign elects no conflict: TIES' disjoint mean is then
  the mean of each factor, so dm_ties(alpha) = direct_merge(alpha / n) (equal ranks: every
  task counts in every entry)."""
  adapters = _positive(synthetic.adapter_set(ranks=(3, 3, 3), seed=2))
  n = len(adapters.adapters)
  ties = knots_jax.merge(adapters, "dm_ties", top_k=100, scaling=0.9, dtype="float64")
  dm = knots_jax.merge(adapters, "direct_merge", scaling=0.9 / n, dtype="float64")
  dm_full = knots_jax.merge(adapters, "direct_merge", scaling=0.9, dtype="float64")
  for m in adapters.module_names:
    np.testing.assert_allclose(ties.delta(m), dm.delta(m), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ties.delta(m) * n ** 2, dm_full.delta(m), rtol=1e-12)
  # With K < 100 the trim changes it.
  trimmed = knots_jax.merge(adapters, "dm_ties", top_k=30, scaling=0.9, dtype="float64")
  m = adapters.module_names[0]
  assert np.abs(trimmed.delta(m) - dm.delta(m)).max() > 1e-3 * np.abs(dm.delta(m)).max()


def test_no_drop_is_no_dare(adapters):
  """p = 0 keeps everything (rescale 1): dm_dare = direct_merge, dm_dare_ties = dm_ties."""
  opts = dict(scaling=SCALING, weights=WEIGHTS, dtype="float64")
  pairs = [(knots_jax.merge(adapters, "dm_dare", drop_rate=0.0, **opts),
            knots_jax.merge(adapters, "direct_merge", **opts)),
           (knots_jax.merge(adapters, "dm_dare_ties", drop_rate=0.0, top_k=35, **opts),
            knots_jax.merge(adapters, "dm_ties", top_k=35, **opts))]
  for got, want in pairs:
    for m in adapters.module_names:
      np.testing.assert_allclose(got.delta(m), want.delta(m), atol=1e-12)


def test_alpha_enters_both_factors(adapters):
  """B_m and A_m are both linear in alpha: the update is alpha^2 times the alpha = 1 one."""
  for method in ("dm_ties", "dm_dare", "dm_dare_ties"):
    one = knots_jax.merge(adapters, method, scaling=1.0, top_k=40, drop_rate=0.5, seed=3,
                          dtype="float64")
    half = knots_jax.merge(adapters, method, scaling=-0.5, top_k=40, drop_rate=0.5, seed=3,
                           dtype="float64")
    for m in adapters.module_names:
      np.testing.assert_allclose(half.delta(m), 0.25 * one.delta(m), atol=1e-12, err_msg=method)


# ------------------------------------------------------------ DARE: masks and seeds


def test_dare_masks_statistics_and_rescale():
  """Each factor keeps a share 1 - p of its entries, kept entries are x / (1 - p); B's and
  A's masks, the tasks' and the modules' masks are drawn independently."""
  L, n, out, r, p = 2, 3, 64, 16, 0.7
  b = np.ones((L, n, out, r))
  a = np.full((L, n, r, out), 2.0)
  keys = kernels.module_keys(5, ["layers.0.q", "layers.1.q"])
  bd, ad = (np.asarray(x) for x in kernels.dare_factors_stack(
      b, a, keys, kernels.keep_probability(p)))
  for x, v in ((bd, 1.0), (ad, 2.0)):
    assert set(np.unique(x)) == {0.0, v / (1 - p)}
    share = np.mean(x != 0, axis=(2, 3))          # [L, n], each of 1024 Bernoulli(0.3)
    sigma = np.sqrt(p * (1 - p) / (out * r))
    assert np.all(np.abs(share - (1 - p)) < 5 * sigma), share
  kb, ka = bd != 0, np.swapaxes(ad != 0, 2, 3)    # same shape [L, n, 64, 16]
  both = np.mean(kb & ka)
  assert abs(both - (1 - p) ** 2) < 0.03          # independent: not 1 - p
  assert np.mean(kb[0] == kb[1]) < 0.75 and np.mean(kb[:, 0] == kb[:, 1]) < 0.75


def test_determinism_by_seed_and_module_name(adapters):
  """The same seed gives the same merge; another seed another one; a module's masks depend on
  its name and the seed only, not on which other modules are merged with it."""
  opts = dict(top_k=50, drop_rate=0.5, dtype="float64")
  for method in ("dm_dare", "dm_dare_ties"):
    one = knots_jax.merge(adapters, method, seed=3, **opts)
    again = knots_jax.merge(adapters, method, seed=3, **opts)
    other = knots_jax.merge(adapters, method, seed=4, **opts)
    for m in adapters.module_names:
      np.testing.assert_array_equal(one.delta(m), again.delta(m))
      assert np.abs(one.delta(m) - other.delta(m)).max() > 1e-6
    keep = adapters.module_names[1]
    alone = AdapterSet(tuple(dataclasses.replace(ad, modules={keep: ad.modules[keep]})
                             for ad in adapters.adapters))
    np.testing.assert_array_equal(knots_jax.merge(alone, method, seed=3, **opts).delta(keep),
                                  one.delta(keep))


def test_dm_dare_is_unbiased_over_seeds():
  """B's and A's masks are independent, so E[B~ A~] = E[B~] E[A~] = B A per task pair: the
  mean of dm_dare over seeds tends to direct_merge (a mask shared by B and A would not)."""
  adapters = synthetic.adapter_set(ranks=(2, 2), seed=1, shapes={"layers.0.q": (6, 5)})
  dm = knots_jax.merge(adapters, "direct_merge", dtype="float64").delta("layers.0.q")
  runs = [knots_jax.merge(adapters, "dm_dare", drop_rate=0.5, seed=s, dtype="float64")
          .delta("layers.0.q") for s in range(400)]
  mean, err = np.mean(runs, axis=0), np.std(runs, axis=0) / np.sqrt(len(runs))
  assert np.all(np.abs(mean - dm) < 5 * err + 1e-9)


# ---------------------------------------------------------------- against PEFT


@pytest.fixture(scope="module")
def peft_family(tmp_path_factory):
  """A tiny Llama and three PEFT adapters, rank 4, lora_alpha 8 (one scale, as PEFT's
  `ties` / `dare_*` need equal ranks and as our weighting equals PEFT's only then)."""
  from tests import peft_factory
  root = tmp_path_factory.mktemp("dm_peft")
  base = peft_factory.make_base_model(str(root / "base"), seed=0)
  paths = [peft_factory.make_lora_adapter(base, str(root / f"t{i}"), seed=40 + i, r=4,
                                          lora_alpha=8) for i in range(3)]
  return base, paths


def _peft_merge(base, paths, combination, weights, density):
  import peft
  import torch
  from tests import peft_factory
  model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base), paths[0],
                                         adapter_name="t0")
  for i, path in enumerate(paths[1:], 1):
    model.load_adapter(path, adapter_name=f"t{i}")
  with torch.no_grad():
    model.add_weighted_adapter(["t0", "t1", "t2"], list(weights), "merged",
                               combination_type=combination, density=density)
  deltas, layers = {}, {}
  for name, module in model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer) and "merged" in module.lora_A:
      key = name.removeprefix("base_model.model.")
      deltas[key] = module.get_delta_weight("merged").detach().double().numpy()
      layers[key] = module
  return deltas, layers


def test_dm_ties_equals_peft_ties(peft_family):
  """PEFT's `ties` merges lora_A and lora_B separately, each tensor trimmed to exactly
  int(density * numel) values (topk); ours keeps |x| >= the (d - int(d K))-th smallest,
  int(d K) + 1 values (the KnOTS reference's rule). density 0.207 against K = 20 % keeps
  the same count in both tensor sizes here (64 and 128 entries). PEFT weighs each factor
  by sqrt(w_i s_i) and elects signs on the raw factors; ours weighs each by alpha w_i with
  s folded into B: the products agree for one scale s when PEFT's w_i = (alpha w_i)^2."""
  base, paths = peft_family
  adapters = knots_jax.load_adapters(paths)
  density, top_k = 0.207, 20
  sizes = {f.a.size for ad in adapters.adapters for f in ad.modules.values()}
  sizes |= {f.b.size for ad in adapters.adapters for f in ad.modules.values()}
  for d in sizes:   # both rules keep the same number of entries of every tensor
    assert int(density * d) == d - entrywise.kth_rank(d, top_k) + 1, d
  ours_w = (0.5, 1.0, 1.5)
  alpha = 0.8
  peft_w = [(alpha * w) ** 2 for w in ours_w]
  want, _ = _peft_merge(base, paths, "ties", peft_w, density)
  got = knots_jax.merge(adapters, "dm_ties", top_k=top_k, scaling=alpha, weights=ours_w,
                        dtype="float64")
  assert sorted(want) == got.module_names
  for m in got.module_names:
    scale = np.abs(want[m]).max()
    np.testing.assert_allclose(got.delta(m), want[m], atol=2e-6 * scale, err_msg=m)
  # And not merely close to something else: the plain direct merge differs.
  dm = knots_jax.merge(adapters, "direct_merge", scaling=alpha, weights=ours_w, dtype="float64")
  m = got.module_names[0]
  assert np.abs(dm.delta(m) - want[m]).max() > 0.1 * np.abs(want[m]).max()


@pytest.mark.parametrize("method,combination", [("dm_dare", "dare_linear"),
                                                ("dm_dare_ties", "dare_ties")])
def test_dm_dare_equals_peft_with_our_masks(peft_family, monkeypatch, method, combination):
  """PEFT's `dare_linear` / `dare_ties` with its random prune replaced by our masks (looked
  up by the tensor PEFT prunes): the same rescale by 1 / density, weighted sum or sign
  election + disjoint mean. PEFT's dare_ties trims nothing by magnitude, which is our
  top_k = 100."""
  import torch
  from peft.utils import merge_utils
  base, paths = peft_family
  adapters = knots_jax.load_adapters(paths)
  p, seed = 0.5, 6
  masks = {}
  for m in adapters.module_names:
    fs = adapters.factors(m)
    out, r, inp = fs[0].b.shape[0], fs[0].rank, fs[0].a.shape[1]
    mb, ma = our_masks(m, len(fs), out, r, inp, seed, p)
    for i, f in enumerate(fs):
      masks[np.ascontiguousarray(f.b, np.float32).tobytes()] = mb[i]
      masks[np.ascontiguousarray(f.a, np.float32).tobytes()] = ma[i]
  used = []

  def our_random_pruning(tensor, density, rescale):
    mask = masks[tensor.detach().cpu().numpy().astype(np.float32).tobytes()]
    used.append(1)
    kept = tensor * torch.as_tensor(np.array(mask), dtype=tensor.dtype)
    return kept / density if rescale else kept

  monkeypatch.setattr(merge_utils, "random_pruning", our_random_pruning)
  alpha, ours_w = 0.9, (1.0, 0.5, 1.25)
  want, _ = _peft_merge(base, paths, combination, [(alpha * w) ** 2 for w in ours_w], 1 - p)
  assert len(used) == 2 * 3 * len(want)   # every factor of every adapter, ours
  got = knots_jax.merge(adapters, method, top_k=100, drop_rate=p, seed=seed, scaling=alpha,
                        weights=ours_w, dtype="float64")
  for m in got.module_names:
    scale = np.abs(want[m]).max()
    np.testing.assert_allclose(got.delta(m), want[m], atol=2e-6 * scale, err_msg=m)


# ---------------------------------------------------------------- the command line


def test_dm_ties_through_the_command_line(tmp_path, capsys):
  from knots_jax.cli import main
  from knots_jax.io import config_args
  repo = os.path.join(os.path.dirname(__file__), "..", "..")
  demo = main.load_config(["--config", os.path.join(repo, "configs", "demo.py")])
  argv = ["merge", "--config", os.path.join(repo, "configs", "merge.py"),
          f"--config.adapters={demo.adapters}", "--config.method=dm_ties",
          "--config.top_k=50", "--config.scaling=0.6", f"--config.output={tmp_path / 'o'}",
          "--config.progress=false"]
  assert main.run(argv) == 0
  summary = json.loads((tmp_path / "o" / "knots_config.json").read_text())
  assert summary["config"]["method"] == "dm_ties" and summary["config"]["top_k"] == 50
  written = knots_jax.load_adapters([str(tmp_path / "o" / "adapter")])
  source = knots_jax.load_adapters(config_args.split_list(demo.adapters))
  want = knots_jax.merge(source, "dm_ties", top_k=50, scaling=0.6)
  for m in source.module_names:
    got = written.factors(m)[0].delta()
    np.testing.assert_allclose(got, want.delta(m), atol=1e-5 * np.abs(want.delta(m)).max())
