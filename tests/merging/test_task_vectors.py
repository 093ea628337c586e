"""Full fine-tuned task vectors: SFTM's per-tensor rules, TA and TIES, against the
float64 NumPy references of tests/reference.py."""

import warnings

import numpy as np
import pytest

from knots_jax.merging.task_vectors import merge_task_vectors, tensor_rule, tensor_rules
from knots_jax.methods import svd_family
from tests import reference

# name: (shape, rule SFTM applies). Conv kernels (patch embeddings included) are "matrix"
# (§3.3); they were task arithmetic before issue #8 item 2.
MODEL = {
    "embeddings.patch_embedding.weight": ((8, 3, 2, 2), "matrix"),
    "visual.conv1.weight": ((6, 3, 2, 2), "matrix"),
    "visual.positional_embedding": ((5, 8), "additive"),
    "pos_embed": ((1, 5, 8), "additive"),
    "embeddings.class_embedding": ((8,), "additive"),
    "encoder.layers.0.self_attn.q_proj.weight": ((8, 8), "matrix"),
    "encoder.layers.0.self_attn.q_proj.bias": ((8,), "additive"),
    "encoder.layers.0.layer_norm1.weight": ((8,), "norm"),
    "encoder.layers.0.layer_norm1.bias": ((8,), "norm"),
    "encoder.layers.0.mlp.fc1.weight": ((12, 8), "matrix"),
    "encoder.layers.0.mlp.fc1.bias": ((12,), "additive"),
    "ln_post.weight": ((8,), "norm"),
    "model.norm.weight": ((8,), "norm"),
    "model.layers.0.input_layernorm.weight": ((8,), "norm"),
    "model.embed_tokens.weight": ((20, 8), "additive"),
    "lm_head.weight": ((20, 8), "matrix"),
    "logit_scale": ((), "additive"),
}


