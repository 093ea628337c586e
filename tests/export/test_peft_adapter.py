"""Export of merge results, checked against PEFT, torch and float64 NumPy.

Merge results are built by hand from real PEFT adapters (exact task arithmetic:
`b = [s_1 B_1, ..., s_n B_n]`, `a = [A_1; ...; A_n]`), so these tests depend on
neither the adapter loader nor the merge code.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from knots_jax.export import merged_weights, peft_adapter
from knots_jax.io import output_dir
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax.merging import kernels
from tests import peft_factory

PREFIX = "base_model.model."


# ------------------------------------------------------------------ helpers


def read_lora(adapter_dir: str) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
  """(config, {module: (A [r, in], B [out, r], PEFT scale)}) straight from the files."""
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  tensors = safetensors.numpy.load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  scale = config["lora_alpha"] / config["r"]
  modules = {}
  for key in tensors:
    if key.endswith(".lora_A.weight"):
      module = key[len(PREFIX):-len(".lora_A.weight")]
      b = tensors[key.replace("lora_A", "lora_B")]
      modules[module] = (tensors[key], b, scale)
  return config, modules


def ta_result(adapter_dirs, use=lambda module: None, extra=None, config_overrides=None,
              dtype=np.float32) -> MergeResult:
  """Exact task arithmetic of the adapters as a factored MergeResult.

  Modules are stacked by (out, in); `use(module)` may name the adapter indices a
  module merges (default all), which gives stacks of different ranks.
  """
  loras = [read_lora(d) for d in adapter_dirs]
  groups: dict[tuple, list[str]] = {}
  for module in sorted(loras[0][1]):
    a, b, _ = loras[0][1][module]
    idx = tuple(use(module) or range(len(loras)))
    groups.setdefault((b.shape[0], a.shape[1], idx), []).append(module)
  stacks = []
  for (_, _, idx), modules in groups.items():
    bs = [np.concatenate([loras[i][1][m][2] * loras[i][1][m][1] for i in idx], 1) for m in modules]
    as_ = [np.concatenate([loras[i][1][m][0] for i in idx], 0) for m in modules]
    stacks.append(MergedStack(tuple(modules), b=jnp.asarray(np.stack(bs), dtype),
                              a=jnp.asarray(np.stack(as_), dtype)))
  config = dict(loras[0][0], **(config_overrides or {}))
  return MergeResult(stacks=tuple(stacks), peft_config=config, method="ta",
                     settings={"scaling": 1.0}, extra=extra or {}, stats={"modules": 8})


def numpy_delta(adapter_dirs, module, idx=None) -> np.ndarray:
  """sum_i s_i B_i A_i in float64, from the files."""
  loras = [read_lora(d)[1] for d in adapter_dirs]
  idx = range(len(loras)) if idx is None else idx
  return sum(loras[i][module][2] * loras[i][module][1].astype(np.float64)
             @ loras[i][module][0].astype(np.float64) for i in idx)


def best_rank_r(m: np.ndarray, r: int) -> tuple[np.ndarray, float]:
  """NumPy's best rank-r approximation of m and its relative Frobenius error."""
  u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
  approx = (u[:, :r] * s[:r]) @ vt[:r]
  norm = np.linalg.norm(m)
  return approx, (np.linalg.norm(m - approx) / norm if norm > 0 else 0.0)


def peft_deltas(model) -> dict[str, torch.Tensor]:
  out = {}
  for name, module in model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
      out[name.removeprefix(PREFIX)] = module.get_delta_weight("default").detach()
  return out


def kv_two_adapters(module: str):
  """k and v merge only the first two adapters: their stack has rank 12, q and o 18."""
  return (0, 1) if module.endswith(("k_proj", "v_proj")) else None


def dense_result(result: MergeResult) -> MergeResult:
  stacks = tuple(MergedStack(s.modules, delta=jnp.matmul(s.b, s.a)) for s in result.stacks)
  return MergeResult(stacks=stacks, peft_config=result.peft_config, method="ties",
                     settings={}, extra=result.extra)


