"""Sharded merges equal single-device merges.

Multi-device runs happen in subprocesses (tests/sharded_worker.py) with
`--xla_force_host_platform_device_count`, because that flag slows unsharded
work 5-30x (DESIGN.md §5); the single-device reference is computed here.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

import knots_jax
from knots_jax.export import full_model
from knots_jax.io import sharded_read
from knots_jax.methods import registry
from knots_jax.parallel import sharding
from tests.sharded_worker import case_adapters

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sharded_worker.py")
TIMEOUT = 300

# Layer counts 8 (divides 8 devices) and 5 (padded to 8); `big` has > 2^16
# values per task, so the whole-model threshold takes the sampled bracket.
CASES = [
    {"name": f"{method}_L{layers}", "layers": layers, "method": method, "kwargs": kwargs}
    for layers in (8, 5)
    for method, kwargs in (("knots_ties", {"top_k": 20, "scaling": 0.6}),
                           ("knots_dare_ties", {"top_k": 40, "drop_rate": 0.5, "seed": 3}),
                           ("ties", {"top_k": 30}))
] + [{"name": "knots_ties_big_L13", "layers": 13, "big": True, "method": "knots_ties",
      "kwargs": {"top_k": 30}}]
# The other alignment and merge settings on a mesh (5 layers: padded to 8).
CASES += [
    {"name": "knots_ties_dense_L5", "layers": 5, "method": "knots_ties",
     "kwargs": {"top_k": 20}, "align": {"path": "dense"}},
    {"name": "knots_ties_rows_L5", "layers": 5, "method": "knots_ties",
     "kwargs": {"top_k": 20}, "align": {"concat": "rows"}},
    {"name": "knots_ties_f64_L5", "layers": 5, "method": "knots_ties",
     "kwargs": {"top_k": 20}, "align": {"dtype": "float64"}},
    {"name": "knots_ties_layer_scope_L5", "layers": 5, "method": "knots_ties",
     "kwargs": {"top_k": 20, "top_k_scope": "layer"}},
]


def _run_workers(configs, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, json.dumps(c)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for c in configs]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  path = configs[0]["out"]
  with open(path + ".json") as f:
    return np.load(path), json.load(f)


def _check(got, info, cases, devices):
  print({name: round(c["seconds_first"], 2) for name, c in info["cases"].items()},
        info.get("model_seconds"), info.get("ingredients", {}).get("seconds"))
  assert info["devices"] == devices
  for case in cases:
    seen = info["cases"][case["name"]]
    if registry.get_method(case["method"]).knots:
      assert seen["rep_devices"] == devices
      assert seen["rep_axes"] == [sharding.STACK] + [None] * (len(seen["rep_shape"]) - 1)
      assert seen["rep_shape"][0] % devices == 0
    expected = knots_jax.merge(case_adapters(case), case["method"], **case["kwargs"],
                             **case.get("align", {}))
    rtol = 1e-10 if case.get("align", {}).get("dtype") == "float64" else 1e-5
    for module, delta in expected.deltas():
      scale = np.max(np.abs(delta))
      got_delta = got[f"{case['name']}/{module}"]
      assert got_delta.dtype == delta.dtype, (case["name"], got_delta.dtype)
      np.testing.assert_allclose(got_delta, delta, rtol=rtol, atol=rtol / 10 * scale,
                                 err_msg=f"{case['name']} {module}")


def test_eight_host_devices_equal_one_device(tmp_path):
  config = {"devices": 8, "out": str(tmp_path / "merged.npz"), "cases": CASES}
  got, info = _run_workers([config], tmp_path)
  assert info["process_count"] == 1
  _check(got, info, CASES, 8)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_equal_one_device(llama_family, tmp_path):
  """Merges, the saved alignment and the full model (Orbax and safetensors), on 2 processes
  x 4 devices."""
  cases = [c for c in CASES if c["layers"] != 8]
  address = f"127.0.0.1:{_free_port()}"
  base, adapter_dirs = llama_family
  shared = {"devices": 4, "out": str(tmp_path / "merged.npz"), "cases": cases,
            "ingredients": {"dir": str(tmp_path / "ingredients"), "case": "knots_ties_L5"},
            "model": {"base": base, "adapters": adapter_dirs, "dir": str(tmp_path / "model")}}
  configs = [dict(shared, distributed={"coordinator_address": address, "num_processes": 2,
                                       "process_id": i}) for i in range(2)]
  got, info = _run_workers(configs, tmp_path)
  assert info["process_count"] == 2 and info["local_devices"] == 4
  _check(got, info, cases, 8)

  # one progress bar per host, labelled and on its own line
  for i in range(2):
    with open(str(tmp_path / "merged.npz") + f".progress{i}.json") as f:
      assert json.load(f) == {"label": f"host {i}/2", "desc": f"host {i}/2 merge", "position": i}

  # restore_alignment: each process holds only its 4 of the 8 row blocks
  seen = info["ingredients"]
  assert seen["rep_shape"][0] == 8 and seen["rep_spec"] == str(sharding.stack_spec(4))
  assert seen["rep_local_shards"] == 4 and not seen["rep_fully_addressable"]
  case = next(c for c in cases if c["name"] == "knots_ties_L5")
  expected = knots_jax.merge(case_adapters(case), case["method"], **case["kwargs"])
  for module, delta in expected.deltas():
    np.testing.assert_allclose(got[f"ingredients/{module}"], delta, rtol=1e-5,
                               atol=1e-6 * np.max(np.abs(delta)), err_msg=module)

  # the Orbax full model: restored sharded where the rows divide 8, equal to one process
  result = knots_jax.merge(knots_jax.load_adapters(adapter_dirs), "knots_ties", top_k=30)
  single = {k: np.asarray(v) for k, v in full_model.merged_model_weights(result, base)}
  assert set(info["model"]) == set(single)
  for key, want in single.items():
    seen = info["model"][key]
    rows_divide = want.shape[0] % 8 == 0
    assert ("stack" in seen["spec"]) == rows_divide, (key, seen)
    assert seen["fully_addressable"] == (not rows_divide) and seen["local_shards"] == 4
    np.testing.assert_allclose(got[f"model/{key}"], want, rtol=0, atol=1e-6, err_msg=key)
  assert any("stack" in info["model"][k]["spec"] for k in single)
  # the safetensors full model written by process 0 equals the single-process merge
  written = sharded_read.read_backbone(str(tmp_path / "model_safetensors"))
  assert set(written) == set(single)
  for key, want in single.items():
    np.testing.assert_allclose(np.asarray(written[key]), want, rtol=0, atol=1e-6, err_msg=key)


# --- one device, in this process -------------------------------------------------


def test_specs_come_from_shapes():
  mesh = sharding.make_mesh()
  size = mesh.shape[sharding.STACK]
  assert mesh.axis_names == (sharding.STACK,)
  assert mesh.axis_types == (AxisType.Auto,)
  assert sharding.stack_spec(4) == PartitionSpec(sharding.STACK, None, None, None)
  assert sharding.padded_length(5, mesh) % size == 0 and sharding.padded_length(5, mesh) >= 5
  assert sharding.stack_sharding(mesh, (size * 2, 3)).spec == sharding.stack_spec(2)
  with pytest.raises(ValueError, match="ndim"):
    sharding.stack_spec(0)


def test_place_stack_pads_with_fill():
  mesh = sharding.make_mesh()
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  placed = sharding.place_stack(x, mesh)
  length = sharding.padded_length(3, mesh)
  assert placed.shape == (length, 2)
  np.testing.assert_array_equal(np.asarray(placed)[:3], x)
  assert not np.asarray(placed)[3:].any()
  np.testing.assert_array_equal(np.asarray(sharding.unpad(placed, 3, mesh)), x)


def test_unpad_compiles_once_per_shape():
  mesh = sharding.make_mesh()
  x = sharding.place_stack(np.ones((3, 2), np.float32), mesh)
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(sharding.unpad(x, 3, mesh)), np.ones((3, 2)))
  assert sharding._unpad_fn(3, sharding.replicated(mesh))._cache_size() == 1


def test_progress_bar_has_no_host_label_on_one_process(capsys):
  assert sharding.host_label() == ""
  with sharding.progress_bar(range(3), desc="align", unit="stack") as bar:
    assert list(bar) == [0, 1, 2] and bar.desc == "align"
  assert "align: 100%" in capsys.readouterr().err


def test_initialize_is_a_no_op_on_one_process():
  sharding.initialize()
  sharding.initialize(num_processes=1)


@pytest.mark.parametrize("method", ["knots_ties", "knots_dare_ties", "ties", "ta"])
def test_mesh_of_one_device_equals_no_mesh(method):
  adapters = case_adapters({"layers": 3})
  mesh = sharding.make_mesh()
  plain = knots_jax.merge(adapters, method, top_k=30, drop_rate=0.3)
  meshed = knots_jax.merge(adapters, method, top_k=30, drop_rate=0.3, mesh=mesh)
  for (m, a), (m2, b) in zip(plain.deltas(), meshed.deltas()):
    assert m == m2
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  if registry.get_method(method).knots:
    assert meshed.stats["kept_components"] == plain.stats["kept_components"]
