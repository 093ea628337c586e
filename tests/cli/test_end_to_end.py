"""PEFT adapters in, KnOTS merge, PEFT adapter and merged weights out: checked with PEFT and transformers."""

import numpy as np
import peft
import pytest
import torch

import knots_jax
from tests import peft_factory, reference


@pytest.fixture(scope="module")
def token_ids():
  return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _base_plus_update(base_dir, result):
  """The base model with every merged dense update added to its weight, in torch."""
  model = peft_factory.load_base_model(base_dir)
  state = model.state_dict()
  for module, delta in result.deltas():
    state[f"{module}.weight"] += torch.from_numpy(np.asarray(delta, np.float32))
  model.load_state_dict(state)
  return model


@pytest.mark.parametrize("method,kw", [("knots_ties", dict(scaling=0.6, top_k=20)),
                                       ("knots_dare_ties", dict(top_k=100, drop_rate=0.1, seed=2))])
def test_merged_adapter_round_trips_through_peft(llama_family, tmp_path, token_ids, method, kw):
  base_dir, adapter_dirs = llama_family
  adapters = knots_jax.load_adapters(adapter_dirs)
  result = knots_jax.merge(adapters, method, **kw)

  if method == "knots_ties":  # the merge itself, against the NumPy reference on PEFT's own deltas
    deltas = {m: np.stack([d.numpy().astype(np.float64) for d in ds]) for m, ds in zip(
        adapters.module_names,
        zip(*[[peft_factory.peft_delta_weights(base_dir, p)[m] for m in adapters.module_names]
              for p in adapter_dirs]))}
    expected = reference.merge(deltas, method, **kw)
    for m, e in expected.items():
      assert np.linalg.norm(result.delta(m) - e) / np.linalg.norm(e) < 1e-3

  out = tmp_path / "adapter"
  report = knots_jax.save_peft_adapter(result, str(out))
  assert report["rank"] == 4 + 8 + 6  # sum of the ranks: zero-padded components dropped, exact
  merged_model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base_dir), str(out))
  with torch.no_grad():
    got = merged_model(token_ids).logits
    expected_logits = _base_plus_update(base_dir, result)(token_ids).logits
    base_logits = peft_factory.load_base_model(base_dir)(token_ids).logits
  torch.testing.assert_close(got, expected_logits, rtol=1e-4,
                             atol=1e-5 * expected_logits.abs().max().item())
  assert (got - base_logits).abs().max() > 1e-3  # the merge changed the model

  # Merged dense weights with the base model's key names load into transformers.
  weights = tmp_path / "weights"
  knots_jax.save_merged_weights(result, base_dir, str(weights))
  model = peft_factory.load_base_model(base_dir)
  from safetensors.torch import load_file
  missing, unexpected = model.load_state_dict(load_file(str(weights / "model.safetensors")),
                                              strict=False)
  assert not unexpected and len(missing) > 0
  with torch.no_grad():
    torch.testing.assert_close(model(token_ids).logits, expected_logits, rtol=1e-4,
                               atol=1e-5 * expected_logits.abs().max().item())