def leftovers(tmp_path, name: str) -> list[str]:
  return sorted(glob.glob(str(tmp_path / f"{name}*")))


def scaled_atol(reference, rel: float) -> float:
  """`rel` times the largest magnitude of `reference`: float32 values (logits, weights)
  are only as exact as their scale, so absolute tolerances follow it."""
  return rel * float(np.abs(np.asarray(reference, np.float64)).max())


def only_modules(result: MergeResult, keep) -> MergeResult:
  """`result` restricted to the modules for which keep(module) holds."""
  stacks = []
  for s in result.stacks:
    idx = [i for i, m in enumerate(s.modules) if keep(m)]
    if idx:
      stacks.append(MergedStack(tuple(s.modules[i] for i in idx), b=s.b[np.array(idx)],
                                a=s.a[np.array(idx)]))
  return MergeResult(stacks=tuple(stacks), peft_config=result.peft_config, method=result.method,
                     settings=result.settings, extra=result.extra)


def reference_logits(base: str, result: MergeResult, ids: torch.Tensor) -> np.ndarray:
  """Logits of the base model with every merged update added to its weight, in torch."""
  ref = peft_factory.load_base_model(base)
  state = ref.state_dict()
  for m in result.module_names:
    state[f"{m}.weight"] = state[f"{m}.weight"] + torch.from_numpy(result.delta(m))
  ref.load_state_dict(state)
  with torch.no_grad():
    return ref(ids).logits.numpy()


# ------------------------------------------------------------- PEFT adapter


def test_exact_adapter_loads_in_peft_and_matches_dense_logits(llama_family, tmp_path):
  base, adapters = llama_family
  rng = np.random.default_rng(0)
  head = rng.normal(size=(96, 32)).astype(np.float32)
  result = ta_result(adapters, use=kv_two_adapters, extra={"lm_head.weight": head},
                     config_overrides={"modules_to_save": ["lm_head"]})
  assert {int(s.b.shape[-1]) for s in result.stacks} == {12, 18}
  # The hand-built result is the task arithmetic of the files.
  for m in result.module_names:
    want = numpy_delta(adapters, m, kv_two_adapters(m))
    np.testing.assert_allclose(result.delta(m), want, rtol=1e-5, atol=scaled_atol(want, 1e-6))

  out = tmp_path / "adapter"
  report = peft_adapter.save_peft_adapter(result, str(out))
  assert report["rank"] == 18 and not report["truncated"] and report["max_rel_error"] == 0.0
  assert sorted(report["rel_errors"]) == result.module_names
  config = json.loads((out / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"]) == (18, 18)
  assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
  assert not config["use_rslora"] and not config["use_dora"]
  assert config["modules_to_save"] == ["lm_head"]
  # All layers of the modules the inputs name by bare names: the names say it exactly.
  assert config["target_modules"] == sorted(peft_factory.LLAMA_TARGETS)
  assert config["layers_to_transform"] is None
  keys = set(safetensors.numpy.load_file(str(out / "adapter_model.safetensors")))
  assert f"{PREFIX}lm_head.weight" in keys
  knots = json.loads((out / "knots_config.json").read_text())
  assert knots["method"] == "ta" and knots["export"]["rank"] == 18

  model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base), str(out)).eval()
  deltas = peft_deltas(model)
  assert sorted(deltas) == result.module_names
  for m, d in deltas.items():
    np.testing.assert_allclose(d.numpy(), result.delta(m), rtol=1e-5,
                               atol=scaled_atol(result.delta(m), 1e-6))
  np.testing.assert_array_equal(
      model.base_model.model.lm_head.modules_to_save["default"].weight.detach().numpy(), head)

  # Reference: the base model with the dense update added to its weights in torch.
  ref = peft_factory.load_base_model(base)
  base_logits_model = peft_factory.load_base_model(base)
  state = ref.state_dict()
  for m in result.module_names:
    state[f"{m}.weight"] = state[f"{m}.weight"] + torch.from_numpy(result.delta(m))
  state["lm_head.weight"] = torch.from_numpy(head)
  ref.load_state_dict(state)
  ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    got, want = model(ids).logits, ref(ids).logits
    untouched = base_logits_model(ids).logits
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5,
                             atol=scaled_atol(want.numpy(), 1e-5))
  assert (got - untouched).abs().max() > 1e-2   # the adapter does change the model


