"""fisher: per-example Fisher diagonals of NNX models and the Fisher-weighted merge.

References: the hand-derived gradient of a linear softmax classifier
(d log p_y / dW = (e_y - p) x^T, float64 NumPy), `jax.grad` one example at a
time on a model whose kernels hold W0 + delta (no LoRA), and the merge formula
written out in NumPy with W_i = W0 + delta_i.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from knots_jax.adapters.peft_files import Adapter, LoraFactors
from knots_jax.merging import fisher
from knots_jax.models import lora
from tests import synthetic
from tests.merging.test_regmean import as_float64, make_mlp, mlp_adapters

IN, OUT = 5, 3


class Linear(nnx.Module):
  """A linear softmax classifier: logits = x W^T + b."""

  def __init__(self):
    self.head = lora.LoraLinear(IN, OUT, hf_name="head", use_bias=True)

  def __call__(self, x):
    return self.head(x)


def log_softmax_of(model, x):
  return jax.nn.log_softmax(model(x), axis=-1)


def linear_model(seed=0):
  rng = np.random.default_rng(seed)
  model = Linear()
  w0 = rng.normal(size=(OUT, IN)).astype(np.float32)
  bias = rng.normal(size=OUT).astype(np.float32)
  lora.load_hf_tensors(lora.linear_targets(model.head), {"head.weight": w0, "head.bias": bias})
  factors = LoraFactors(rng.normal(size=(2, IN)).astype(np.float32),
                        rng.normal(size=(OUT, 2)).astype(np.float32), 0.5)
  lora.attach_adapter(model, Adapter("mem://t", "t", {}, {"head": factors}, {}))
  weight = w0.astype(np.float64) + factors.delta()      # the adapted weight W0 + delta
  return model, weight, bias.astype(np.float64)


def numpy_probs(weight, bias, x):
  z = x @ weight.T + bias
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def numpy_gradient(weight, bias, x, y):
  """d log p_y(x) / dW = (e_y - p) x^T, per example: [N, out, in]."""
  p = numpy_probs(weight, bias, x)
  return (np.eye(OUT)[y] - p)[:, :, None] * x[:, None, :]


# ------------------------------------------------------------ Fisher diagonal


def test_empirical_fisher_equals_the_hand_derived_gradient():
  model, weight, bias = linear_model()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, IN)).astype(np.float32)
  y = rng.integers(0, OUT, size=8)
  got = fisher.fisher_diagonal(model, log_softmax_of, [(x[:4], y[:4]), (x[4:], y[4:])],
                               n_examples=8, labels="empirical")
  expected = np.mean(numpy_gradient(weight, bias, x.astype(np.float64), y) ** 2, axis=0)
  assert sorted(got) == ["head"] and got["head"].shape == (OUT, IN)
  np.testing.assert_allclose(got["head"], expected, rtol=1e-5, atol=1e-7)


def test_expected_fisher_is_x_squared_p_one_minus_p():
  model, weight, bias = linear_model(2)
  x = np.random.default_rng(2).normal(size=(6, IN)).astype(np.float32)
  got = fisher.fisher_diagonal(model, log_softmax_of, [x], n_examples=6, labels="expected")
  p = numpy_probs(weight, bias, x.astype(np.float64))
  expected = np.mean((p * (1 - p))[:, :, None] * x[:, None, :].astype(np.float64) ** 2, axis=0)
  np.testing.assert_allclose(got["head"], expected, rtol=1e-5, atol=1e-7)


def test_sampled_fisher_is_seeded_and_converges_to_the_expected_fisher():
  model, weight, bias = linear_model(3)
  x = np.random.default_rng(3).normal(size=(4, IN)).astype(np.float32)
  repeated = [np.tile(x, (500, 1))]                          # 2000 examples, 500 per input
  sampled = fisher.fisher_diagonal(model, log_softmax_of, repeated, n_examples=2000, seed=4)
  again = fisher.fisher_diagonal(model, log_softmax_of, repeated, n_examples=2000, seed=4)
  other = fisher.fisher_diagonal(model, log_softmax_of, repeated, n_examples=2000, seed=5)
  np.testing.assert_array_equal(sampled["head"], again["head"])
  assert not np.array_equal(sampled["head"], other["head"])
  p = numpy_probs(weight, bias, x.astype(np.float64))                     # [4, out]
  x2 = x[:, None, :].astype(np.float64) ** 2                              # [4, 1, in]
  # squared gradient entry (o, i) for label c: (delta_co - p_o)^2 x_i^2; its mean and variance
  values = (np.eye(OUT)[None, :, :, None] - p[:, None, :, None]) ** 2 * x2[:, None]  # [4,c,o,i]
  mean = np.einsum("nc,ncoi->noi", p, values)
  var = np.einsum("nc,ncoi->noi", p, values ** 2) - mean ** 2
  expected = mean.mean(0)
  np.testing.assert_allclose(expected, np.mean((p * (1 - p))[:, :, None] * x2, axis=0))
  standard_error = np.sqrt(var.sum(0) / 500) / 4                          # 500 draws per input
  assert np.all(np.abs(sampled["head"] - expected) < 5 * standard_error + 1e-6)


def test_per_example_gradients_equal_jax_grad_one_example_at_a_time_at_the_adapted_weight():
  model, w = make_mlp()
  adapter = mlp_adapters(seed=5).adapters[0]
  lora.attach_adapter(model, adapter)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, 6)).astype(np.float32)
  y = rng.integers(0, 3, size=6)
  got = fisher.fisher_diagonal(model, log_softmax_of, [(x[:3], y[:3]), (x[3:], y[3:])],
                               n_examples=6, labels="empirical")
  assert sorted(got) == ["mlp.0", "mlp.1"]                    # the layers with LoRA attached

  weights = {m: w[f"{m}.weight"].astype(np.float64) for m in ("mlp.0", "mlp.1", "mlp.2")}
  for m, f in adapter.modules.items():
    weights[m] = weights[m] + f.delta()                      # the adapted weights W0 + delta

  def log_likelihood(ws, xi, yi):     # the MLP written out, differentiated w.r.t. W [out, in]
    h = xi
    for k in range(3):
      h = h @ ws[f"mlp.{k}"].T + w[f"mlp.{k}.bias"]
      h = jnp.tanh(h) if k < 2 else jax.nn.log_softmax(h)
    return h[yi]

  grad_one = jax.jit(jax.grad(log_likelihood))                # one example at a time
  squares = [jax.tree_util.tree_map(np.square, grad_one(weights, x[i].astype(np.float64), y[i]))
             for i in range(6)]
  for name in got:
    expected = np.mean([s[name] for s in squares], axis=0)
    np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-8, err_msg=name)
  base_model, _ = make_mlp()
  lora.attach_adapter(base_model, Adapter("mem://0", "zero", {}, {
      m: LoraFactors(f.a, np.zeros_like(f.b), f.scale) for m, f in adapter.modules.items()}, {}))
  at_base = fisher.fisher_diagonal(base_model, log_softmax_of, [(x[:3], y[:3]), (x[3:], y[3:])],
                                   n_examples=6, labels="empirical")
  assert not np.allclose(at_base["mlp.0"], got["mlp.0"], rtol=1e-2)


def test_positions_are_summed_and_negative_labels_ignored():
  model, weight, bias = linear_model(6)
  rng = np.random.default_rng(6)
  x = rng.normal(size=(3, 4, IN)).astype(np.float32)          # 3 examples of 4 positions
  y = rng.integers(0, OUT, size=(3, 4))
  y[0, 3] = y[2, 0] = -100
  got = fisher.fisher_diagonal(model, log_softmax_of, [(x, y)], n_examples=3, labels="empirical")
  grads = numpy_gradient(weight, bias, x.reshape(-1, IN).astype(np.float64),
                         np.maximum(y.reshape(-1), 0)).reshape(3, 4, OUT, IN)
  grads = np.where((y >= 0)[:, :, None, None], grads, 0).sum(1)
  np.testing.assert_allclose(got["head"], np.mean(grads ** 2, axis=0), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="expected.*needs log-probs \\[B, C\\]"):
    fisher.fisher_diagonal(model, log_softmax_of, [x], n_examples=3, labels="expected")


def test_positions_leave_out_padding():
  """positions(inputs) = 0 removes a position from the log-likelihood: with given labels it
  equals the label -1 (checked against the hand-derived gradient); with sampled labels an
  all-ones mask changes nothing and an all-zero one leaves no Fisher."""
  model, weight, bias = linear_model(8)
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 4, IN)).astype(np.float32)
  y = rng.integers(0, OUT, size=(3, 4))
  mask = np.ones((3, 4), np.int32)
  mask[0, 2:] = mask[2, 3] = 0                                   # right padding
  batch = {"x": x, "mask": mask}
  f = lambda m, b: log_softmax_of(m, b["x"])
  got = fisher.fisher_diagonal(model, f, [(batch, y)], n_examples=3, labels="empirical",
                               positions=lambda b: b["mask"])
  grads = numpy_gradient(weight, bias, x.reshape(-1, IN).astype(np.float64),
                         y.reshape(-1)).reshape(3, 4, OUT, IN)
  grads = np.where((mask == 1)[:, :, None, None], grads, 0).sum(1)
  np.testing.assert_allclose(got["head"], np.mean(grads ** 2, axis=0), rtol=1e-5, atol=1e-7)

  sampled = lambda positions: fisher.fisher_diagonal(
      model, f, [batch], n_examples=3, seed=4, positions=positions)["head"]
  plain = sampled(None)
  np.testing.assert_array_equal(sampled(lambda b: np.ones((3, 4))), plain)
  assert not np.allclose(sampled(lambda b: b["mask"]), plain)
  np.testing.assert_array_equal(sampled(lambda b: np.zeros((3, 4))), 0)
  with pytest.raises(ValueError, match="positions\(\) gives shape"):
    sampled(lambda b: np.ones((3, 5)))
  with pytest.raises(ValueError, match="positions= is for"):
    fisher.fisher_diagonal(model, f, [batch], n_examples=3, labels="expected",
                           positions=lambda b: b["mask"])


def test_n_examples_cuts_the_last_batch_and_too_few_raise():
  model, _, _ = linear_model(7)
  rng = np.random.default_rng(7)
  x = rng.normal(size=(12, IN)).astype(np.float32)
  y = rng.integers(0, OUT, size=12)
  batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
  cut = fisher.fisher_diagonal(model, log_softmax_of, batches, n_examples=6, labels="empirical")
  whole = fisher.fisher_diagonal(model, log_softmax_of, [(x[:6], y[:6])], n_examples=6,
                                 labels="empirical")
  np.testing.assert_allclose(cut["head"], whole["head"], rtol=1e-6)
  with pytest.raises(ValueError, match="12 examples, fewer than n_examples=13"):
    fisher.fisher_diagonal(model, log_softmax_of, batches, n_examples=13, labels="empirical")
  with pytest.raises(ValueError, match="labels must be one of"):
    fisher.fisher_diagonal(model, log_softmax_of, batches, n_examples=2, labels="hard")
  with pytest.raises(ValueError, match="pairs"):
    fisher.fisher_diagonal(model, log_softmax_of, [x], n_examples=2, labels="empirical")
  with pytest.raises(ValueError, match="`nope`"):
    fisher.fisher_diagonal(model, log_softmax_of, [x], ["nope"], n_examples=2)
  lora.detach_adapters(model)
  with pytest.raises(ValueError, match="no adapter is attached"):
    fisher.fisher_diagonal(model, log_softmax_of, [x], n_examples=2)


def test_task_fishers_attach_each_adapter_and_detach():
  model, _ = make_mlp()
  adapters = mlp_adapters(seed=8)
  x = np.random.default_rng(8).normal(size=(4, 6)).astype(np.float32)
  fishers = fisher.task_fishers(model, log_softmax_of, adapters, [[x], [x]], n_examples=4,
                                labels="expected")
  assert all(layer.lora_a is None for layer in lora.linears(model).values())
  for adapter, f in zip(adapters.adapters, fishers):
    lora.attach_adapter(model, adapter)
    np.testing.assert_array_equal(
        f["mlp.1"], fisher.fisher_diagonal(model, log_softmax_of, [x], adapters.module_names,
                                           n_examples=4, labels="expected")["mlp.1"])
  assert not np.allclose(fishers[0]["mlp.1"], fishers[1]["mlp.1"])


# ------------------------------------------------------------------- merge


def merge_problem(seed=0):
  adapters = as_float64(synthetic.adapter_set(ranks=(2, 3, 4), seed=seed))
  rng = np.random.default_rng(seed + 1)
  fishers = [{m: rng.exponential(size=f.shape) * rng.integers(0, 2, size=f.shape)
              for m, f in adapters.adapters[0].modules.items()} for _ in adapters.adapters]
  base = {f"{m}.weight": rng.normal(size=f.shape) for m, f in adapters.adapters[0].modules.items()}
  return adapters, fishers, base


def numpy_fisher_merge(adapters, fishers, base, floor, coefficients):
  out = {}
  for m in adapters.module_names:
    w0 = base[f"{m}.weight"]
    weights = [c * np.maximum(f[m], floor) for c, f in zip(coefficients, fishers)]
    merged = sum(wt * (w0 + fac.delta()) for wt, fac in zip(weights, adapters.factors(m)))
    out[m] = merged / sum(weights) - w0
  return out


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
def test_fisher_merge_equals_numpy(dtype, rtol):
  adapters, fishers, base = merge_problem()
  result = fisher.fisher_merge(adapters, base, fishers, floor=1e-3, dtype=dtype)
  expected = numpy_fisher_merge(adapters, fishers, base, 1e-3, [1, 1, 1])
  assert not result.is_factored and result.method == "fisher"
  for m in adapters.module_names:
    np.testing.assert_allclose(result.delta(m), expected[m], rtol=rtol, atol=rtol, err_msg=m)
  coefficients = np.array([0.2, 0.5, 0.3])
  weighted = fisher.fisher_merge(adapters, base, fishers, floor=1e-3, dtype=dtype,
                                 coefficients=coefficients, normalize=True)
  norms = np.sqrt([sum(np.sum(f[m] ** 2) for m in f) for f in fishers])
  expected = numpy_fisher_merge(adapters, fishers, base, 1e-3, coefficients / norms)
  for m in adapters.module_names:
    np.testing.assert_allclose(weighted.delta(m), expected[m], rtol=rtol, atol=rtol, err_msg=m)
  np.testing.assert_allclose(weighted.stats["fisher_norms"], norms, rtol=1e-12)


def test_equal_fishers_give_the_plain_average():
  adapters, fishers, _ = merge_problem(1)
  same = [fishers[0]] * 3
  result = fisher.fisher_merge(adapters, None, same, floor=0.0, dtype="float64")
  for m in adapters.module_names:
    mean = np.mean([f.delta() for f in adapters.factors(m)], axis=0)
    np.testing.assert_allclose(result.delta(m), mean, rtol=1e-12, atol=1e-14)


def test_zero_fisher_entries_fall_back_to_the_average_and_the_floor():
  adapters, fishers, base = merge_problem(2)
  zeros = [{m: np.zeros_like(f) for m, f in task.items()} for task in fishers]
  result = fisher.fisher_merge(adapters, None, zeros, floor=0.0, dtype="float64")
  floored = fisher.fisher_merge(adapters, None, zeros, dtype="float64")
  for m in adapters.module_names:
    mean = np.mean([f.delta() for f in adapters.factors(m)], axis=0)
    np.testing.assert_allclose(result.delta(m), mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(floored.delta(m), mean, rtol=1e-12, atol=1e-14)


def test_missing_and_bad_fishers():
  adapters, fishers, _ = merge_problem(3)
  dropped = "model.layers.0.self_attn.k_proj"
  partial = [{m: f for m, f in task.items() if m != dropped} for task in fishers]
  with pytest.warns(UserWarning, match=f"average of the task updates.*{dropped}"):
    result = fisher.fisher_merge(adapters, None, partial, dtype="float64")
  mean = np.mean([f.delta() for f in adapters.factors(dropped)], axis=0)
  np.testing.assert_allclose(result.delta(dropped), mean, rtol=1e-12)
  bad = [dict(t) for t in fishers]
  bad[1][dropped] = -np.ones((6, 10))
  with pytest.raises(ValueError, match=f"`{dropped}` has negative"):
    fisher.fisher_merge(adapters, None, bad)
  bad[1][dropped] = np.ones((10, 6))
  with pytest.raises(ValueError, match=rf"`{dropped}` of task `task1` has shape \(10, 6\)"):
    fisher.fisher_merge(adapters, None, bad)
  with pytest.raises(ValueError, match="coefficients"):
    fisher.fisher_merge(adapters, None, fishers, coefficients=[1, -1, 1])


def test_fishers_from_the_model_merge_into_a_dense_result():
  """End to end on the MLP: task_fishers -> fisher_merge, equal to NumPy on those Fishers."""
  model, w = make_mlp()
  adapters = mlp_adapters(seed=9)
  rng = np.random.default_rng(9)
  batches = [[rng.normal(size=(5, 6)).astype(np.float32)] for _ in range(2)]
  fishers = fisher.task_fishers(model, log_softmax_of, adapters, batches, n_examples=5, seed=1)
  result = fisher.fisher_merge(adapters, w, fishers, dtype="float64")
  base = {k: v.astype(np.float64) for k, v in w.items()}
  expected = numpy_fisher_merge(adapters, fishers, base, 1e-6, [0.5, 0.5])
  for m in adapters.module_names:
    np.testing.assert_allclose(result.delta(m), expected[m], rtol=1e-6, atol=1e-8)


def test_flax_llama_token_fisher(llama_family):
  """The Flax Llama, per-token log-likelihoods summed per sequence: one example's empirical
  Fisher is the square of its gradient w.r.t. each adapted weight (taken here through nnx.grad)."""
  import knots_jax
  llama = pytest.importorskip("knots_jax.models.llama")
  base_dir, adapter_dirs = llama_family
  adapter = knots_jax.load_adapters(adapter_dirs[:1]).adapters[0]
  model = llama.from_pretrained(base_dir)
  lora.attach_adapter(model, adapter)
  rng = np.random.default_rng(10)
  ids = rng.integers(0, 96, size=(1, 8))
  labels = rng.integers(0, 96, size=(1, 8))
  labels[0, :2] = -100
  token_log_probs = lambda m, ids: jax.nn.log_softmax(m(ids), axis=-1)
  got = fisher.fisher_diagonal(model, token_log_probs, [(ids, labels)], n_examples=1,
                               labels="empirical")
  assert sorted(got) == sorted(adapter.modules)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)   # every parameter

  def log_likelihood(params):
    lp = jax.nn.log_softmax(nnx.merge(graphdef, params, rest)(ids), axis=-1)[0, 2:]
    return jnp.sum(jnp.take_along_axis(lp, labels[0, 2:, None], axis=-1))

  grads = jax.jit(jax.grad(log_likelihood))(params)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, lora.LoraLinear) and node.hf_name in adapter.modules:
      g = np.asarray(flat[tuple(path) + ("kernel",)].get_value()).T
      assert got[node.hf_name].shape == adapter.modules[node.hf_name].shape
      np.testing.assert_allclose(got[node.hf_name], g ** 2, rtol=1e-3, atol=1e-12,
                                 err_msg=node.hf_name)
