"""Loading LoRA adapters, checked against PEFT itself on real adapters it wrote.

Every delta is compared with PEFT's own `get_delta_weight`; every refusal is made
from a real adapter (written by PEFT, or edited from one) and its message is
checked for the file and the module or problem it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from knots_jax.adapters import peft_files
from knots_jax.adapters.peft_files import (
  AdapterError,
  check_against_base,
  load_adapter,
  load_adapters,
)
from tests import peft_factory

ST = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------ helpers


def assert_matches_peft(adapter, deltas, transpose=False):
  """Every module's delta equals PEFT's get_delta_weight, and the module sets are equal."""
  assert sorted(adapter.modules) == sorted(deltas)
  for module, want in deltas.items():
    want = want.double().numpy()
    got = adapter.modules[module].delta()
    if transpose:
      got = got.T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                               err_msg=module)


def copy_adapter(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def edit_config(path, **changes):
  file = os.path.join(path, "adapter_config.json")
  with open(file) as f:
    config = json.load(f)
  config.update(changes)
  with open(file, "w") as f:
    json.dump(config, f)
  return path


def edit_tensors(path, fn):
  """Rewrites adapter_model.safetensors of a PEFT directory through fn(dict) -> dict."""
  file = os.path.join(path, ST)
  tensors = dict(safetensors.numpy.load_file(file))
  safetensors.numpy.save_file(fn(tensors), file)
  return path


def lora_state_dict(base, seed, **lora_kwargs):
  """A PEFT model (random LoRA, as in peft_factory) and its full state dict."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(
      peft_factory.load_base_model(base),
      peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.normal_(0.0, 0.2)
  return model, model.state_dict()


