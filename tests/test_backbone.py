"""knots_jax.backbone: whole HF backbones in JAX, and the full merged model on disk."""

import json
import os
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers

import knots_jax
from knots_jax import backbone, checkpoint, sharding
from tests import peft_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_dict(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sharded_base(llama_family, tmp_path_factory):
  """The llama_family base re-saved by transformers in several small safetensors shards."""
  base_dir, _ = llama_family
  out = str(tmp_path_factory.mktemp("backbone") / "base_sharded")
  model = peft_factory.load_base_model(base_dir)
  model.save_pretrained(out, max_shard_size="20KB")
  return out, model


@pytest.fixture(scope="module")
def bf16_base(sharded_base, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("backbone") / "base_bf16")
  _, model = sharded_base
  bf = transformers.LlamaForCausalLM(model.config).to(torch.bfloat16)
  bf.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
  bf.save_pretrained(out, max_shard_size="10KB")
  return out, bf


@pytest.fixture(scope="module")
def merged(llama_family):
  _, adapter_dirs = llama_family
  return knots_jax.merge(knots_jax.load_adapters(adapter_dirs), "knots_ties", top_k=30)


def test_fixture_is_sharded(sharded_base):
  path, _ = sharded_base
  assert os.path.isfile(os.path.join(path, checkpoint.INDEX))
  assert len(set(checkpoint.tensor_files(path).values())) >= 2


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_read_backbone_equals_torch_state_dict(which, sharded_base, bf16_base):
  path, model = sharded_base if which == "fp32" else bf16_base
  got = backbone.read_backbone(path)
  want = model.state_dict()
  assert set(got) == set(want)
  for key, value in got.items():
    ref = want[key]
    assert str(value.dtype) == ("float32" if which == "fp32" else "bfloat16"), key
    assert value.shape == tuple(ref.shape)
    np.testing.assert_array_equal(np.asarray(value, np.float32), ref.float().numpy(), err_msg=key)


def test_read_backbone_keys_dtype_and_missing(bf16_base):
  path, model = bf16_base
  key = "model.layers.1.mlp.up_proj.weight"
  got = backbone.read_backbone(path, keys=[key], dtype=np.float32)
  assert list(got) == [key] and got[key].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got[key]), model.state_dict()[key].float().numpy())
  with pytest.raises(KeyError, match="no tensor"):
    backbone.read_backbone(path, keys=["nope.weight"])


def test_read_backbone_on_mesh(sharded_base):
  path, model = sharded_base
  mesh = sharding.make_mesh()
  got = backbone.read_backbone(path, mesh=mesh)
  want = _state_dict(model)
  for key, value in got.items():
    assert value.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)


def _reference_logits(base_dir, result, ids):
  """PyTorch base model with every merged delta added to its state dict."""
  model = peft_factory.load_base_model(base_dir)
  state = model.state_dict()
  for module, delta in result.deltas():
    state[f"{module}.weight"] = state[f"{module}.weight"] + torch.from_numpy(
        np.array(delta, np.float32))
  model.load_state_dict(state)
  with torch.no_grad():
    return model(ids).logits.numpy()


@pytest.mark.parametrize("method", ["knots_ties", "ties"])   # factored / dense update
def test_merged_model_weights(method, llama_family, sharded_base, merged):
  path, model = sharded_base
  if method != "knots_ties":
    merged = knots_jax.merge(knots_jax.load_adapters(llama_family[1]), method, top_k=30)
  assert merged.is_factored == (method == "knots_ties")
  want = _state_dict(model)
  deltas = dict(merged.deltas())
  got = dict(backbone.merged_model_weights(merged, path))
  assert set(got) == set(want)
  for key, value in got.items():
    module = key.removesuffix(".weight")
    ref = want[key] + deltas[module] if module in deltas else want[key]
    np.testing.assert_allclose(np.asarray(value), ref, rtol=1e-6, atol=1e-6, err_msg=key)
  on_mesh = dict(backbone.merged_model_weights(merged, path, mesh=sharding.make_mesh()))
  for key, value in on_mesh.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(got[key]), err_msg=key)


