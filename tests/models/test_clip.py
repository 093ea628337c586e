"""models.clip: the NNX CLIP vision encoder against transformers / PEFT in PyTorch.

Every reference is computed by transformers (and peft) from the same files our
model reads; tiny random models (hidden 32, 2 layers, 32x32 images, 8x8 patches).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import optax
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import knots_jax
from knots_jax.export import full_model
from knots_jax.models import clip, lora
from tests import peft_factory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATTENTION = peft_factory.CLIP_ATTENTION
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=16)


def _hf_vision(path: str, seed: int = 0, **overrides) -> str:
  torch.manual_seed(seed)
  config = transformers.CLIPVisionConfig(**{**VISION, **overrides})
  transformers.CLIPVisionModelWithProjection(config).save_pretrained(path)
  return path


def _load_hf(path: str) -> torch.nn.Module:
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def _pixels(seed: int = 0, batch: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)


def _forward(model, x):
  embeds, hidden = nnx.jit(lambda m, x: m(x, output_hidden_states=True))(model, x)
  return np.asarray(embeds), [np.asarray(h) for h in hidden]


def _assert_rel(ours, want, tol=1e-4, what=""):
  want = np.asarray(want, np.float64)
  err = np.abs(np.asarray(ours, np.float64) - want).max() / np.abs(want).max()
  assert err <= tol, f"{what}: max relative error {err:.2e} > {tol}"


def _assert_matches(model, hf_embeds, hf_hidden, x):
  embeds, hidden = _forward(model, x)
  _assert_rel(embeds, hf_embeds, what="image_embeds")
  assert len(hidden) == len(hf_hidden) == model.config.num_hidden_layers + 1
  for i, (ours, want) in enumerate(zip(hidden, hf_hidden)):
    assert ours.shape == tuple(want.shape)
    _assert_rel(ours, want, what=f"hidden_states[{i}]")


def _hf_outputs(hf_model, x):
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
  return out.image_embeds.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  """A base vision model and two LoRA adapters (ranks 4 and 2, alpha != r)."""
  root = tmp_path_factory.mktemp("clip_family")
  base = _hf_vision(str(root / "base"))
  adapters = [peft_factory.make_clip_adapter(base, str(root / "task0"), seed=10, r=4, alpha=8),
              peft_factory.make_clip_adapter(base, str(root / "task1"), seed=11, r=2, alpha=3)]
  return base, adapters


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_matches_transformers_for_each_activation(tmp_path, act):
  path = _hf_vision(str(tmp_path / "m"), seed=1, hidden_act=act)
  x = _pixels(1)
  _assert_matches(clip.from_pretrained(path), *_hf_outputs(_load_hf(path), x), x)


def test_matches_image_tower_of_a_sharded_full_clip_model(tmp_path):
  torch.manual_seed(2)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, projection_dim=16),
      vision_config={**VISION, "projection_dim": 7}, projection_dim=12)
  hf_model = transformers.CLIPModel(config).eval()
  hf_model.save_pretrained(str(tmp_path / "full"), max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "full" / "model.safetensors.index.json")
  x = _pixels(2)
  with torch.no_grad():
    pix = torch.from_numpy(x)
    embeds = hf_model.get_image_features(pixel_values=pix).pooler_output.numpy()
    hidden = [h.numpy() for h in
              hf_model.vision_model(pixel_values=pix, output_hidden_states=True).hidden_states]
  model = clip.from_pretrained(str(tmp_path / "full"))
  assert model.config.projection_dim == 12          # CLIPConfig's, not vision_config's
  _assert_matches(model, embeds, hidden, x)


def test_config_from_hf_and_back():
  hf = transformers.CLIPVisionConfig(**VISION, hidden_act="gelu").to_dict()
  config = clip.CLIPVisionConfig.from_hf(hf)
  assert config == clip.CLIPVisionConfig(**VISION, hidden_act="gelu")
  again = transformers.CLIPVisionConfig(**config.to_hf())
  assert clip.CLIPVisionConfig.from_hf(again.to_dict()) == config
  assert config.to_hf()["model_type"] == "clip_vision_model"


# ------------------------------------------------------------------ adapters


def test_attached_adapter_matches_peft_and_detach_gives_base(family):
  base, adapter_dirs = family
  x = _pixels(3)
  model = clip.from_pretrained(base)
  hf_base = _load_hf(base)
  base_outputs = _hf_outputs(hf_base, x)
  adapter = knots_jax.load_adapter(adapter_dirs[0])
  assert len(adapter.modules) == 4 * VISION["num_hidden_layers"]
  lora.attach_adapter(model, adapter)
  peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dirs[0]).eval()
  with torch.no_grad():
    out = peft_model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
  peft_embeds = out.image_embeds.numpy()
  assert np.abs(peft_embeds - base_outputs[0]).max() > 1e-2    # the adapter does something
  _assert_matches(model, peft_embeds, [h.numpy() for h in out.hidden_states], x)
  lora.detach_adapters(model)
  _assert_matches(model, *base_outputs, x)


def _peft_deltas(base: str, adapter_dir: str) -> dict[str, torch.Tensor]:
  model = peft.PeftModel.from_pretrained(_load_hf(base), adapter_dir)
  return {name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
          for name, module in model.named_modules()
          if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A}


@pytest.mark.parametrize("method", ["knots_ta", "knots_ties"])
def test_merged_model_matches_transformers_with_the_merged_update(family, method):
  base, adapter_dirs = family
  result = knots_jax.merge(knots_jax.load_adapters(adapter_dirs), method, scaling=0.7, top_k=50)
  if method == "knots_ta":   # independent of our merge: 0.7 * (sum of PEFT's own deltas)
    deltas = [_peft_deltas(base, d) for d in adapter_dirs]
    update = {k: 0.7 * (deltas[0][k] + deltas[1][k]) for k in deltas[0]}
  else:                      # the merge's own factors: checks the path from result to model
    update = {m: torch.from_numpy(np.asarray(s.b[i]) @ np.asarray(s.a[i]))
              for s in result.stacks for i, m in enumerate(s.modules)}
  assert len(update) == 8
  hf_model = _load_hf(base)
  state = hf_model.state_dict()
  with torch.no_grad():
    for module, delta in update.items():
      state[f"{module}.weight"] += delta
  x = _pixels(4)
  model = clip.from_pretrained(base, weights=full_model.merged_model_weights(result, base))
  _assert_matches(model, *_hf_outputs(hf_model, x), x)


# ------------------------------------------------------------------ saving


def test_saved_model_loads_in_transformers(tmp_path):
  config = clip.CLIPVisionConfig(**VISION, hidden_act="gelu")
  model = clip.CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(5))   # never loaded from HF
  out = str(tmp_path / "saved")
  clip.save_pretrained(model, out)
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}
  hf_model, info = transformers.CLIPVisionModelWithProjection.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert hf_model.config.hidden_act == "gelu"
  x = _pixels(5)
  embeds, hidden = _forward(model, x)
  hf_embeds, hf_hidden = _hf_outputs(hf_model.eval(), x)
  _assert_rel(embeds, hf_embeds, what="image_embeds")
  for ours, want in zip(hidden, hf_hidden):
    _assert_rel(ours, want)
  again = clip.from_pretrained(out)
  for key, value in clip.hf_tensors(model).items():
    np.testing.assert_array_equal(clip.hf_tensors(again)[key], value, err_msg=key)
  with pytest.raises(ValueError, match="already exists"):
    clip.save_pretrained(model, out)


# ------------------------------------------------------------------ training


def test_training_only_lora_factors_changes_them_and_nothing_else(family):
  base, _ = family
  model = clip.from_pretrained(base)
  rng = np.random.default_rng(6)
  for name, layer in lora.linears(model).items():
    if name.endswith(ATTENTION):   # fresh LoRA: a random, b zero (PEFT's init)
      layer.set_lora(rng.normal(size=(4, layer.in_features)) * 0.1,
                     np.zeros((layer.out_features, 4)), 2.0)
  factors = lora.LoraWeight   # A and B only: the scale is a LoraScale
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=factors)
  x, y = _pixels(6, batch=2), rng.normal(size=(2, 16)).astype(np.float32)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: ((m(x) - y) ** 2).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, factors))(model)
    optimizer.update(model, grads)
    return loss

  base_before = clip.hf_tensors(model)
  attached = {n: l for n, l in lora.linears(model).items() if l.lora_a is not None}
  lora_before = {n: (np.asarray(l.lora_a[...]), np.asarray(l.lora_b[...]))
                 for n, l in attached.items()}
  losses = [float(step(model, optimizer, x, y)) for _ in range(2)]
  assert losses[1] < losses[0]
  for key, value in clip.hf_tensors(model).items():
    np.testing.assert_array_equal(value, base_before[key], err_msg=key)
  for name, layer in attached.items():
    assert not np.allclose(layer.lora_a[...], lora_before[name][0]), name
    assert not np.allclose(layer.lora_b[...], lora_before[name][1]), name
    assert float(layer.lora_scale[...]) == 2.0, name


# ------------------------------------------------------------------ errors


def test_missing_or_misshaped_tensor_names_key_and_file(family, tmp_path):
  base, _ = family
  tensors = safetensors.numpy.load_file(os.path.join(base, "model.safetensors"))
  key = "vision_model.encoder.layers.1.mlp.fc2.bias"
  for case, change in [("missing", lambda t: t.pop(key)),
                       ("shape", lambda t: t.__setitem__(key, np.zeros(5, np.float32)))]:
    broken = tmp_path / case
    broken.mkdir()
    t = dict(tensors)
    change(t)
    safetensors.numpy.save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "config.json").write_text(open(os.path.join(base, "config.json")).read())
    with pytest.raises(ValueError, match=f"{broken}/model.safetensors.*{key}"):
      clip.from_pretrained(str(broken))
  with pytest.raises(ValueError, match=f"weights given.*{key}"):
    clip.from_pretrained(base, weights={k: v for k, v in tensors.items() if k != key})


def test_bad_config_and_input_are_refused(family):
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    clip.CLIPVisionConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="'llama'"):
    clip.CLIPVisionConfig.from_hf({"model_type": "llama"})
  model = clip.from_pretrained(family[0])
  with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
    model(np.zeros((1, 3, 16, 16), np.float32))


# ------------------------------------------------------------------ sharding


_SHARDED = textwrap.dedent("""
  import os, sys, json
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  from flax import nnx
  from knots_jax.parallel import sharding
  from knots_jax.models import clip
  base, out = sys.argv[1], sys.argv[2]
  assert jax.device_count() == 4
  model = clip.from_pretrained(base, mesh=sharding.make_mesh())
  specs = {{k: str(v[...].sharding.spec) for k, (v, _) in clip.hf_targets(model).items()}}
  x = np.random.default_rng(7).normal(size=(4, 3, 32, 32)).astype(np.float32)
  embeds = nnx.jit(lambda m, x: m(x))(model, x)
  np.save(out + ".npy", np.asarray(embeds))
  json.dump(specs, open(out + ".json", "w"))
""")


def test_parameters_on_a_four_device_mesh(family, tmp_path):
  base, _ = family
  out = str(tmp_path / "sharded")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED.format(root=ROOT), base, out],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out + ".json") as f:
    specs = json.load(f)
  # kernels are [in, out]: q_proj 32 rows and fc2 48 rows split 4 ways; 17 positions do not
  assert "stack" in specs["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
  assert "stack" in specs["vision_model.encoder.layers.1.mlp.fc2.weight"]
  assert "stack" not in specs["vision_model.embeddings.position_embedding.weight"]
  x = np.random.default_rng(7).normal(size=(4, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    want = _load_hf(base)(pixel_values=torch.from_numpy(x)).image_embeds.numpy()
  _assert_rel(np.load(out + ".npy"), want, what="sharded image_embeds")