def gpt2_base(path):
  """A tiny random GPT-2 (Conv1D layers: weights stored [in, out])."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(config).save_pretrained(path)
  return str(path)


def gpt2_adapter(base, out, seed, r=4, lora_alpha=8):
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=r, lora_alpha=lora_alpha, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
      init_lora_weights=False))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.normal_(0.0, 0.2)
  model.save_pretrained(out)
  return str(out)


def gpt2_deltas(base, adapter):
  model = peft.PeftModel.from_pretrained(
      transformers.GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32), adapter)
  return {name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
          for name, module in model.named_modules()
          if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A}


def base_shapes(base):
  with safetensors.safe_open(os.path.join(base, "model.safetensors"), framework="numpy") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def base(llama_family):
  return llama_family[0]


@pytest.fixture(scope="module")
def variants(base, work):
  """PEFT adapters with every scaling option, written by PEFT."""
  make = peft_factory.make_lora_adapter
  root = work / "variants"
  return {
      "rslora": make(base, str(root / "rslora"), seed=1, r=16, lora_alpha=8, use_rslora=True),
      # Pattern keys are regexes matched against a suffix of the module path; the first
      # matching key wins. PEFT writes adapter_config.json with sorted keys, so the keys
      # are given in sorted order here (see test_pattern_order_lost_by_peft_is_refused).
      "patterns": make(
          base, str(root / "patterns"), seed=2, r=4, lora_alpha=8,
          rank_pattern={r"layers\.1\.self_attn\.(k|v)_proj": 6,
                        "model.layers.0.self_attn.q_proj": 12, "q_proj": 8},
          alpha_pattern={"k_proj": 2, "layers.0.self_attn.k_proj": 7,
                         "layers.0.self_attn.o_proj": 32, "v_proj": 5},
          use_rslora=True),
      # Trained with "q_proj" first (layer-0 q_proj gets rank 8), saved sorted: PEFT's
      # own reload would give it rank 12.
      "order": make(base, str(root / "order"), seed=2, r=4,
                    rank_pattern={"q_proj": 8, "model.layers.0.self_attn.q_proj": 12}),
      "layers": make(base, str(root / "layers"), seed=3, r=4, lora_alpha=6,
                     layers_to_transform=[1]),
      "saved": make(base, str(root / "saved"), seed=4, r=4, modules_to_save=["lm_head"]),
      "bin": make(base, str(root / "bin"), seed=5, r=8, lora_alpha=4, safe_serialization=False),
      "bin_twin": make(base, str(root / "bin_twin"), seed=5, r=8, lora_alpha=4),
  }


@pytest.fixture(scope="module")
def good(llama_family):
  """A copyable plain adapter (rank 4, alpha = r)."""
  return llama_family[1][0]


# -------------------------------------------------------- agreement with PEFT


def test_family_matches_peft(llama_family):
  base, paths = llama_family
  for path in paths:
    adapter = load_adapter(path)
    assert adapter.name == os.path.basename(path)
    assert_matches_peft(adapter, peft_factory.peft_delta_weights(base, path))
    for factors in adapter.modules.values():
      assert factors.a.dtype == np.float32 and factors.b.dtype == np.float32
  ranks = {load_adapter(p).modules[Q0].rank for p in paths}
  assert ranks == {4, 8, 6}


@pytest.mark.parametrize("kind", ["rslora", "patterns", "layers"])
def test_scaling_options_match_peft(base, variants, kind):
  adapter = load_adapter(variants[kind])
  assert_matches_peft(adapter, peft_factory.peft_delta_weights(base, variants[kind]))


def test_pattern_matching_follows_peft(variants):
  adapter = load_adapter(variants["patterns"])
  m = adapter.modules
  assert m[Q0].rank == 12 and m["model.layers.1.self_attn.q_proj"].rank == 8
  assert m["model.layers.1.self_attn.k_proj"].rank == 6
  assert m["model.layers.0.self_attn.k_proj"].rank == 4
  # First matching key wins: "k_proj" shadows "layers.0.self_attn.k_proj" (rslora: 2/sqrt(4)).
  assert m["model.layers.0.self_attn.k_proj"].scale == pytest.approx(2 / 2)
  assert m["model.layers.0.self_attn.o_proj"].scale == pytest.approx(32 / 2)
  assert m["model.layers.1.self_attn.o_proj"].scale == pytest.approx(8 / 2)
  assert m["model.layers.1.self_attn.v_proj"].scale == pytest.approx(5 / np.sqrt(6))
  assert peft_files.get_pattern_key(["q_proj"], "model.layers.0.self_attn.xq_proj") == \
      "model.layers.0.self_attn.xq_proj"


def test_pattern_order_lost_by_peft_is_refused(base, variants):
  """PEFT sorts pattern keys on save; first-match then picks another rank than in training."""
  with pytest.raises(RuntimeError, match="size mismatch"):
    peft_factory.peft_delta_weights(base, variants["order"])
  with pytest.raises(AdapterError, match=rf"order/adapter_model\.safetensors: module `{Q0}`: "
                                         r"the tensors have rank 8 but the config says r=12"):
    load_adapter(variants["order"])


def test_layers_to_transform_modules_are_the_keys(variants):
  adapter = load_adapter(variants["layers"])
  assert adapter.modules and all(".layers.1." in m for m in adapter.modules)


def test_bin_loads_like_safetensors(variants):
  a, b = load_adapter(variants["bin"]), load_adapter(variants["bin_twin"])
  assert sorted(a.modules) == sorted(b.modules)
  for module in a.modules:
    np.testing.assert_array_equal(a.modules[module].a, b.modules[module].a)
    np.testing.assert_array_equal(a.modules[module].b, b.modules[module].b)
    assert a.modules[module].scale == b.modules[module].scale == 0.5


def test_modules_to_save_land_in_extra(base, variants, work):
  # Make the saved copy differ from the base weight, as training would.
  key = "base_model.model.lm_head.weight"
  path = edit_tensors(copy_adapter(variants["saved"], work / "saved_trained"),
                      lambda t: {**t, key: t[key] + np.float32(0.5)})
  adapter = load_adapter(path)
  assert list(adapter.extra) == ["lm_head.weight"]
  model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base), path)
  want = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().numpy()
  np.testing.assert_array_equal(adapter.extra["lm_head.weight"], want)
  assert not np.allclose(want, peft_factory.load_base_model(base).lm_head.weight.detach().numpy())


def test_trained_biases_land_in_extra(work):
  base = peft_factory.make_base_model(str(work / "bias_base"), attention_bias=True)
  path = peft_factory.make_lora_adapter(base, str(work / "bias_all"), seed=6, bias="all",
                                        target_modules=["q_proj"])
  adapter = load_adapter(path)
  assert "model.layers.0.self_attn.k_proj.bias" in adapter.extra
  assert "model.layers.0.self_attn.q_proj.base_layer.bias" in adapter.extra  # as PEFT saves it
  assert_matches_peft(adapter, peft_factory.peft_delta_weights(base, path))


# ---------------------------------------------------- reference .pt files


def test_reference_pt_file_scale_one(base, work):
  model, state = lora_state_dict(base, seed=7, r=8, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj"])
  lora = {k: v for k, v in state.items() if "lora_" in k}
  assert all(".default." in k for k in lora)
  path = str(work / "ref" / "task_a.pt")
  os.makedirs(os.path.dirname(path))
  torch.save(lora, path)
  adapter = load_adapter(path)
  assert adapter.name == "task_a"
  assert adapter.config["r"] == adapter.config["lora_alpha"] == 8
  assert adapter.config["target_modules"] == ["q_proj", "v_proj"]
  layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
  assert sorted(adapter.modules) == sorted(layers)
  for name, layer in layers.items():
    want = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double().detach()
    assert adapter.modules[name].scale == 1.0
    np.testing.assert_allclose(adapter.modules[name].delta(), want.numpy(), rtol=1e-6,
                               atol=1e-6 * want.abs().max().item())


def test_reference_pt_full_state_dict_nested(base, work):
  """A whole PEFT model's state dict (base weights included), nested under "state_dict"."""
  _, state = lora_state_dict(base, seed=8, r=4, target_modules=["q_proj"],
                             modules_to_save=["lm_head"])
  path = str(work / "full.pt")
  torch.save({"state_dict": state, "epoch": 3}, path)
  adapter = load_adapter(path)
  assert sorted(adapter.modules) == [Q0, "model.layers.1.self_attn.q_proj"]
  # Only the trained copy of lm_head; frozen base weights are not adapter tensors.
  assert list(adapter.extra) == ["lm_head.weight"]
  np.testing.assert_array_equal(
      adapter.extra["lm_head.weight"],
      state["base_model.model.lm_head.modules_to_save.default.weight"].numpy())
  assert adapter.config["modules_to_save"] == ["lm_head"]


