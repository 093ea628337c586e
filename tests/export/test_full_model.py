"""knots_jax.export.full_model: whole HF backbones in JAX, and the full merged model on disk."""

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

import knots_jax
from knots_jax.export import full_model
from knots_jax.export import orbax_model as orbax_model_lib
from knots_jax.io import hf_checkpoint, safetensors_slots
from knots_jax.io import sharded_read
from knots_jax.parallel import sharding as sharding_lib
from tests import peft_factory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  assert os.path.isfile(os.path.join(path, hf_checkpoint.INDEX))
  assert len(set(hf_checkpoint.tensor_files(path).values())) >= 2


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_read_backbone_equals_torch_state_dict(which, sharded_base, bf16_base):
  path, model = sharded_base if which == "fp32" else bf16_base
  got = sharded_read.read_backbone(path)
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
  got = sharded_read.read_backbone(path, keys=[key], dtype=np.float32)
  assert list(got) == [key] and got[key].dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got[key]), model.state_dict()[key].float().numpy())
  with pytest.raises(KeyError, match="no tensor"):
    sharded_read.read_backbone(path, keys=["nope.weight"])


def test_read_backbone_on_mesh(sharded_base):
  path, model = sharded_base
  mesh = sharding_lib.make_mesh()
  got = sharded_read.read_backbone(path, mesh=mesh)
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
  got = dict(full_model.merged_model_weights(merged, path))
  assert set(got) == set(want)
  for key, value in got.items():
    module = key.removesuffix(".weight")
    ref = want[key] + deltas[module] if module in deltas else want[key]
    np.testing.assert_allclose(np.asarray(value), ref, rtol=1e-6,
                               atol=1e-6 * np.abs(ref).max(), err_msg=key)
  on_mesh = dict(full_model.merged_model_weights(merged, path, mesh=sharding_lib.make_mesh()))
  for key, value in on_mesh.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(got[key]), err_msg=key)


def test_save_merged_model_loads_in_transformers(sharded_base, merged, tmp_path):
  path, _ = sharded_base
  out = str(tmp_path / "merged_model")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  report = full_model.save_merged_model(merged, path, out, max_shard_size="16KB")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(f"save_merged_model: {report['shards']} shards, {report['total_size']} bytes; "
        f"ru_maxrss {before} -> {peak} KiB")
  assert report["shards"] >= 2 and report["merged"] == len(merged.module_names)
  assert os.path.isfile(os.path.join(out, hf_checkpoint.INDEX))
  assert os.path.isfile(os.path.join(out, "config.json"))
  with open(os.path.join(out, hf_checkpoint.INDEX)) as f:
    assert set(json.load(f)["weight_map"]) == set(hf_checkpoint.tensor_files(path))

  ids = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 80]])
  loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    got = loaded(ids).logits.numpy()
  want = _reference_logits(path, merged, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  with torch.no_grad():   # the merge does change the model
    base_logits = peft_factory.load_base_model(path)(ids).logits.numpy()
  assert np.abs(got - base_logits).max() > 1e-2

  with pytest.raises(ValueError, match="already exists"):
    full_model.save_merged_model(merged, path, out)
  full_model.save_merged_model(merged, path, out, max_shard_size="1GB", overwrite=True)
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  assert not os.path.exists(os.path.join(out, hf_checkpoint.INDEX))


def test_save_merged_model_bf16(bf16_base, merged, tmp_path):
  path, model = bf16_base
  out = str(tmp_path / "merged_bf16")
  full_model.save_merged_model(merged, path, out, max_shard_size="8KB")
  got = sharded_read.read_backbone(out)
  deltas = dict(merged.deltas())
  for key, ref in model.state_dict().items():
    assert str(got[key].dtype) == "bfloat16"
    module = key.removesuffix(".weight")
    if module in deltas:
      ref = (ref.float() + torch.from_numpy(np.array(deltas[module], np.float32))
             ).to(torch.bfloat16)
    np.testing.assert_array_equal(np.asarray(got[key], np.float32), ref.float().numpy(),
                                  err_msg=key)


@pytest.mark.parametrize("where", ["merged tensor", "copied tensor"])
def test_failed_write_leaves_no_output(where, sharded_base, merged, tmp_path, monkeypatch):
  """A failure while writing a merged tensor (main thread) or copying a base one (the
  background thread) leaves no output directory and no temporary files."""
  path, _ = sharded_base
  out = tmp_path / "failed"
  calls = []
  name = "write" if where == "merged tensor" else "copy_from"
  real = getattr(safetensors_slots.ShardWriter, name)

  def boom(self, key, *args, **kwargs):
    calls.append(key)
    if len(calls) == 3:
      raise OSError("disk full")
    return real(self, key, *args, **kwargs)

  monkeypatch.setattr(safetensors_slots.ShardWriter, name, boom)
  with pytest.raises(OSError, match="disk full"):
    full_model.save_merged_model(merged, path, str(out), max_shard_size="16KB")
  assert len(calls) >= 3
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith("failed")]