def _models(n=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {k: rng.normal(size=shape) for k, (shape, _) in MODEL.items()}
  base["position_ids"] = np.arange(5)[None]
  tuned = []
  for _ in range(n):
    model = {k: v + 0.1 * rng.normal(size=np.shape(v)) for k, v in base.items()
             if k != "position_ids"}
    model["position_ids"] = base["position_ids"].copy()
    tuned.append(model)
  return base, tuned


def _tau(base, tuned, names):
  return {k: np.stack([m[k] for m in tuned]) - base[k] for k in names}


def _kinds():
  """The reference's kind of every tensor of MODEL (tests/reference.py `sftm_model`)."""
  kind = {"additive": "bias", "norm": "norm"}
  return {k: kind.get(rule, "conv" if len(shape) > 2 else "linear")
          for k, (shape, rule) in MODEL.items()} | {"position_ids": "copy"}


def test_rule_dispatch_by_name():
  base, _ = _models()
  expected = {k: rule for k, (_, rule) in MODEL.items()} | {"position_ids": "copy"}
  assert tensor_rules(base) == expected
  assert tensor_rule("h.0.ln_1.weight", np.ones(4)) == "norm"
  assert tensor_rule("transformer.wte.weight", np.ones((5, 4))) == "additive"
  assert tensor_rule("h.0.attn.c_attn.weight", np.ones((5, 4))) == "matrix"
  # A weight of 3+ dimensions is a conv kernel [out, in, k] (it was "additive" before #8).
  assert tensor_rule("h.0.attn.c_attn.weight", np.ones((5, 4, 2))) == "matrix"
  assert tensor_rule("h.0.experts", np.ones((5, 4, 2))) == "additive"
  assert tensor_rules(base, {"lm_head.weight": "additive"})["lm_head.weight"] == "additive"


@pytest.mark.parametrize("eta,gamma,norm_trim", [(1.0, 1.0, True), (0.5, 0.7, True),
                                                (0.2, 0.6, True), (0.3, 0.8, False)])
def test_sftm_rules_match_reference(eta, gamma, norm_trim):
  """Every tensor against Algorithm 2 in NumPy (`reference.sftm_model`): trimmed
  biases / embeddings / norms (before #8 item 1 they were not trimmed), conv
  kernels as matrices (item 2), norms trimmed or not (`norm_trim`)."""
  base, tuned = _models()
  merged = merge_task_vectors(base, tuned, "sftm", gamma=gamma, eta=eta, norm_trim=norm_trim,
                              dtype="float64")
  assert list(merged) == list(base)
  expected = reference.sftm_model(base, tuned, _kinds(), eta=eta, gamma=gamma,
                                  norm_trim=norm_trim)
  for name in MODEL:
    np.testing.assert_allclose(merged[name], expected[name], atol=1e-9, err_msg=name)
  np.testing.assert_array_equal(merged["position_ids"], base["position_ids"])
  assert merged["position_ids"].dtype == base["position_ids"].dtype


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_sftm_alpha_solves_eq_3(eta):
  """u_p^T M v_p = sigma_p for every singular component p of every trimmed task
  matrix, with M = (P - P_pre) / gamma, and alpha = the reference's solution of
  G alpha = sigma, G[p, q] = sigma_q (u_p . u_q)(v_q . v_p)."""
  base, tuned = _models(seed=4)
  name = "encoder.layers.0.mlp.fc1.weight"
  merged = merge_task_vectors(base, tuned, "sftm", gamma=0.5, eta=eta, dtype="float64")
  m = (merged[name] - base[name]) / 0.5
  tau = _tau(base, tuned, [name])[name]
  _, alpha_ref, comps = reference.sftm(tau, eta=eta)
  for s, u, v in comps:
    np.testing.assert_allclose(u @ m @ v, s, rtol=1e-9)
  g, sigma = reference.sftm_system(comps)
  np.testing.assert_allclose(g @ alpha_ref, sigma, rtol=1e-9)
  _, alpha, deficient = svd_family.sftm_dense(tau, eta=eta)
  assert not bool(deficient)
  got = np.asarray(alpha)[np.asarray(alpha) != 0]
  np.testing.assert_allclose(np.sort(got), np.sort(alpha_ref), rtol=1e-8)


def test_biases_and_embeddings_are_trimmed_before_the_sum():
  """Algorithm 2 lines 11, 15: gamma * sum_i trim_eta(tau_i), each tau_i trimmed on its
  own; the untrimmed task-arithmetic sum (the old behaviour) is far from it."""
  base, tuned = _models(seed=5)
  merged = merge_task_vectors(base, tuned, "sftm", gamma=0.9, eta=0.25, dtype="float64")
  for name in ("encoder.layers.0.mlp.fc1.bias", "model.embed_tokens.weight",
               "embeddings.class_embedding", "pos_embed"):
    tau = _tau(base, tuned, [name])[name]
    kept = np.abs(tau) >= np.sort(np.abs(tau.reshape(3, -1)), axis=1)[
        :, tau[0].size - int(tau[0].size * 0.25) - 1].reshape((3,) + (1,) * (tau.ndim - 1))
    np.testing.assert_allclose(merged[name], base[name] + 0.9 * (tau * kept).sum(0),
                               atol=1e-12, err_msg=name)
    assert np.abs(merged[name] - base[name] - 0.9 * tau.sum(0)).max() > 1e-2, name
  # logit_scale (one entry) keeps its only entry: the (1 - int(0.25))-th smallest is itself.
  tau = _tau(base, tuned, ["logit_scale"])["logit_scale"]
  np.testing.assert_allclose(merged["logit_scale"], base["logit_scale"] + 0.9 * tau.sum(0))


def test_norm_trim_chooses_algorithm_2_or_the_plain_mean():
  base, tuned = _models(seed=6)
  name = "encoder.layers.0.layer_norm1.weight"
  tau = _tau(base, tuned, [name])[name]
  trimmed = merge_task_vectors(base, tuned, "sftm", eta=0.3, dtype="float64")[name]
  plain = merge_task_vectors(base, tuned, "sftm", eta=0.3, norm_trim=False,
                             dtype="float64")[name]
  np.testing.assert_allclose(trimmed, base[name] + reference.trim(tau, 0.3).mean(0),
                             atol=1e-12)
  np.testing.assert_allclose(plain, np.mean([m[name] for m in tuned], axis=0), atol=1e-12)
  assert np.abs(trimmed - plain).max() > 1e-2


def test_conv_kernel_is_merged_as_a_matrix():
  """§3.3: a 4-D kernel [out, in, kh, kw] is reshaped to [out, in kh kw], merged by SFTM
  (per-task trim, SVD, system) and reshaped back; before #8 item 2 it was task arithmetic."""
  rng = np.random.default_rng(7)
  shape = (6, 3, 3, 3)
  base = {"visual.conv1.weight": rng.normal(size=shape),
          "visual.transformer.resblocks.0.mlp.c_fc.weight": rng.normal(size=(12, 6))}
  tuned = [{k: v + 0.1 * rng.normal(size=v.shape) for k, v in base.items()} for _ in range(3)]
  assert tensor_rule("visual.conv1.weight", base["visual.conv1.weight"]) == "matrix"
  kinds = {"visual.conv1.weight": "conv",
           "visual.transformer.resblocks.0.mlp.c_fc.weight": "linear"}
  for eta in (1.0, 0.4):
    merged = merge_task_vectors(base, tuned, "sftm", gamma=0.7, eta=eta, dtype="float64")
    expected = reference.sftm_model(base, tuned, kinds, eta=eta, gamma=0.7)
    for name in base:
      assert merged[name].shape == base[name].shape
      np.testing.assert_allclose(merged[name], expected[name], atol=1e-9, err_msg=name)
    tau = _tau(base, tuned, ["visual.conv1.weight"])["visual.conv1.weight"]
    ta = base["visual.conv1.weight"] + 0.7 * tau.sum(0)
    assert np.abs(merged["visual.conv1.weight"] - ta).max() > 1e-2


def test_sftm_of_one_model_is_that_model():
  """n = 1, gamma = 1, eta = 1: alpha = 1, so every rule returns the fine-tuned model."""
  base, tuned = _models(n=1, seed=2)
  merged = merge_task_vectors(base, tuned, "sftm", dtype="float64")
  for name in base:
    np.testing.assert_allclose(merged[name], tuned[0][name], atol=1e-10, err_msg=name)


@pytest.mark.parametrize("method,top_k", [("ta", 30), ("mean", 30), ("ties", 20), ("ties", 100)])
def test_entrywise_methods_match_reference(method, top_k):
  """TA / TIES on every floating tensor; TIES thresholds over the whole model per task."""
  base, tuned = _models(seed=1)
  merged = merge_task_vectors(base, tuned, method, gamma=0.8, top_k=top_k, dtype="float64")
  tau = _tau(base, tuned, MODEL)
  expected = reference.merge(tau, method, scaling=0.8, top_k=top_k)
  for name in MODEL:
    np.testing.assert_allclose(merged[name], base[name] + expected[name], atol=1e-12,
                               err_msg=name)
  np.testing.assert_array_equal(merged["position_ids"], base["position_ids"])


def test_dare_is_deterministic_given_a_seed():
  base, tuned = _models(seed=1)
  run = lambda seed: merge_task_vectors(base, tuned, "dare", seed=seed, drop_rate=0.5,
                                        top_k=100, dtype="float64")
  a, b, c = run(3), run(3), run(4)
  name = "lm_head.weight"
  np.testing.assert_array_equal(a[name], b[name])
  assert np.abs(a[name] - c[name]).max() > 1e-3


def test_float32_output_keeps_the_base_dtypes():
  base, tuned = _models()
  base32 = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in base.items()}
  tuned32 = [{k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in m.items()}
             for m in tuned]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    merged = merge_task_vectors(base32, tuned32, "sftm")
  assert all(merged[k].dtype == base32[k].dtype for k in base32)
  exact = merge_task_vectors(base, tuned, "sftm", dtype="float64")
  for k in MODEL:
    np.testing.assert_allclose(merged[k], exact[k], atol=1e-4, err_msg=k)