def test_pt_uses_config_beside_it(base, work):
  _, state = lora_state_dict(base, seed=9, r=4, lora_alpha=12, target_modules=["q_proj"])
  folder = work / "pt_with_config"
  os.makedirs(folder)
  torch.save({k: v for k, v in state.items() if "lora_" in k}, folder / "weights.pt")
  with open(folder / "adapter_config.json", "w") as f:
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 12, "target_modules": ["q_proj"]}, f)
  assert load_adapter(str(folder / "weights.pt")).modules[Q0].scale == 3.0


def test_single_safetensors_file_bf16(good, work):
  """A lone .safetensors file in bf16 (NumPy cannot name bf16) loads as float32."""
  tensors = safetensors.torch.load_file(os.path.join(good, ST))
  path = str(work / "lone" / "bf16.safetensors")
  os.makedirs(os.path.dirname(path))
  safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, path)
  adapter = load_adapter(path)
  key = "base_model.model." + Q0 + ".lora_A.weight"
  assert adapter.modules[Q0].a.dtype == np.float32
  np.testing.assert_array_equal(adapter.modules[Q0].a,
                                tensors[key].to(torch.bfloat16).float().numpy())
  assert adapter.modules[Q0].scale == 1.0


def test_fp16_bin_directory(good, work):
  path = copy_adapter(good, work / "fp16_bin")
  tensors = safetensors.torch.load_file(os.path.join(path, ST))
  os.remove(os.path.join(path, ST))
  torch.save({k: v.half() for k, v in tensors.items()}, os.path.join(path, "adapter_model.bin"))
  adapter = load_adapter(path)
  np.testing.assert_array_equal(
      adapter.modules[Q0].b,
      tensors["base_model.model." + Q0 + ".lora_B.weight"].half().float().numpy())


def test_safetensors_needs_no_torch(good):
  code = ("import sys; from knots_jax.adapters.peft_files import load_adapter; "
          f"load_adapter({good!r}); assert 'torch' not in sys.modules, 'torch imported'")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  assert result.returncode == 0, result.stderr