def test_merged_head_the_base_lacks_is_refused(sharded_base, merged, tmp_path):
  """A merged modules_to_save tensor with no place in the base (a `score` head on a
  causal-LM checkpoint) is not dropped silently from a full model."""
  path, _ = sharded_base
  with_head = dataclasses.replace(merged, extra={"score.weight": np.ones((3, 64), np.float32)})
  for save in (full_model.save_merged_model, orbax_model_lib.save_merged_model_orbax):
    out = tmp_path / f"with_head_{save.__name__}"
    with pytest.raises(ValueError, match="no tensor 'score.weight'.*modules_to_save"):
      save(with_head, path, str(out))
    assert not out.exists()
  # the generator of the base's tensors leaves it to the caller (chain result.extra)
  keys = [k for k, _ in full_model.merged_model_weights(with_head, path)]
  assert "score.weight" not in keys and len(keys) == len(hf_checkpoint.tensor_files(path))


def test_merged_model_writer_overlaps_the_merge(llama_family, sharded_base, tmp_path):
  """Copying starts before the merge exists (or in finish); a wrong `changed` hint still
  gives the right model (unannounced tensors are written over their copies, announced but unchanged ones
  copied); leaving the block without finish() writes nothing."""
  path, _ = sharded_base
  adapters = knots_jax.load_adapters(llama_family[1])
  hint = full_model.changed_keys(adapters)
  assert hint == {f"{m}.weight" for m in adapters.module_names}
  want = {}
  wrong = sorted(hint)[::2] + ["model.norm.weight"]
  for kind, changed, overlap in [("exact", hint, True), ("wrong", wrong, True),
                                 ("after", hint, False), ("after_wrong", wrong, None)]:
    out = str(tmp_path / f"overlap_{kind}")
    with full_model.MergedModelWriter(path, out, changed=changed, overlap=overlap,
                                    max_shard_size="16KB") as w:
      result = knots_jax.merge(adapters, "knots_ties", top_k=30)
      assert not os.path.exists(out)   # only once complete
      report = w.finish(result)
    assert report["merged"] == len(adapters.module_names)
    want = want or dict(full_model.merged_model_weights(result, path))
    got = sharded_read.read_backbone(out)
    assert set(got) == set(want)
    for key, value in got.items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(want[key]), err_msg=key)

  out = tmp_path / "unfinished"
  with pytest.raises(RuntimeError, match="without finish"):
    with full_model.MergedModelWriter(path, str(out), changed=hint, max_shard_size="16KB"):
      pass
  with pytest.raises(KeyError, match="interrupted"):
    with full_model.MergedModelWriter(path, str(out), changed=hint, max_shard_size="16KB"):
      raise KeyError("interrupted")
  assert not [p for p in os.listdir(tmp_path) if p.startswith("unfinished")]


