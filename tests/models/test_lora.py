"""models.lora: the LoRA-carrying linear layer, weight loading, Gram recording."""

import numpy as np
import pytest
from flax import nnx

from knots_jax.adapters.peft_files import Adapter, AdapterError, LoraFactors
from knots_jax.models import lora


class TwoLayers(nnx.Module):

  def __init__(self):
    self.layers = nnx.List([lora.LoraLinear(4, 4, hf_name=f"m.{i}", use_bias=i == 0)
                            for i in range(2)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _weights(rng):
  return {"m.0.weight": rng.normal(size=(4, 4)).astype(np.float32),
          "m.0.bias": rng.normal(size=4).astype(np.float32),
          "m.1.weight": rng.normal(size=(4, 4)).astype(np.float32)}


def _targets(model):
  out = {}
  for layer in lora.linears(model).values():
    out.update(lora.linear_targets(layer))
  return out


def test_forward_with_and_without_lora_matches_numpy():
  rng = np.random.default_rng(0)
  model, w = TwoLayers(), _weights(rng)
  lora.load_hf_tensors(_targets(model), w)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  h = x @ w["m.0.weight"].T + w["m.0.bias"]
  plain = h @ w["m.1.weight"].T
  np.testing.assert_allclose(model(x), plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())

  a, b = rng.normal(size=(2, 4)), rng.normal(size=(4, 2))
  adapter = Adapter("ad/", "ad", {}, {"m.1": LoraFactors(a, b, 0.5)}, {})
  lora.attach_adapter(model, adapter)
  expected = h @ (w["m.1.weight"] + 0.5 * b @ a).T
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  lora.detach_adapters(model)
  np.testing.assert_allclose(model(x), plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())


def test_attach_refuses_unknown_module_and_bad_shapes():
  model = TwoLayers()
  f = LoraFactors(np.ones((2, 4)), np.ones((4, 2)), 1.0)
  with pytest.raises(AdapterError, match="ad.safetensors.*m.7"):
    lora.attach_adapter(model, Adapter("ad.safetensors", "ad", {}, {"m.7": f}, {}))
  bad = LoraFactors(np.ones((2, 5)), np.ones((4, 2)), 1.0)
  with pytest.raises(AdapterError, match="m.0"):
    lora.attach_adapter(model, Adapter("ad/", "ad", {}, {"m.0": bad}, {}))


def test_load_names_missing_and_misshaped_keys():
  model, w = TwoLayers(), _weights(np.random.default_rng(1))
  with pytest.raises(ValueError, match="ckpt.*m.0.bias"):
    lora.load_hf_tensors(_targets(model), {k: v for k, v in w.items() if k != "m.0.bias"}, "ckpt")
  w["m.1.weight"] = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="m.1.weight.*\\(4, 3\\)"):
    lora.load_hf_tensors(_targets(model), w, "ckpt")


def test_recorded_grams_are_sums_of_input_outer_products_under_jit():
  rng = np.random.default_rng(2)
  model, w = TwoLayers(), _weights(rng)
  lora.load_hf_tensors(_targets(model), w)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  lora.record_inputs(model)
  forward = nnx.jit(lambda m, x: m(x))
  forward(model, x)
  forward(model, x[:1])
  grams = lora.input_grams(model)
  rows = np.concatenate([x.reshape(-1, 4), x[:1].reshape(-1, 4)]).astype(np.float64)
  hidden = rows @ w["m.0.weight"].T + w["m.0.bias"]
  np.testing.assert_allclose(grams["m.0"][0], rows.T @ rows, rtol=1e-5)
  np.testing.assert_allclose(grams["m.1"][0], hidden.T @ hidden, rtol=1e-4)
  assert grams["m.0"][1] == 20
  lora.stop_recording(model)
  assert lora.input_grams(model) == {}


def test_captured_inputs_are_what_each_layer_receives():
  rng = np.random.default_rng(3)
  model, w = TwoLayers(), _weights(rng)
  lora.load_hf_tensors(_targets(model), w)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  got = lora.capture_inputs(model, lambda: model(x), ["m.0", "m.1"])
  rows = x.reshape(-1, 4)
  np.testing.assert_allclose(got["m.0"], rows)
  hidden = rows @ w["m.0.weight"].T + w["m.0.bias"]
  np.testing.assert_allclose(got["m.1"], hidden, rtol=1e-5, atol=1e-5 * np.abs(hidden).max())
  assert all(layer.input_rows is None for layer in lora.linears(model).values())
  with pytest.raises(ValueError, match="m.9"):
    lora.capture_inputs(model, lambda: model(x), ["m.9"])