def test_missing_torch_says_how_to_install(variants, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(AdapterError, match=r"adapter_model\.bin.*pip install 'knots_jax\[torch\]'"):
    load_adapter(variants["bin"])


def test_pickle_with_objects_is_refused(work):
  path = str(work / "objects.pt")
  torch.save({"state_dict": {}, "obj": peft.LoraConfig()}, path)
  with pytest.raises(AdapterError, match=r"objects\.pt.*weights_only"):
    load_adapter(path)


# ----------------------------------------------------- GPT-2 fan_in_fan_out


@pytest.fixture(scope="module")
def gpt2(work):
  base = gpt2_base(work / "gpt2_base")
  return base, [gpt2_adapter(base, work / f"gpt2_{i}", seed=20 + i, r=r)
                for i, r in enumerate((4, 6))]


def test_gpt2_conv1d_fan_in_fan_out(gpt2):
  base, paths = gpt2
  adapter = load_adapter(paths[0])
  assert adapter.config["fan_in_fan_out"] is True
  deltas = gpt2_deltas(base, paths[0])
  assert "transformer.h.0.attn.c_attn" in deltas
  assert_matches_peft(adapter, deltas, transpose=True)
  c_attn = adapter.modules["transformer.h.0.attn.c_attn"]
  assert c_attn.shape == (96, 32)   # (out, in); the Conv1D weight is [in, out] = [32, 96]
  aset = load_adapters(paths)
  assert aset.fan_in_fan_out
  check_against_base(aset, base_shapes(base))


def test_fan_in_fan_out_must_agree(good, work):
  fan = edit_config(copy_adapter(good, work / "fan"), fan_in_fan_out=True)
  with pytest.raises(AdapterError, match=r"fan_in_fan_out is True here but False"):
    load_adapters([good, fan])


# ---------------------------------------------------------------- refusals


def test_refuses_other_peft_type(good, work):
  path = edit_config(copy_adapter(good, work / "ia3"), peft_type="IA3")
  with pytest.raises(AdapterError, match=r"ia3/adapter_config\.json: peft_type is 'IA3'"):
    load_adapter(path)


def test_refuses_dora_config(good, work):
  path = edit_config(copy_adapter(good, work / "dora_cfg"), use_dora=True)
  with pytest.raises(AdapterError, match=r"dora_cfg/adapter_config\.json: DoRA"):
    load_adapter(path)


def test_refuses_real_dora(base, work):
  path = peft_factory.make_lora_adapter(base, str(work / "dora"), seed=10, use_dora=True)
  with pytest.raises(AdapterError, match=r"dora/adapter_config\.json: DoRA"):
    load_adapter(path)
  # The tensors alone give it away too.
  edit_config(path, use_dora=False)
  with pytest.raises(AdapterError, match=r"dora/adapter_model\.safetensors: module "
                                         r"`model\.layers\.\d\.self_attn\.\w+`: DoRA magnitude"):
    load_adapter(path)


def test_refuses_embedding_lora(base, work):
  path = peft_factory.make_lora_adapter(base, str(work / "emb"), seed=11,
                                        target_modules=["embed_tokens", "q_proj"])
  with pytest.raises(AdapterError, match=r"emb/adapter_model\.safetensors: module "
                                         r"`model\.embed_tokens`: embedding LoRA"):
    load_adapter(path)


def test_refuses_conv_lora(good, work):
  key = f"base_model.model.{Q0}.lora_A.weight"
  path = edit_tensors(copy_adapter(good, work / "conv"),
                      lambda t: {**t, key: t[key].reshape(4, 32, 1, 1)})
  with pytest.raises(AdapterError, match=rf"conv/adapter_model\.safetensors: module `{Q0}`: "
                                         r"conv LoRA"):
    load_adapter(path)


def test_refuses_lora_bias(base, work):
  path = peft_factory.make_lora_adapter(base, str(work / "lbias"), seed=12, lora_bias=True,
                                        target_modules=["q_proj"])
  with pytest.raises(AdapterError, match=r"lbias/adapter_config\.json: LoRA bias"):
    load_adapter(path)
  edit_config(path, lora_bias=False)
  with pytest.raises(AdapterError, match=rf"lbias/adapter_model\.safetensors: module `model\."
                                         r"layers\.\d\.self_attn\.q_proj`: LoRA bias"):
    load_adapter(path)


@pytest.mark.parametrize("drop,present", [("B", "A"), ("A", "B")])
def test_refuses_unpaired_factor(good, work, drop, present):
  key = f"base_model.model.{Q0}.lora_{drop}.weight"
  path = edit_tensors(copy_adapter(good, work / f"unpaired_{drop}"),
                      lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(AdapterError, match=rf"unpaired_{drop}/adapter_model\.safetensors: module "
                                         rf"`{Q0}`: has lora_{present} .* but no lora_{drop}"):
    load_adapter(path)


def test_refuses_inner_dimension_mismatch(good, work):
  key = f"base_model.model.{Q0}.lora_B.weight"
  path = edit_tensors(copy_adapter(good, work / "inner"),
                      lambda t: {**t, key: np.ones((32, 5), np.float32)})
  with pytest.raises(AdapterError, match=rf"inner/adapter_model\.safetensors: module `{Q0}`: "
                                         r"inner dimensions disagree"):
    load_adapter(path)


def test_refuses_rank_that_disagrees_with_config(good, work):
  path = edit_config(copy_adapter(good, work / "rank"), rank_pattern={"v_proj": 8})
  with pytest.raises(AdapterError, match=r"rank/adapter_model\.safetensors: module "
                                         r"`model\.layers\.0\.self_attn\.v_proj`: the tensors "
                                         r"have rank 4 but the config says r=8"):
    load_adapter(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refuses_non_finite(good, work, bad):
  key = f"base_model.model.{Q0}.lora_B.weight"

  def poison(t):
    t[key] = t[key].copy()
    t[key][3, 1] = bad
    return t
  path = edit_tensors(copy_adapter(good, work / f"nonfinite_{bad}"), poison)
  with pytest.raises(AdapterError, match=rf"nonfinite_{bad}/adapter_model\.safetensors: tensor "
                                         rf"{re.escape(key)} has 1 NaN or inf"):
    load_adapter(path)


def test_refuses_non_finite_extra(variants, work):
  key = "base_model.model.lm_head.weight"
  path = edit_tensors(copy_adapter(variants["saved"], work / "nan_extra"),
                      lambda t: {**t, key: np.full_like(t[key], np.nan)})
  with pytest.raises(AdapterError, match=r"nan_extra/adapter_model\.safetensors: tensor "
                                         r"base_model\.model\.lm_head\.weight"):
    load_adapter(path)


def test_refuses_no_lora_tensors(variants, work):
  key = "base_model.model.lm_head.weight"
  path = edit_tensors(copy_adapter(variants["saved"], work / "nolora"),
                      lambda t: {key: t[key]})
  with pytest.raises(AdapterError, match=r"nolora/adapter_model\.safetensors: no LoRA tensors"):
    load_adapter(path)


def test_refuses_missing_files(good, work):
  empty = work / "empty"
  os.makedirs(empty)
  with pytest.raises(AdapterError, match=r"empty: not a PEFT LoRA adapter directory: looked for "
                                         r"adapter_config\.json and adapter_model\.safetensors "
                                         r"or adapter_model\.bin"):
    load_adapter(str(empty))
  no_weights = copy_adapter(good, work / "noweights")
  os.remove(os.path.join(no_weights, ST))
  with pytest.raises(AdapterError, match=r"noweights: .*missing: adapter_model\.safetensors, "
                                         r"adapter_model\.bin"):
    load_adapter(no_weights)
  with pytest.raises(AdapterError, match=r"nowhere: no such file or directory"):
    load_adapter(str(work / "nowhere"))
  no_config = copy_adapter(good, work / "noconfig")
  os.remove(os.path.join(no_config, "adapter_config.json"))
  with pytest.raises(AdapterError, match=r"noconfig: .*missing: adapter_config\.json$"):
    load_adapter(no_config)   # the weights are there: only the config is named


def test_refuses_other_lora_variants(good, work):
  path = edit_config(copy_adapter(good, work / "alora"), alora_invocation_tokens=[1, 2])
  with pytest.raises(AdapterError, match=r"alora/adapter_config\.json: aLoRA"):
    load_adapter(path)
  key = f"base_model.model.{Q0}.lora_diag"   # e.g. KaSA's diagonal between A and B
  path = edit_tensors(copy_adapter(good, work / "diag"),
                      lambda t: {**t, key: np.ones(4, np.float32)})
  with pytest.raises(AdapterError, match=rf"diag/adapter_model\.safetensors: module `{Q0}`: "
                                         r"tensor .*lora_diag .* not supported"):
    load_adapter(path)


def test_refuses_several_adapters_in_one_file(base, work):
  _, state = lora_state_dict(base, seed=16, r=4, target_modules=["q_proj"])
  lora = {k: v for k, v in state.items() if "lora_" in k}
  lora.update({k.replace(".default.", ".other."): v for k, v in lora.items()})
  path = str(work / "two.pt")
  torch.save(lora, path)
  with pytest.raises(AdapterError, match=r"two\.pt: the file holds several adapters "
                                         r"\(default, other\)"):
    load_adapter(path)


def test_refuses_unknown_adapter_tensor_in_full_state_dict(base, work):
  _, state = lora_state_dict(base, seed=17, r=4, target_modules=["q_proj"])
  state["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"] = (
      torch.zeros(2, 32))
  path = str(work / "tokens.pt")
  torch.save(state, path)
  with pytest.raises(AdapterError, match=r"tokens\.pt: tensor .*trainable_tokens_delta\.default "
                                         r"belongs to adapter `default`"):
    load_adapter(path)


def test_refuses_layers_outside_layers_to_transform(good, work):
  path = edit_config(copy_adapter(good, work / "ltt"), layers_to_transform=[1])
  with pytest.raises(AdapterError, match=r"ltt/adapter_model\.safetensors: module `model\."
                                         r"layers\.0\.self_attn\.\w+`: layer 0 is not in "
                                         r"layers_to_transform=\[1\]"):
    load_adapter(path)


# ------------------------------------------------------ adapter_config values

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value,message", [
    ("lora_alpha", NAN, "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", INF, "lora_alpha must be a finite number, got inf"),
    ("lora_alpha", -INF, "lora_alpha must be a finite number, got -inf"),
    ("lora_alpha", 1e39, "lora_alpha must be a positive number float32 can hold "
                         "(at most 3.4e+38), got 1e+39"),
    ("lora_alpha", 0, "lora_alpha must be a positive finite number, got 0"),
    ("lora_alpha", -8, "lora_alpha must be a positive finite number, got -8"),
    ("lora_alpha", "16", "lora_alpha must be a finite number, got '16'"),
    ("lora_alpha", None, "lora_alpha must be a finite number, got None"),
    ("lora_alpha", True, "lora_alpha must be a finite number, got True"),
    ("r", "4", "r must be an integer, got '4'"),
    ("r", 4.5, "r must be an integer, got 4.5"),
    ("r", 0, "r must be a positive integer, got 0"),
    ("use_rslora", "yes", "use_rslora must be true or false, got 'yes'"),
    ("fan_in_fan_out", "false", "fan_in_fan_out must be true or false, got 'false'"),
    ("use_dora", "false", "use_dora must be true or false, got 'false'"),
    ("rank_pattern", {"q_proj": "8"}, "rank_pattern entry 'q_proj' must be an integer, got '8'"),
    ("rank_pattern", [8], "rank_pattern must be an object of string keys, got [8]"),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern key must be a valid regular expression, "
                                     "got 'q_proj('"),
    ("alpha_pattern", {"v_proj": NAN}, "alpha_pattern entry 'v_proj' must be a finite number, "
                                       "got nan"),
    ("alpha_pattern", {"v_proj": 1e39}, "alpha_pattern entry 'v_proj' must be a positive number "
                                        "float32 can hold"),
    ("layers_to_transform", ["0"], "layers_to_transform item 0 must be an integer, got '0'"),
    ("layers_to_transform", "1", "layers_to_transform must be a non-negative integer or a list "
                                 "of them, got '1'"),
    ("layers_to_transform", [0, -1], "layers_to_transform item 1 must be a non-negative integer, "
                                     "got -1"),
    ("layers_pattern", 5, "layers_pattern must be a string or a list of strings, got 5"),
    ("target_modules", 5, "target_modules must be a list of module names or a regular "
                          "expression string, got 5"),
    ("target_modules", ["q_proj", 1], "target_modules item 1 must be a string, got 1"),
    ("target_modules", ".*(q_proj", "target_modules must be a valid regular expression, "
                                    "got '.*(q_proj'"),
    ("exclude_modules", 3, "exclude_modules must be a list of module names or a regular "
                           "expression string, got 3"),
    ("bias", "some", "bias must be one of none, all, lora_only; got 'some'"),
    ("peft_type", 5, "peft_type must be a string, got 5"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list, got 'lm_head'"),
    ("base_model_name_or_path", 3, "base_model_name_or_path must be a string, got 3"),
])
def test_refuses_bad_config_values(good, tmp_path, field, value, message):
  """Each bad value is an AdapterError naming the file, the field and the value (before:
  TypeError / ZeroDivisionError / re.error tracebacks, or silently accepted)."""
  path = edit_config(copy_adapter(good, tmp_path / "adapter"), **{field: value})
  with pytest.raises(AdapterError) as info:
    load_adapter(path)
  text = str(info.value)
  assert text.startswith(os.path.join(path, "adapter_config.json") + ": "), text
  assert message in text, text


@pytest.mark.parametrize("changes,message", [
    ({"lora_alpha": 1e-46}, r"module `model\.layers\.0\.self_attn\.k_proj`: the scale "
                            r"lora_alpha / r = 1e-46 / 4 = 2\.5e-47 is 0 in float32"),
    ({"alpha_pattern": {"v_proj": 1e-300}, "use_rslora": True},
     r"module `model\.layers\.0\.self_attn\.v_proj`: the scale lora_alpha / sqrt\(r\) = "
     r"1e-300 / sqrt\(4\) = 5e-301 is 0 in float32"),
])
def test_refuses_scale_that_float32_cannot_hold(good, tmp_path, changes, message):
  path = edit_config(copy_adapter(good, tmp_path / "scale"), **changes)
  with pytest.raises(AdapterError, match=re.escape(os.path.join(path, "adapter_config.json"))
                     + ": " + message):
    load_adapter(path)


def test_json_nan_reaches_the_check(good, work):
  """Python's json writes and reads NaN / Infinity; the file really holds them."""
  path = edit_config(copy_adapter(good, work / "json_nan"), lora_alpha=NAN,
                     alpha_pattern={"q_proj": INF})
  raw = open(os.path.join(path, "adapter_config.json")).read()
  assert '"lora_alpha": NaN' in raw and '"q_proj": Infinity' in raw
  with pytest.raises(AdapterError, match=r"json_nan/adapter_config\.json: lora_alpha must be a "
                                         r"finite number, got nan"):
    load_adapter(path)


@pytest.mark.parametrize("changes,message", [
    ({"target_modules": ".*_proj", "layers_to_transform": [0]},
     r"layers_to_transform=\[0\] cannot be used with a regular-expression target_modules"),
    ({"target_modules": ".*_proj", "layers_pattern": "layers"},
     r"layers_pattern='layers' cannot be used with a regular-expression target_modules"),
    ({"layers_pattern": "layers", "layers_to_transform": None},
     r"layers_pattern='layers' is set without layers_to_transform"),
])
def test_refuses_combinations_peft_refuses(good, tmp_path, changes, message):
  path = edit_config(copy_adapter(good, tmp_path / "combo"), **changes)
  with open(os.path.join(path, "adapter_config.json")) as f:
    config = json.load(f)
  with pytest.raises(ValueError):   # PEFT itself refuses the config
    peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
  with pytest.raises(AdapterError, match=r"adapter_config\.json: " + message):
    load_adapter(path)


# ------------------------------------------------------------ target_modules


def peft_adapted_modules(base, path) -> set[str]:
  """The modules PEFT puts LoRA layers on when it loads the adapter at `path`."""
  try:
    return set(peft_factory.peft_delta_weights(base, path))
  except ValueError as e:   # "Target modules ... not found in the base model"
    assert "not found in the base model" in str(e)
    return set()
  except KeyError:          # modules_to_save over an adapted module: PEFT cannot load it
    return set()


def test_refuses_target_modules_that_miss_the_tensors(base, good, work):
  """Config says gate/up, tensors are q/k/v/o: PEFT would adapt gate/up (untrained) and drop
  every tensor of the file."""
  path = edit_config(copy_adapter(good, work / "wrong_targets"),
                     target_modules=["gate_proj", "up_proj"])
  tensor_modules = set(load_adapter(good).modules)
  adapted = peft_adapted_modules(base, path)
  assert adapted and not adapted & tensor_modules
  with pytest.raises(AdapterError, match=r"wrong_targets/adapter_config\.json: target_modules="
                                         r"\['gate_proj', 'up_proj'\] does not cover 8 of the 8 "
                                         r"module\(s\) that adapter_model\.safetensors has LoRA "
                                         r"tensors for: model\.layers\.0\.self_attn\.k_proj, "):
    load_adapter(path)


@pytest.mark.parametrize("changes,covered", [
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, True),
    ({"target_modules": ["self_attn.q_proj", "k_proj", "v_proj", "o_proj"]}, True),
    ({"target_modules": ["q_proj", "k_proj", "v_proj"]}, False),
    ({"target_modules": ["proj"]}, False),
    ({"target_modules": [f"model.layers.{i}.self_attn.{k}_proj" for i in (0, 1)
                         for k in "qkvo"]}, True),
    ({"target_modules": [f"model.layers.0.self_attn.{k}_proj" for k in "qkvo"]}, False),
    ({"target_modules": r".*\.(q|k|v|o)_proj"}, True),
    ({"target_modules": r"model\.layers\.0\..*_proj"}, False),
    ({"target_modules": "q_proj"}, False),
    ({"target_modules": "all-linear"}, True),
    ({"target_modules": "ALL-LINEAR"}, True),
    ({"exclude_modules": ["layers.1.self_attn.o_proj"]}, False),
    ({"exclude_modules": r".*\.v_proj"}, False),
    ({"exclude_modules": ["mlp"]}, True),
    ({"modules_to_save": ["o_proj"]}, False),
])
def test_target_modules_coverage_agrees_with_peft(base, good, tmp_path, changes, covered):
  """The adapter loads exactly when PEFT, loading it, adapts every module it has tensors for."""
  path = edit_config(copy_adapter(good, tmp_path / "targets"), **changes)
  tensor_modules = set(load_adapter(good).modules)
  assert (tensor_modules <= peft_adapted_modules(base, path)) == covered
  if covered:
    assert set(load_adapter(path).modules) == tensor_modules
  else:
    with pytest.raises(AdapterError, match=r"targets/adapter_config\.json: .*(does not cover|"
                                           r"excludes)"):
      load_adapter(path)