def test_shard_writer_matches_safetensors(tmp_path):
  """Tensors written in any order (arrays or bytes copied from another file) read back
  with safetensors, bf16 included; unknown keys, wrong shapes and gaps are refused."""
  rng = np.random.default_rng(0)
  tensors = {"b.weight": rng.standard_normal((3, 5)).astype(np.float32),
             "a.bias": rng.standard_normal(7).astype(safetensors_slots.numpy_dtype("BF16")),
             "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
             "d.scalar": np.array(2.5, np.float16)}
  entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  path = str(tmp_path / "x.safetensors")
  with safetensors_slots.ShardWriter(path, entries, {"format": "pt"}) as writer:
    for k in reversed(list(tensors)):
      writer.write(k, tensors[k])
  with safetensors.safe_open(path, framework="numpy") as f:
    assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
    for k, v in tensors.items():
      got = f.get_tensor(k)
      assert got.dtype == v.dtype and got.shape == v.shape
      np.testing.assert_array_equal(got, v)
  with open(path, "rb") as f:   # the size of safetensors' own file (its header order differs)
    ours = f.read()
  safetensors.numpy.save_file(tensors, str(tmp_path / "ref.safetensors"), {"format": "pt"})
  with open(tmp_path / "ref.safetensors", "rb") as f:
    assert len(ours) == len(f.read())
  with pytest.raises(ValueError, match="not in this shard"):
    with safetensors_slots.ShardWriter(path, entries) as writer:
      writer.write("e.missing", tensors["a.bias"])
  with pytest.raises(ValueError, match=r"is \(7,\) bfloat16 in the header"):
    with safetensors_slots.ShardWriter(path, entries) as writer:
      writer.write("a.bias", tensors["b.weight"])
  with pytest.raises(ValueError, match="were not written"):
    with safetensors_slots.ShardWriter(path, entries) as writer:
      writer.write("b.weight", tensors["b.weight"])
  # copy_from: the stored bytes of another file, located by its header, in small chunks
  src = str(tmp_path / "src.safetensors")
  safetensors.numpy.save_file(tensors, src)
  offsets = safetensors_slots.data_offsets(src)
  copy = str(tmp_path / "copy.safetensors")
  with safetensors_slots.ShardWriter(copy, entries) as writer:
    for k in ["c.ids", "a.bias", "d.scalar", "b.weight"]:
      writer.copy_from(k, src, *offsets[k], chunk=7)
  with safetensors.safe_open(copy, framework="numpy") as f:
    for k, v in tensors.items():
      np.testing.assert_array_equal(f.get_tensor(k), v)
  with pytest.raises(ValueError, match="has 60 bytes"):
    with safetensors_slots.ShardWriter(copy, entries) as writer:
      writer.copy_from("b.weight", src, *offsets["a.bias"])
  with pytest.raises(ValueError, match="file ends"):
    with safetensors_slots.ShardWriter(copy, entries) as writer:
      end = os.path.getsize(src)
      writer.copy_from("b.weight", src, end - 20, end + 40)


def test_copy_bytes_without_copy_file_range(tmp_path, monkeypatch):
  """The read + pwrite fallback (other OS, or a refused copy_file_range) copies the same bytes."""
  src = tmp_path / "src.bin"
  data = np.random.default_rng(1).bytes(1000)
  src.write_bytes(data)

  def refuse(*args):
    raise OSError(safetensors_slots.errno.EXDEV, "cross-device")

  for patch in ("missing", "refused"):
    with monkeypatch.context() as m:
      if patch == "missing":
        m.delattr(safetensors_slots.os, "copy_file_range", raising=False)
      else:
        m.setattr(safetensors_slots.os, "copy_file_range", refuse)
      dst = tmp_path / f"dst_{patch}.bin"
      fd = os.open(dst, os.O_WRONLY | os.O_CREAT)
      try:
        safetensors_slots.copy_bytes(str(src), 100, 700, fd, 50, chunk=64)
      finally:
        os.close(fd)
      assert dst.read_bytes() == b"\0" * 50 + data[100:800]


def test_parse_size_and_plan():
  assert full_model.parse_size("2GB") == 2 * 10**9
  assert full_model.parse_size("1GiB") == 2**30
  assert full_model.parse_size(123) == 123
  with pytest.raises(ValueError):
    full_model.parse_size("big")
  header = {"a": (None, (10,), np.float32), "b": (None, (100,), np.float32),
            "c": (None, (5,), np.float32)}
  assert full_model.plan_shards(header, 60) == [["a"], ["b"], ["c"]]
  assert full_model.plan_shards(header, 10**6) == [["a", "b", "c"]]


# ------------------------------------------------------------------- Orbax


def _logits_of(weights, config_dir, ids):
  """LlamaForCausalLM (config.json of `config_dir`) with `weights` {HF name: array} loaded."""
  config = transformers.AutoConfig.from_pretrained(config_dir)
  model = transformers.LlamaForCausalLM(config).eval()
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()},
                        strict=True)
  with torch.no_grad():
    return model(ids).logits.numpy()


IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 2, 80]])


