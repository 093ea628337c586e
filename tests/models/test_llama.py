"""models.llama against transformers' PyTorch Llama (and PEFT) on tiny random models.

Every reference is computed by transformers / peft from the same files: logits
must agree to 1e-4 of the largest |logit| in float32. Left-padded rows have
query positions that see no token; there our model, like HF's eager attention,
averages over all keys (HF's sdpa gives another, equally meaningless, value),
so those comparisons use `attn_implementation="eager"`, and sdpa is compared
where a token is present.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import knots_jax
from knots_jax.export import full_model
from knots_jax.io import hf_checkpoint
from knots_jax.models import llama, lora
from tests import peft_factory

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(vocab: int, batch: int = 3, length: int = 9, seed: int = 0, pad: int = 0):
  """Token ids (never `pad`) with one right-padded and one left-padded row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(batch, length))
  mask = np.ones_like(ids)
  mask[1, length - 3:] = 0     # right padding
  mask[2, :4] = 0              # left padding
  ids = np.where(mask == 1, ids, pad)
  return ids, mask


def _hf_logits(model, ids, mask=None, position_ids=None):
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                position_ids=None if position_ids is None else torch.tensor(position_ids))
  return out.logits.float().numpy()


def _assert_close(got, ref, tol=TOL, where=None):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape
  if where is not None:
    got, ref = got[where], ref[where]
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err <= tol, f"max relative error {err:.3g} > {tol}"


def _save(model, path, **kwargs) -> str:
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  return str(path)


def _make(path, cls=transformers.LlamaForCausalLM, seed=0, save_kwargs=None, **overrides):
  torch.manual_seed(seed)
  model = cls(peft_factory.tiny_llama_config(**overrides)).eval()
  return model, _save(model, path, **(save_kwargs or {}))


def _eager(cls, path, dtype=torch.float32):
  return cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


# --------------------------------------------------------------- configuration