def test_refuses_missing_target_modules(good, work):
  path = copy_adapter(good, work / "no_targets")
  file = os.path.join(path, "adapter_config.json")
  with open(file) as f:
    config = json.load(f)
  del config["target_modules"]
  with open(file, "w") as f:
    json.dump(config, f)
  with pytest.raises(AdapterError, match=r"no_targets/adapter_config\.json: target_modules is "
                                         r"missing or null"):
    load_adapter(path)


# ------------------------------------------------------------ load_adapters


def test_load_adapters_ranks_may_differ(llama_family):
  aset = load_adapters(llama_family[1], names=["x", "x", "y"])
  assert aset.names == ["x", "x_2", "y"]
  assert [f.rank for f in aset.factors(Q0)] == [4, 8, 6]
  assert len(aset) == 3 and aset.base_model == llama_family[0]


def test_load_adapters_default_names(llama_family):
  assert load_adapters(llama_family[1][:2]).names == ["task0", "task1"]


def test_load_adapters_needs_one_and_matching_names(good):
  with pytest.raises(AdapterError, match="at least 1"):
    load_adapters([])
  with pytest.raises(AdapterError, match="2 names for 1 adapters"):
    load_adapters([good], names=["a", "b"])


def test_load_adapters_different_base_shapes(good, work):
  wide = peft_factory.make_base_model(str(work / "wide_base"), hidden_size=48)
  other = peft_factory.make_lora_adapter(wide, str(work / "wide"), seed=13)
  with pytest.raises(AdapterError, match=r"(?s)adapter `wide` \(.*wide\) vs `task0`.*"
                                         r"another \(out, in\) shape: model\.layers\.0\.self_attn"
                                         r"\.k_proj: \(24, 48\) vs \(16, 32\)"):
    load_adapters([good, other], check_base_model=False)