@pytest.fixture(scope="module")
def partial_adapters(llama_family, tmp_path_factory):
  """Pairs of PEFT adapters of the tiny Llama that adapt some layers or some module kinds."""
  base = llama_family[0]
  root = tmp_path_factory.mktemp("partial")
  make = peft_factory.make_lora_adapter
  return {
      "layer 1": [make(base, str(root / f"layer1_{i}"), seed=40 + i, r=4,
                       layers_to_transform=[1]) for i in range(2)],
      "q and v": [make(base, str(root / f"qv_{i}"), seed=50 + i, r=4, lora_alpha=8,
                       target_modules=["q_proj", "v_proj"]) for i in range(2)],
      "mlp of layer 0": [make(base, str(root / f"mlp0_{i}"), seed=60 + i, r=2 + i,
                              target_modules=["gate_proj", "down_proj"],
                              layers_to_transform=[0]) for i in range(2)],
  }


@pytest.mark.parametrize("case,written", [
    ("layer 1", "regex"),
    ("q and v", ["q_proj", "v_proj"]),
    ("mlp of layer 0", "regex"),
    ("layer 1 of a whole-model merge", "regex"),
    ("template naming other modules", "regex"),
])
def test_written_target_modules_are_exactly_the_written_modules(
    case, written, llama_family, partial_adapters, tmp_path):
  """PEFT, loading the written adapter, adapts exactly its modules; the logits are those
  of base + merged update computed in torch."""
  base, family = llama_family
  if case == "layer 1 of a whole-model merge":
    result = only_modules(ta_result(family), lambda m: ".layers.1." in m)
  elif case == "template naming other modules":
    result = ta_result(family, config_overrides={"target_modules": ["gate_proj", "up_proj"]})
  else:
    result = ta_result(partial_adapters[case])
  out = tmp_path / "adapter"
  peft_adapter.save_peft_adapter(result, str(out))
  config = json.loads((out / "adapter_config.json").read_text())
  targets = config["target_modules"]
  if written == "regex":
    assert isinstance(targets, str)
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None
  if written == "regex" and case != "template naming other modules":
    # Here the modules' last names alone would also hit modules the adapter does not have.
    names = {m.rsplit(".", 1)[-1] for m in result.module_names}
    all_modules = [n for n, _ in peft_factory.load_base_model(base).named_modules()]
    assert {n for n in all_modules if n.rsplit(".", 1)[-1] in names} - set(result.module_names)
  if written != "regex":
    assert targets == written

  model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base), str(out)).eval()
  deltas = peft_deltas(model)
  assert sorted(deltas) == result.module_names   # these modules and no others
  for m, d in deltas.items():
    np.testing.assert_allclose(d.numpy(), result.delta(m), rtol=1e-5,
                               atol=scaled_atol(result.delta(m), 1e-6), err_msg=m)
  ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    got = model(ids).logits.numpy()
    untouched = peft_factory.load_base_model(base)(ids).logits.numpy()
  want = reference_logits(base, result, ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=scaled_atol(want, 1e-5))
  assert np.abs(got - untouched).max() > 1e-3   # the adapter does change the model