def test_orbax_model_round_trip(sharded_base, merged, tmp_path):
  path, _ = sharded_base
  out = str(tmp_path / "orbax_model")
  report = orbax_model_lib.save_merged_model_orbax(merged, path, out, step=3)
  assert report["merged"] == len(merged.module_names) and report["step"] == 3
  assert {"config.json", "knots_config.json", "3"} <= set(os.listdir(out))
  with open(os.path.join(out, "knots_config.json")) as f:
    assert json.load(f)["merged_model"]["format"] == "orbax"
  assert orbax_model_lib.checkpoint_steps(out) == [3]
  want = _reference_logits(path, merged, IDS)
  single = {k: np.asarray(v) for k, v in full_model.merged_model_weights(merged, path)}
  for mesh in (None, sharding_lib.make_mesh()):
    restored = orbax_model_lib.restore_merged_model(out, mesh=mesh)
    assert set(restored) == set(single)
    for key, value in restored.items():
      np.testing.assert_array_equal(np.asarray(value), single[key], err_msg=key)
      if mesh is not None:
        assert value.sharding == sharding_lib.weight_sharding(mesh, value.shape)
    np.testing.assert_allclose(_logits_of(restored, out, IDS), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
  # a dtype cast on restore; the HF orbax layout is readable with plain Orbax as well
  cast = orbax_model_lib.restore_merged_model(out, step=3, dtype="bfloat16")
  assert all(str(v.dtype) == "bfloat16" for v in cast.values())
  with pytest.raises(ValueError, match="already exists"):
    orbax_model_lib.save_merged_model_orbax(merged, path, out)
  orbax_model_lib.save_merged_model_orbax(merged, path, out, overwrite=True, async_write=False)
  assert orbax_model_lib.checkpoint_steps(out) == [0]


def test_orbax_model_bf16_and_errors(bf16_base, merged, tmp_path, monkeypatch):
  path, _ = bf16_base
  out = str(tmp_path / "orbax_bf16")
  orbax_model_lib.save_merged_model_orbax(merged, path, out)
  full_model.save_merged_model(merged, path, str(tmp_path / "st_bf16"))
  as_safetensors = sharded_read.read_backbone(str(tmp_path / "st_bf16"))
  for key, value in orbax_model_lib.restore_merged_model(out).items():
    assert str(value.dtype) == "bfloat16", key     # stored dtype kept, bit for bit
    np.testing.assert_array_equal(np.asarray(value, np.float32),
                                  np.asarray(as_safetensors[key], np.float32), err_msg=key)
  with pytest.raises(ValueError, match="no step 7"):
    orbax_model_lib.restore_merged_model(out, step=7)
  with pytest.raises(orbax_model_lib.NotAMergedModelCheckpoint, match="no Orbax checkpoint"):
    orbax_model_lib.restore_merged_model(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    orbax_model_lib.restore_merged_model(str(tmp_path / "nowhere"))

  def boom(*args):
    raise OSError("disk full")

  monkeypatch.setattr(full_model, "copy_model_files", boom)
  with pytest.raises(OSError, match="disk full"):
    orbax_model_lib.save_merged_model_orbax(merged, path, str(tmp_path / "failed"))
  assert not [p for p in os.listdir(tmp_path) if p.startswith("failed")]


_WORKER = textwrap.dedent("""
  import os, sys, json
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, {root!r})
  import jax, numpy as np
  import knots_jax
  from knots_jax.export import full_model
  from knots_jax.io import hf_checkpoint
  from knots_jax.io import sharded_read
  from knots_jax.parallel import sharding
  base, adapters, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  result = knots_jax.merge(knots_jax.load_adapters(adapters), "knots_ties", top_k=30, mesh=mesh)
  arrays, specs = {{}}, {{}}
  for key, value in sharded_read.read_backbone(base, mesh=mesh).items():
    arrays["read/" + key] = np.asarray(value)
    specs[key] = str(value.sharding.spec)
  for key, value in full_model.merged_model_weights(result, base, mesh=mesh):
    arrays["merged/" + key] = np.asarray(value)
  full_model.save_merged_model(result, base, out + "_model", max_shard_size="16KB", mesh=mesh)
  # the full model through Orbax on the 8-device mesh, restored onto it
  from knots_jax.export import orbax_model
  orbax_model.save_merged_model_orbax(result, base, out + "_orbax", mesh=mesh)
  for key, value in orbax_model.restore_merged_model(out + "_orbax", mesh=mesh).items():
    arrays["orbax/" + key] = np.asarray(value)
    specs["orbax/" + key] = str(value.sharding.spec)
  # every disk read of a sharded read, with the shape of the block it returned
  reads = []
  real = sharded_read._read_slice
  def spy(path, key, index, dtype):
    block = real(path, key, index, dtype)
    reads.append([key, list(block.shape)])
    return block
  sharded_read._read_slice = spy
  read = sharded_read.read_backbone(base, mesh=mesh)
  specs["reads"], reads[:] = list(reads), []
  # 3 devices: most row counts (32, 16, 48) do not divide 3 -> replicated
  mesh3 = sharding.make_mesh(jax.devices()[:3])
  for key, value in sharded_read.read_backbone(base, mesh=mesh3).items():
    arrays["read3/" + key] = np.asarray(value)
    specs["3/" + key] = str(value.sharding.spec)
  specs["reads3"], reads[:] = list(reads), []
  for key, value in full_model.merged_model_weights(result, base, mesh=mesh3):
    arrays["merged3/" + key] = np.asarray(value)
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
  single = {k: np.asarray(v) for k, v in full_model.merged_model_weights(merged, path)}
  for key in want:
    np.testing.assert_array_equal(got["read/" + key], want[key], err_msg=key)
    np.testing.assert_allclose(got["merged/" + key], single[key], rtol=0,
                               atol=1e-6 * np.abs(single[key]).max(), err_msg=key)
    rows_divide = want[key].shape[0] % 8 == 0
    assert ("stack" in specs[key]) == rows_divide, (key, specs[key])
    np.testing.assert_array_equal(got["read3/" + key], want[key], err_msg=key)
    np.testing.assert_allclose(got["merged3/" + key], single[key], rtol=0,
                               atol=1e-6 * np.abs(single[key]).max(), err_msg=key)
    assert ("stack" in specs["3/" + key]) == (want[key].shape[0] % 3 == 0), key
  assert any("stack" in specs[k] for k in want)
  assert any("stack" not in specs["3/" + k] for k in want)
  for key, shape in specs["reads"]:
    rows = want[key].shape[0]
    assert shape[0] == rows // 8, (key, shape)   # all rows here divide 8
  assert len(specs["reads"]) == 8 * len(want)
  # 3 devices: a sharded tensor is read as 3 row blocks, a replicated one once (not 3 times)
  for key in want:
    blocks = [shape for k, shape in specs["reads3"] if k == key]
    rows = want[key].shape[0]
    assert blocks == ([[rows // 3, *want[key].shape[1:]]] * 3 if rows % 3 == 0
                      else [list(want[key].shape)]), (key, blocks)
  on_disk = sharded_read.read_backbone(out + "_model")
  for key in want:
    np.testing.assert_array_equal(np.asarray(on_disk[key]), got["merged/" + key], err_msg=key)
  # Orbax written and restored on 8 devices: the same arrays, sharded like read_backbone
  for key in want:
    np.testing.assert_array_equal(got["orbax/" + key], got["merged/" + key], err_msg=key)
    assert ("stack" in specs["orbax/" + key]) == (want[key].shape[0] % 8 == 0), key
  # ... and restored here on one device, into transformers: logits of PyTorch base + merge
  restored = orbax_model_lib.restore_merged_model(out + "_orbax")
  want_logits = _reference_logits(path, merged, IDS)
  np.testing.assert_allclose(_logits_of(restored, out + "_orbax", IDS), want_logits, rtol=1e-5,
                             atol=1e-5 * np.abs(want_logits).max())


def test_the_write_progress_counts_bytes(bf16_base, merged, tmp_path, capsys):
  """The full-model bar counts bytes, not tensors (whose sizes differ by orders of
  magnitude, which made its rate and ETA meaningless), and ends at the model's size."""
  path, _ = bf16_base
  full_model.save_merged_model(merged, path, str(tmp_path / "m"), progress=True)
  err = capsys.readouterr().err
  total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
              if f.endswith(".safetensors"))
  assert re.search(r"write model: 100%.*[kM]?B/s", err), err[-300:]
  shown = re.findall(r"\| ([\d.]+)([kM]?)/([\d.]+)([kM]?) \[", err)[-1]
  scale = {"": 1, "k": 1024, "M": 1024**2}
  assert abs(float(shown[2]) * scale[shown[3]] - total) < 0.05 * total