def test_load_adapters_different_modules(base, good, work):
  other = peft_factory.make_lora_adapter(base, str(work / "qv_mlp"), seed=14,
                                         target_modules=["q_proj", "v_proj", "up_proj"])
  with pytest.raises(AdapterError) as info:
    load_adapters([good, other])
  message = str(info.value)
  assert "adapter `qv_mlp`" in message
  assert "- missing 4 module(s): model.layers.0.self_attn.k_proj, " in message
  assert "+ extra 2 module(s): model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj" in message


def test_load_adapters_lists_a_few_then_a_count(base, good, work):
  other = peft_factory.make_lora_adapter(base, str(work / "mlp_only"), seed=15,
                                         target_modules=["gate_proj", "up_proj", "down_proj"])
  with pytest.raises(AdapterError, match=r"- missing 8 module\(s\): (\S+, ){4}\S+ "
                                         r"\(and 3 more\)"):
    load_adapters([good, other])


def test_load_adapters_different_base_model(good, work):
  other = edit_config(copy_adapter(good, work / "renamed"),
                      base_model_name_or_path="meta-llama/Other")
  with pytest.raises(AdapterError, match=r"base_model_name_or_path is 'meta-llama/Other' here .*"
                                         r"check_base_model=False"):
    load_adapters([good, other])
  assert load_adapters([good, other], check_base_model=False).names == ["task0", "renamed"]