def test_save_merged_model_loads_in_transformers(sharded_base, merged, tmp_path):
  path, _ = sharded_base
  out = str(tmp_path / "merged_model")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  report = backbone.save_merged_model(merged, path, out, max_shard_size="16KB")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(f"save_merged_model: {report['shards']} shards, {report['total_size']} bytes; "
        f"ru_maxrss {before} -> {peak} KiB")
  assert report["shards"] >= 2 and report["merged"] == len(merged.module_names)
  assert os.path.isfile(os.path.join(out, checkpoint.INDEX))
  assert os.path.isfile(os.path.join(out, "config.json"))
  with open(os.path.join(out, checkpoint.INDEX)) as f:
    assert set(json.load(f)["weight_map"]) == set(checkpoint.tensor_files(path))

  ids = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 80]])
  loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    got = loaded(ids).logits.numpy()
  want = _reference_logits(path, merged, ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with torch.no_grad():   # the merge does change the model
    base_logits = peft_factory.load_base_model(path)(ids).logits.numpy()
  assert np.abs(got - base_logits).max() > 1e-2

  with pytest.raises(ValueError, match="already exists"):
    backbone.save_merged_model(merged, path, out)
  backbone.save_merged_model(merged, path, out, max_shard_size="1GB", overwrite=True)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  assert not os.path.exists(os.path.join(out, checkpoint.INDEX))


def test_save_merged_model_bf16(bf16_base, merged, tmp_path):
  path, model = bf16_base
  out = str(tmp_path / "merged_bf16")
  backbone.save_merged_model(merged, path, out, max_shard_size="8KB")
  got = backbone.read_backbone(out)
  deltas = dict(merged.deltas())
  for key, ref in model.state_dict().items():
    assert str(got[key].dtype) == "bfloat16"
    module = key.removesuffix(".weight")
    if module in deltas:
      ref = (ref.float() + torch.from_numpy(np.asarray(deltas[module], np.float32))
             ).to(torch.bfloat16)
    np.testing.assert_array_equal(np.asarray(got[key], np.float32), ref.float().numpy(),
                                  err_msg=key)


def test_failed_write_leaves_no_output(sharded_base, merged, tmp_path, monkeypatch):
  path, _ = sharded_base
  out = tmp_path / "failed"
  calls = []

  def boom(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 2:
      raise OSError("disk full")
    return real(tensors, filename, metadata=metadata)

  real = backbone.safetensors.numpy.save_file
  monkeypatch.setattr(backbone.safetensors.numpy, "save_file", boom)
  with pytest.raises(OSError, match="disk full"):
    backbone.save_merged_model(merged, path, str(out), max_shard_size="16KB")
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith("failed")]


def test_parse_size_and_plan():
  assert backbone.parse_size("2GB") == 2 * 10**9
  assert backbone.parse_size("1GiB") == 2**30
  assert backbone.parse_size(123) == 123
  with pytest.raises(ValueError):
    backbone.parse_size("big")
  header = {"a": (None, (10,), np.float32), "b": (None, (100,), np.float32),
            "c": (None, (5,), np.float32)}
  assert backbone.plan_shards(header, 60) == [["a"], ["b"], ["c"]]
  assert backbone.plan_shards(header, 10**6) == [["a", "b", "c"]]


_WORKER = textwrap.dedent("""
  import os, sys, json
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  import knots_jax
  from knots_jax import backbone, sharding
  base, adapters, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  result = knots_jax.merge(knots_jax.load_adapters(adapters), "knots_ties", top_k=30, mesh=mesh)
  arrays, specs = {{}}, {{}}
  for key, value in backbone.read_backbone(base, mesh=mesh).items():
    arrays["read/" + key] = np.asarray(value)
    specs[key] = str(value.sharding.spec)
  for key, value in backbone.merged_model_weights(result, base, mesh=mesh):
    arrays["merged/" + key] = np.asarray(value)
  backbone.save_merged_model(result, base, out + "_model", max_shard_size="16KB", mesh=mesh)
  # 3 devices: most row counts (32, 16, 48) do not divide 3 -> replicated
  mesh3 = sharding.make_mesh(jax.devices()[:3])
  for key, value in backbone.read_backbone(base, mesh=mesh3).items():
    arrays["read3/" + key] = np.asarray(value)
    specs["3/" + key] = str(value.sharding.spec)
  for key, value in backbone.merged_model_weights(result, base, mesh=mesh3):
    arrays["merged3/" + key] = np.asarray(value)
  # every callback of an 8-way sharded read asks for its own rows only
  reads = []
  real = backbone._read_slice
  def spy(path, key, index, dtype):
    block = real(path, key, index, dtype)
    reads.append([key, list(block.shape)])
    return block
  backbone._read_slice = spy
  read = backbone.read_backbone(base, mesh=mesh)
  specs["reads"] = reads
  np.savez(out + ".npz", **arrays)
  json.dump(specs, open(out + ".json", "w"))
""")


def test_eight_devices_subprocess(llama_family, sharded_base, merged, tmp_path):
  path, model = sharded_base
  _, adapter_dirs = llama_family
  out = str(tmp_path / "worker")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-c", _WORKER.format(root=ROOT), path, json.dumps(adapter_dirs), out],
      env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = np.load(out + ".npz")
  with open(out + ".json") as f:
    specs = json.load(f)
  want = _state_dict(model)
  single = {k: np.asarray(v) for k, v in backbone.merged_model_weights(merged, path)}
  for key in want:
    np.testing.assert_array_equal(got["read/" + key], want[key], err_msg=key)
    np.testing.assert_allclose(got["merged/" + key], single[key], rtol=0, atol=1e-6, err_msg=key)
    rows_divide = want[key].shape[0] % 8 == 0
    assert ("stack" in specs[key]) == rows_divide, (key, specs[key])
    np.testing.assert_array_equal(got["read3/" + key], want[key], err_msg=key)
    np.testing.assert_allclose(got["merged3/" + key], single[key], rtol=0, atol=1e-6, err_msg=key)
    assert ("stack" in specs["3/" + key]) == (want[key].shape[0] % 3 == 0), key
  assert any("stack" in specs[k] for k in want)
  assert any("stack" not in specs["3/" + k] for k in want)
  for key, shape in specs["reads"]:
    rows = want[key].shape[0]
    assert shape[0] == rows // 8, (key, shape)   # all rows here divide 8
  assert len(specs["reads"]) == 8 * len(want)
  on_disk = backbone.read_backbone(out + "_model")
  for key in want:
    np.testing.assert_array_equal(np.asarray(on_disk[key]), got["merged/" + key], err_msg=key)