def _bad_inputs():
  base, tuned = _models()
  missing = [dict(tuned[0]), *tuned[1:]]
  del missing[0]["lm_head.weight"]
  reshaped = [dict(tuned[0]), *tuned[1:]]
  reshaped[0]["lm_head.weight"] = np.zeros((8, 20))
  moved = [dict(tuned[0]), *tuned[1:]]
  moved[0]["position_ids"] = np.arange(1, 6)[None]
  return [
      (dict(finetuned=[]), "non-empty list"),
      (dict(finetuned=missing), r"model 0 does not match the base: missing \['lm_head.weight'\]"),
      (dict(finetuned=reshaped), "`lm_head.weight` has shape"),
      (dict(finetuned=tuned, method="magic"), "unknown method `magic`"),
      (dict(finetuned=tuned, eta=0.0), "eta must be in"),
      (dict(finetuned=tuned, rules={"nope": "norm"}), "does not have"),
      (dict(finetuned=tuned, rules={"logit_scale": "matrix"}), "needs a 2-D tensor"),
      (dict(finetuned=tuned, rules={"logit_scale": "spin"}), "unknown rules"),
      (dict(finetuned=tuned, method="ta", rules={"logit_scale": "norm"}), "only apply"),
      (dict(finetuned=tuned, method="ta", norm_trim=False), "only applies"),
      (dict(finetuned=tuned, norm_trim="yes"), "norm_trim must be True or False"),
      (dict(finetuned=moved), "`position_ids` differs"),
  ], base


def test_bad_input_is_refused():
  cases, base = _bad_inputs()
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      merge_task_vectors(base, **kwargs)