def test_load_adapters_different_extra(good, variants):
  with pytest.raises(AdapterError, match=r"\+ extra 1 extra tensor\(s\) \(modules_to_save\): "
                                         r"lm_head\.weight"):
    load_adapters([good, variants["saved"]])


# ------------------------------------------------------- check_against_base


def test_check_against_base(llama_family, work):
  base, paths = llama_family
  shapes = base_shapes(base)
  aset = load_adapters(paths)
  check_against_base(aset, shapes)
  missing = {k: v for k, v in shapes.items() if k != "model.layers.1.self_attn.v_proj.weight"}
  with pytest.raises(AdapterError, match=r"task0.*do not fit the base model:\n  - 1 module\(s\) "
                                         r"not in the base model: model\.layers\.1\.self_attn"
                                         r"\.v_proj"):
    check_against_base(aset, missing)
  wrong = {**shapes, f"{Q0}.weight": (32, 48)}
  with pytest.raises(AdapterError, match=rf"`{Q0}`: base weight \(32, 48\), adapter expects "
                                         r"\(32, 32\)"):
    check_against_base(aset, wrong)
  # A base model of another width.
  wide = base_shapes(peft_factory.make_base_model(str(work / "wide_base2"), hidden_size=48))
  with pytest.raises(AdapterError, match=r"8 module\(s\) with another shape"):
    check_against_base(aset, wide)