def test_written_regex_matches_exactly_the_written_modules():
  """The regex target_modules, re.fullmatch-ed (PEFT's rule) against every candidate
  module path, selects exactly the chosen ones: nested paths, multi-digit indices and
  characters special in regexes included."""
  universe = sorted([f"model.layers.{i}.{kind}" for i in (0, 1, 2, 10, 11, 21)
                     for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")]
                    + ["lm_head", "model.layers.1", "a.b", "a.b.c", "a.b.c.d", "x+y.z", "xy.z"])
  rng = np.random.default_rng(0)
  for _ in range(30):
    chosen = sorted(rng.choice(universe, size=int(rng.integers(1, len(universe))),
                               replace=False).tolist())
    targets = peft_adapter.written_target_modules(chosen, {"target_modules": "all-linear"})
    assert isinstance(targets, str)
    assert [u for u in universe if re.fullmatch(targets, u)] == chosen, targets


def test_truncated_adapter_is_best_rank_r(llama_family, tmp_path):
  base, adapters = llama_family
  result = ta_result(adapters, use=kv_two_adapters, dtype=np.float64)
  for res, name in ((result, "factored"), (dense_result(result), "dense")):
    out = tmp_path / f"out_{name}"
    report = peft_adapter.save_peft_adapter(res, str(out), rank=5)
    assert report["rank"] == 5 and report["truncated"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (5, 5, None)
    model = peft.PeftModel.from_pretrained(peft_factory.load_base_model(base), str(out))
    deltas = peft_deltas(model)
    assert sorted(deltas) == result.module_names
    for m, d in deltas.items():
      approx, err = best_rank_r(result.delta(m), 5)
      np.testing.assert_allclose(d.numpy(), approx, rtol=1e-4, atol=scaled_atol(approx, 1e-5))
      np.testing.assert_allclose(report["rel_errors"][m], err, rtol=1e-6)
      assert 0.05 < err < 1
    assert report["max_rel_error"] == max(report["rel_errors"].values())


def test_dense_result_without_rank_is_refused(llama_family, tmp_path):
  _, adapters = llama_family
  dense = dense_result(ta_result(adapters))
  out = tmp_path / "adapter"
  with pytest.raises(ValueError, match=r"dense.*pass rank=.*save_merged_weights"):
    peft_adapter.save_peft_adapter(dense, str(out))
  assert leftovers(tmp_path, "adapter") == []


# -------------------------------------------------------------- truncation


@pytest.mark.parametrize("out,k,inp,rank", [(20, 6, 15, 3), (4, 6, 9, 2), (12, 5, 3, 2),
                                            (10, 6, 8, 1)])
def test_truncate_factors_matches_numpy_svd(out, k, inp, rank):
  rng = np.random.default_rng(out * 100 + k)
  b = rng.normal(size=(3, out, k))
  a = rng.normal(size=(3, k, inp))
  b[1] = 0                                           # a zero update: error 0, not NaN
  b_r, a_r, err = kernels.truncate_factors(jnp.asarray(b), jnp.asarray(a), rank)
  assert b_r.shape == (3, out, rank) and a_r.shape == (3, rank, inp)
  for i in range(3):
    approx, want = best_rank_r(b[i] @ a[i], rank)
    np.testing.assert_allclose(np.asarray(b_r[i] @ a_r[i]), approx, atol=1e-10)
    np.testing.assert_allclose(float(err[i]), want, rtol=1e-9, atol=1e-12)
  # B = U_r: orthonormal columns.
  np.testing.assert_allclose(np.asarray(b_r[0].T @ b_r[0]), np.eye(rank), atol=1e-10)


def test_truncate_factors_rank_at_least_k_is_exact():
  rng = np.random.default_rng(1)
  b, a = rng.normal(size=(2, 7, 4)), rng.normal(size=(2, 4, 5))
  for rank in (4, 6):
    b_r, a_r, err = kernels.truncate_factors(jnp.asarray(b), jnp.asarray(a), rank)
    assert b_r.shape == (2, 7, rank)
    np.testing.assert_array_equal(np.asarray(err), 0)
    np.testing.assert_allclose(np.asarray(b_r @ a_r), b @ a, rtol=1e-12)
  with pytest.raises(ValueError, match="rank"):
    kernels.truncate_factors(jnp.asarray(b), jnp.asarray(a), 0)


def test_truncate_dense_matches_numpy_svd():
  rng = np.random.default_rng(2)
  delta = rng.normal(size=(3, 9, 6))
  delta[2] = 0
  for rank in (2, 6, 8):
    b_r, a_r, err = kernels.truncate_dense(jnp.asarray(delta), rank)
    assert b_r.shape == (3, 9, rank) and a_r.shape == (3, rank, 6)
    for i in range(3):
      approx, want = best_rank_r(delta[i], rank)
      np.testing.assert_allclose(np.asarray(b_r[i] @ a_r[i]), approx, atol=1e-10)
      np.testing.assert_allclose(float(err[i]), want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------- merged weights


def expected_merged(result: MergeResult, base_dir: str) -> dict[str, np.ndarray]:
  """base + delta in float64 NumPy, from the whole base state dict."""
  model = peft_factory.load_base_model(base_dir)
  state = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
  return {f"{m}.weight": state[f"{m}.weight"] + result.delta(m).astype(np.float64)
          for m in result.module_names}


def test_merged_weights_single_and_sharded(llama_family, tmp_path):
  base, adapters = llama_family
  head = np.full((96, 32), 0.25, np.float32)
  result = ta_result(adapters, use=kv_two_adapters, extra={"lm_head.weight": head})
  want = expected_merged(result, base)

  sharded = tmp_path / "sharded"
  peft_factory.load_base_model(base).save_pretrained(str(sharded), max_shard_size="20KB")
  shards = glob.glob(str(sharded / "*.safetensors"))
  assert os.path.exists(sharded / "model.safetensors.index.json") and len(shards) >= 2
  index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
  assert len({index[k] for k in want}) >= 2          # the modules span several shards

  base_keys = set(safetensors.numpy.load_file(os.path.join(base, "model.safetensors")))
  for base_dir, name in ((base, "single"), (str(sharded), "sharded")):
    out = tmp_path / f"out_{name}"
    report = merged_weights.save_merged_weights(result, base_dir, str(out))
    written = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) | {"lm_head.weight"}
    assert set(written) <= base_keys
    assert report["tensors"] == len(written)
    for key, value in want.items():
      assert written[key].dtype == np.float32
      np.testing.assert_allclose(written[key], value, rtol=1e-6, atol=scaled_atol(value, 1e-6))
    np.testing.assert_array_equal(written["lm_head.weight"], head)
    assert json.loads((out / "knots_config.json").read_text())["method"] == "ta"


def test_merged_weights_bf16_base(llama_family, tmp_path):
  base, adapters = llama_family
  result = ta_result(adapters)
  bf16 = tmp_path / "bf16"
  model = peft_factory.load_base_model(base).to(torch.bfloat16)
  model.save_pretrained(str(bf16))
  state = model.state_dict()
  out = tmp_path / "out"
  merged_weights.save_merged_weights(result, str(bf16), str(out))
  written = safetensors.torch.load_file(str(out / "model.safetensors"))
  assert set(written) == {f"{m}.weight" for m in result.module_names}
  for m in result.module_names:
    key = f"{m}.weight"
    want = (state[key].float() + torch.from_numpy(result.delta(m))).to(torch.bfloat16)
    assert written[key].dtype == torch.bfloat16
    assert torch.equal(written[key], want), key


def test_merged_weights_shape_mismatch_and_missing_key(llama_family, tmp_path):
  base, adapters = llama_family
  result = ta_result(adapters)
  q = next(s for s in result.stacks if s.modules[0].endswith(("q_proj", "o_proj")))
  k = next(s for s in result.stacks if s.modules[0].endswith(("k_proj", "v_proj")))
  wrong = MergeResult(stacks=(MergedStack(("model.layers.0.self_attn.q_proj",),
                                          b=k.b[:1], a=k.a[:1]),),
                      peft_config=result.peft_config, method="ta", settings={})
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(32, 32\).*\(16, 32\)"):
    merged_weights.save_merged_weights(wrong, base, str(tmp_path / "out"))
  missing = MergeResult(stacks=(MergedStack(("model.layers.7.self_attn.q_proj",),
                                            b=q.b[:1], a=q.a[:1]),),
                        peft_config=result.peft_config, method="ta", settings={})
  with pytest.raises(ValueError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight"):
    merged_weights.save_merged_weights(missing, base, str(tmp_path / "out"))
  assert leftovers(tmp_path, "out") == []


def test_fan_in_fan_out_gpt2_matches_peft_merge(tmp_path):
  """GPT-2 Conv1D stores [in, out]: merged weights and the adapter must agree with PEFT."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
  base = str(tmp_path / "gpt2")
  transformers.GPT2LMHeadModel(config).save_pretrained(base)
  load = lambda: transformers.GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32).eval()
  peft_model = peft.get_peft_model(load(), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.2)
  adapter = str(tmp_path / "adapter_in")
  peft_model.save_pretrained(adapter)
  result = ta_result([adapter])
  assert result.fan_in_fan_out

  merged = peft_model.merge_and_unload().state_dict()
  out = tmp_path / "merged"
  merged_weights.save_merged_weights(result, base, str(out))
  written = safetensors.numpy.load_file(str(out / "model.safetensors"))
  assert sorted(written) == [f"{m}.weight" for m in result.module_names]
  for key, value in written.items():
    assert value.shape == (32, 96)
    np.testing.assert_allclose(value, merged[key].numpy(), rtol=1e-5,
                               atol=scaled_atol(merged[key].numpy(), 1e-6))

  peft_adapter.save_peft_adapter(result, str(tmp_path / "adapter_out"))
  model = peft.PeftModel.from_pretrained(load(), str(tmp_path / "adapter_out")).eval()
  ref = load()
  ref.load_state_dict({**ref.state_dict(), **{k: torch.from_numpy(v) for k, v in written.items()}})
  ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = ref(ids).logits.numpy()
    np.testing.assert_allclose(model(ids).logits.numpy(), want, rtol=1e-5,
                               atol=scaled_atol(want, 1e-5))


# ------------------------------------------------------------------- atomic


def test_failed_write_leaves_nothing(llama_family, tmp_path, monkeypatch):
  base, adapters = llama_family
  result = ta_result(adapters)

  def broken(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    peft_adapter.save_peft_adapter(result, str(tmp_path / "adapter"))
  with pytest.raises(RuntimeError, match="disk full"):
    merged_weights.save_merged_weights(result, base, str(tmp_path / "merged"))
  assert os.listdir(tmp_path) == []

  with pytest.raises(KeyboardInterrupt):
    with output_dir.atomic_output_dir(str(tmp_path / "out")) as tmp:
      open(os.path.join(tmp, "half"), "w").write("x")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []


def test_existing_output_and_overwrite(llama_family, tmp_path, monkeypatch):
  _, adapters = llama_family
  result = ta_result(adapters)
  out = tmp_path / "adapter"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(ValueError, match="already exists.*overwrite"):
    peft_adapter.save_peft_adapter(result, str(out))
  assert os.listdir(out) == ["old.txt"] and leftovers(tmp_path, "adapter") == [str(out)]
  # overwrite replaces only what knots_jax wrote (its manifest), not a directory of the user's
  with pytest.raises(ValueError, match="no .knots_jax_output.json.*delete it by hand"):
    peft_adapter.save_peft_adapter(result, str(out), overwrite=True)
  assert os.listdir(out) == ["old.txt"] and leftovers(tmp_path, "adapter") == [str(out)]
  (out / "old.txt").unlink()
  out.rmdir()
  peft_adapter.save_peft_adapter(result, str(out))          # the old output
  old = os.stat(out / "adapter_model.safetensors").st_ino

  # A failure while overwriting keeps the old output.
  original = safetensors.numpy.save_file
  monkeypatch.setattr(safetensors.numpy, "save_file",
                      lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
  with pytest.raises(OSError, match="boom"):
    peft_adapter.save_peft_adapter(result, str(out), overwrite=True)
  assert os.stat(out / "adapter_model.safetensors").st_ino == old
  assert leftovers(tmp_path, "adapter") == [str(out)]
  monkeypatch.setattr(safetensors.numpy, "save_file", original)

  peft_adapter.save_peft_adapter(result, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == [output_dir.MANIFEST, "adapter_config.json",
                                     "adapter_model.safetensors", "knots_config.json"]
  assert os.stat(out / "adapter_model.safetensors").st_ino != old
  assert leftovers(tmp_path, "adapter") == [str(out)]

  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="not a directory"):
    with output_dir.atomic_output_dir(str(tmp_path / "file"), overwrite=True):
      pass