RAW_CONFIGS = {
    "plain": {},
    "llama3_v5": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}},
    "llama3_v4": {"rope_theta": 10000.0, "rope_scaling": {
        "type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}},
    "linear": {"rope_theta": 20000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


@pytest.mark.parametrize("name", sorted(RAW_CONFIGS))
def test_config_and_rope_frequencies_match_transformers(name):
  raw = {"vocab_size": 96, "hidden_size": 256, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 128, **RAW_CONFIGS[name]}
  hf = transformers.LlamaConfig(**json.loads(json.dumps(raw)))
  ours = llama.LlamaConfig.from_hf(raw)
  assert (ours.head_dim, ours.num_key_value_heads) == (hf.head_dim, hf.num_key_value_heads)
  rope_type = hf.rope_parameters["rope_type"]
  assert ours.rope_type == rope_type
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  init = (transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
          .compute_default_rope_parameters if rope_type == "default"
          else ROPE_INIT_FUNCTIONS[rope_type])
  expected = init(hf)[0].numpy()
  np.testing.assert_allclose(llama.rope_frequencies(ours), expected, rtol=1e-6)
  if rope_type == "llama3":   # the case covers all three bands: kept, divided, interpolated
    plain = 1.0 / ours.rope_theta ** (np.arange(0, 64, 2) / 64)
    kept = np.isclose(expected, plain, rtol=1e-5)
    divided = np.isclose(expected, plain / ours.rope_factor, rtol=1e-5)
    assert kept.any() and divided.any() and (~kept & ~divided).any()


def test_config_reads_heads_labels_and_refuses_what_it_cannot_run(tmp_path):
  config = llama.LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "head_dim": 32,
                                      "id2label": {"1": "yes", "0": "no"}})
  assert (config.head_dim, config.num_key_value_groups, config.labels, config.num_labels) == (
      32, 2, ("no", "yes"), 2)
  with pytest.raises(ValueError, match="rope_type 'dynamic'"):
    llama.LlamaConfig.from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
  with pytest.raises(ValueError, match="num_key_value_heads 3"):
    llama.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    llama.LlamaConfig.from_hf({"model_type": "mistral"})
  (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu"}))
  with pytest.raises(ValueError, match=r"config\.json.*hidden_act 'gelu'"):
    llama.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="task must be one of"):
    llama.from_pretrained(str(tmp_path), task="token_classification")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    llama.from_pretrained(str(tmp_path / "nowhere"))


# --------------------------------------------------------------- causal LM


CAUSAL_CASES = {
    # grouped-query attention (2 kv heads for 4 query heads), untied lm_head
    "gqa_untied": dict(),
    # tied embeddings, plain multi-head attention, projections with biases
    "tied_biases": dict(tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True,
                        mlp_bias=True),
    # Llama 3.1 rope scaling, one kv head, head_dim 16 (all three frequency bands)
    "llama3_rope": dict(hidden_size=64, num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # explicit head_dim != hidden / heads, linear rope, checkpoint sharded in several files
    "sharded_head_dim": dict(head_dim=16, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_CASES))
def test_causal_lm_logits_match_transformers(tmp_path, name):
  save_kwargs = {"max_shard_size": "20KB"} if name.startswith("sharded") else {}
  _, path = _make(tmp_path / "m", save_kwargs=save_kwargs, **CAUSAL_CASES[name])
  if save_kwargs:
    assert len(set(hf_checkpoint.tensor_files(path).values())) >= 2
  hf = _eager(transformers.LlamaForCausalLM, path)
  model = llama.from_pretrained(path)
  assert (model.lm_head is None) == hf.config.tie_word_embeddings
  ids, mask = _inputs(96)
  _assert_close(llama.forward(model, ids, mask), _hf_logits(hf, ids, mask))
  if name == "gqa_untied":
    _assert_close(llama.forward(model, ids), _hf_logits(hf, ids))
    # positions as generate() makes them for left padding, given explicitly
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    _assert_close(llama.forward(model, ids, mask, positions), _hf_logits(hf, ids, mask, positions))


def test_default_sdpa_attention_agrees_where_there_are_tokens(tmp_path):
  _, path = _make(tmp_path / "m")
  hf = peft_factory.load_base_model(path)
  assert hf.config._attn_implementation == "sdpa"
  ids, mask = _inputs(96, seed=1)
  _assert_close(llama.forward(llama.from_pretrained(path), ids, mask), _hf_logits(hf, ids, mask),
                where=mask == 1)


# --------------------------------------------------------------- classification


def test_sequence_classification_matches_transformers(tmp_path):
  _, path = _make(tmp_path / "m", cls=transformers.LlamaForSequenceClassification,
                  pad_token_id=0, id2label={0: "a", 1: "b", 2: "c"})
  hf = _eager(transformers.LlamaForSequenceClassification, path)
  model = llama.from_pretrained(path, task="sequence_classification")
  assert model.config.labels == ("a", "b", "c")
  ids, mask = _inputs(96, batch=4, seed=2)
  ids[3] = 0                                    # a row of padding only: HF pools position 0
  mask[3] = 0
  got = llama.forward(model, ids, mask)
  assert got.shape == (4, 3)
  _assert_close(got, _hf_logits(hf, ids, mask))
  np.testing.assert_array_equal(llama.last_token_index(jnp.asarray(ids), 0), [8, 5, 8, 0])


def test_classification_adapter_with_score_in_modules_to_save_matches_peft(tmp_path):
  """A SEQ_CLS PEFT adapter trains LoRA on q, v plus a full `score` head (modules_to_save)."""
  _, base = _make(tmp_path / "base", cls=transformers.LlamaForSequenceClassification,
                  pad_token_id=0, num_labels=3)
  torch.manual_seed(5)
  hf = _eager(transformers.LlamaForSequenceClassification, base)
  peft_model = peft.get_peft_model(hf, peft.LoraConfig(
      task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
      init_lora_weights=False))
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        param.normal_(0.0, 0.2)
  peft_model.save_pretrained(str(tmp_path / "adapter"))
  adapter = knots_jax.load_adapter(str(tmp_path / "adapter"))
  assert "score.weight" in adapter.extra

  model = llama.from_pretrained(base, task="sequence_classification")
  lora.attach_adapter(model, adapter)
  assert llama.load_weights(model, adapter.extra, "adapter") == ["score.weight"]
  ids, mask = _inputs(96, batch=3, seed=3)
  _assert_close(llama.forward(model, ids, mask), _hf_logits(peft_model.eval(), ids, mask))


# --------------------------------------------------------------- adapters and merges


def test_attached_adapter_matches_peft_and_detach_gives_the_base(llama_family):
  base, adapters = llama_family
  ids, mask = _inputs(96, seed=4)
  model = llama.from_pretrained(base)
  for path in adapters[:2]:
    peft_model = peft.PeftModel.from_pretrained(_eager(transformers.LlamaForCausalLM, base), path)
    lora.attach_adapter(model, knots_jax.load_adapter(path))   # replaces the previous one
    expected = _hf_logits(peft_model.eval(), ids, mask)
    _assert_close(llama.forward(model, ids, mask), expected)
    _assert_close(llama.make_forward(model)(ids, mask), expected)
  lora.detach_adapters(model)
  _assert_close(llama.forward(model, ids, mask),
                _hf_logits(_eager(transformers.LlamaForCausalLM, base), ids, mask))


def test_recorded_grams_leave_out_padding(llama_family):
  """Grams and captured rows of a batch with right padding equal those of its
  sequences run one by one without padding (the padding rows are not counted),
  under jit and eagerly."""
  base, _ = llama_family
  model = llama.from_pretrained(base)
  rng = np.random.default_rng(5)
  lengths = [9, 6, 3]
  ids = rng.integers(1, 96, size=(3, 9))
  mask = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int32)
  lora.record_inputs(model)
  llama.forward(model, np.where(mask == 1, ids, 0), mask)
  padded = lora.input_grams(model)
  lora.stop_recording(model)
  lora.record_inputs(model)
  for row, n in zip(ids, lengths):
    llama.forward(model, row[None, :n])
  alone = lora.input_grams(model)
  lora.stop_recording(model)
  assert set(padded) == set(alone) and len(padded) == 2 * 7 + 1   # + lm_head
  for name, (gram, count) in padded.items():
    assert count == alone[name][1] == sum(lengths), name
    np.testing.assert_allclose(gram, alone[name][0], rtol=1e-4,
                               atol=1e-4 * np.abs(alone[name][0]).max(), err_msg=name)
  # q/k/v (and gate/up) get one input: one of them records, the others share its
  # Gram, which equals the Gram of each one's own captured input rows.
  layers = lora.linears(model)
  lora.record_inputs(model)
  recording = sorted(n for n, layer in layers.items() if layer.input_gram is not None)
  lora.stop_recording(model)
  assert len(recording) == 2 * 4 + 1
  assert sum(n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj", "v_proj")
             for n in recording) == 1
  names = ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
  rows = lora.capture_inputs(model, lambda: model(np.where(mask == 1, ids, 0), mask), names)
  assert rows[names[-1]].shape == (sum(lengths), model.config.intermediate_size)
  for name in names:
    np.testing.assert_allclose(padded[name][0], rows[name].T @ rows[name], rtol=1e-4,
                               atol=1e-4 * np.abs(padded[name][0]).max(), err_msg=name)


def test_make_forward_compiles_once_per_shape(llama_family):
  base, adapters = llama_family
  model = llama.from_pretrained(base)
  ids, mask = _inputs(96, seed=8)
  f = llama.make_forward(model)
  before = llama._apply._cache_size()
  first = f(ids, mask)
  np.testing.assert_array_equal(f(ids, mask), first)
  np.testing.assert_array_equal(llama.make_forward(model)(ids, mask), first)
  assert llama._apply._cache_size() == before + 1
  np.testing.assert_allclose(first, llama.forward(model, ids, mask), rtol=1e-6,
                             atol=1e-6 * np.abs(first).max())


def _hf_with_deltas(base: str, deltas: dict) -> torch.nn.Module:
  hf = _eager(transformers.LlamaForCausalLM, base)
  params = dict(hf.named_parameters())
  with torch.no_grad():
    for module, delta in deltas.items():
      params[f"{module}.weight"] += torch.tensor(np.array(delta, np.float32))
  return hf


@pytest.mark.parametrize("method", ["ta", "knots_ties"])
def test_merged_model_equals_transformers_base_plus_merged_update(llama_family, method,
                                                                   tmp_path):
  base, adapters = llama_family
  result = knots_jax.merge(knots_jax.load_adapters(adapters), method, scaling=0.7, top_k=40)
  if method == "ta":   # independent of the merge code: 0.7 * sum of PEFT's own updates
    deltas = {}
    for path in adapters:
      for module, delta in peft_factory.peft_delta_weights(base, path).items():
        deltas[module] = deltas.get(module, 0) + 0.7 * delta.numpy()
  else:
    deltas = dict(result.deltas())
  model = llama.from_pretrained(base, weights=full_model.merged_model_weights(result, base))
  ids, mask = _inputs(96, seed=5)
  reference = _hf_logits(_hf_with_deltas(base, deltas), ids, mask)
  _assert_close(llama.forward(model, ids, mask), reference)
  if method == "ta":   # the same merge written as a checkpoint loads the same
    full_model.save_merged_model(result, base, str(tmp_path / "merged"), max_shard_size="20KB")
    _assert_close(llama.forward(llama.from_pretrained(str(tmp_path / "merged")), ids, mask),
                  reference)


# --------------------------------------------------------------- dtypes


def test_bfloat16_checkpoint_in_float32_and_in_bfloat16(tmp_path):
  torch.manual_seed(6)
  hf = transformers.LlamaForCausalLM(peft_factory.tiny_llama_config()).to(torch.bfloat16)
  path = _save(hf, tmp_path / "bf16")
  ids, mask = _inputs(96, seed=6)
  ref = _hf_logits(_eager(transformers.LlamaForCausalLM, path, torch.float32), ids, mask)
  _assert_close(llama.forward(llama.from_pretrained(path), ids, mask), ref)

  model = llama.from_pretrained(path, dtype=jnp.bfloat16)
  assert all(var.get_value().dtype == jnp.bfloat16 for var, _ in llama.hf_targets(model).values())
  got = llama.forward(model, ids, mask)
  assert got.dtype == jnp.bfloat16
  ref16 = _hf_logits(_eager(transformers.LlamaForCausalLM, path, torch.bfloat16), ids, mask)
  _assert_close(got, ref16, tol=3e-2)
  _assert_close(got, ref, tol=3e-2)


# --------------------------------------------------------------- errors


def _rewrite(path: str, change) -> None:
  tensors = safetensors.numpy.load_file(path)
  change(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_and_misshaped_tensors_name_the_key_and_file(tmp_path):
  _, single = _make(tmp_path / "single")
  file = os.path.join(single, "model.safetensors")
  _rewrite(file, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"single/model\.safetensors: missing 1 .*"
                                       r"model\.layers\.1\.mlp\.up_proj\.weight"):
    llama.from_pretrained(single)

  _, sharded = _make(tmp_path / "sharded", save_kwargs={"max_shard_size": "20KB"})
  key = "model.layers.0.self_attn.k_proj.weight"
  shard = hf_checkpoint.tensor_files(sharded)[key]
  _rewrite(shard, lambda t: t.__setitem__(key, np.zeros((8, 32), np.float32)))
  with pytest.raises(ValueError, match=rf"{os.path.basename(shard)}: tensor `{key}` has shape "
                                       r"\(8, 32\), the model \(config.json\) expects \(16, 32\)"):
    llama.from_pretrained(sharded)

  _, good = _make(tmp_path / "good")
  weights = hf_checkpoint.read_tensors(good, hf_checkpoint.tensor_files(good))
  del weights["lm_head.weight"]
  with pytest.raises(ValueError, match="weights given for.*lm_head.weight.*tie_word_embeddings"):
    llama.from_pretrained(good, weights=weights)
  with pytest.raises(ValueError, match="score.weight.*causal-LM checkpoint"):
    llama.from_pretrained(good, task="sequence_classification")
  model = llama.from_pretrained(good)
  with pytest.raises(ValueError, match="swap: tensor `lm_head.weight` has shape"):
    llama.load_weights(model, {"lm_head.weight": np.zeros((3, 32))}, "swap")
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model(np.ones((2, 5), np.int32), np.ones((2, 4)))


# --------------------------------------------------------------- 8 devices

_MESH_WORKER = r"""
import os, sys, json
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, sys.argv[1])
import numpy as np, jax
from knots_jax import load_adapter
from knots_jax.io import hf_checkpoint as checkpoint
from knots_jax.parallel import sharding
from knots_jax.models import llama, lora
base, adapter, out = sys.argv[2:5]
ids, mask = np.load(out + ".in.npy")
mesh = sharding.make_mesh()
files = llama.from_pretrained(base, mesh=mesh)
numpy_weights = checkpoint.read_tensors(base, checkpoint.tensor_files(base))
given = llama.from_pretrained(base, mesh=mesh, weights=numpy_weights)
kernel = files.model.layers[0].self_attn.q_proj.kernel.get_value()
embed = given.model.embed_tokens.weight.get_value()
info = {"kernel_devices": len(kernel.sharding.device_set),
        "kernel_shard": list(kernel.addressable_shards[0].data.shape),
        "embed_shard": list(embed.addressable_shards[0].data.shape)}
results = {"files": llama.forward(files, ids, mask), "given": llama.forward(given, ids, mask)}
lora.attach_adapter(files, load_adapter(adapter))
results["adapter"] = llama.forward(files, ids, mask)
np.savez(out, **{k: np.asarray(v) for k, v in results.items()})
json.dump(info, open(out + ".json", "w"))
"""


def test_eight_device_mesh_equals_one_device(llama_family, tmp_path):
  base, adapters = llama_family
  ids, mask = _inputs(96, seed=7)
  out = str(tmp_path / "mesh.npz")
  np.save(out + ".in.npy", np.stack([ids, mask]))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, ROOT, base, adapters[0], out],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = np.load(out)
  with open(out + ".json") as f:
    info = json.load(f)
  assert info == {"kernel_devices": 8, "kernel_shard": [32, 4], "embed_shard": [12, 32]}

  model = llama.from_pretrained(base)
  expected = np.asarray(llama.forward(model, ids, mask))
  _assert_close(got["files"], expected, tol=1e-5)
  _assert_close(got["given"], expected, tol=1e-5)
  lora.attach_adapter(model, knots_jax.load_adapter(adapters[0]))
  _assert_close(got["adapter"], llama.forward(model, ids, mask), tol=1e-5)
