"""The benchmark scripts run end to end and report figures that hold up.

`benchmarks/device_check.sh --tiny` on the CPU with two host devices: every
JSON it writes holds finite positive timings, and its sharded KnOTS-TA adapter
equals sum_i s_i B_i A_i computed here from the files. `benchmarks/peers.py` at
a tiny size: its relative errors agree with ones computed here (PEFT's `cat`
and ours exact; PEFT's `svd` and ours `mm_svd` at the Eckart-Young bound).
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "base_model.model."


def _lora_deltas(adapter_dir: str) -> dict[str, np.ndarray]:
  """{module: lora_alpha / r * B @ A} in float64, from the files (no patterns, no rslora)."""
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  assert not config.get("use_rslora") and not config.get("alpha_pattern")
  tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  deltas = {}
  for key, a in tensors.items():
    if key.endswith(".lora_A.weight"):
      module = key[len(PREFIX):-len(".lora_A.weight")]
      b = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
      deltas[module] = config["lora_alpha"] / a.shape[0] * (b @ a.astype(np.float64))
  return deltas


def _ta_sum(adapter_dirs: list[str]) -> dict[str, np.ndarray]:
  total: dict[str, np.ndarray] = {}
  for path in adapter_dirs:
    for module, delta in _lora_deltas(path).items():
      total[module] = total.get(module, 0) + delta
  return total


def _rel(found: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
  assert sorted(found) == sorted(reference)
  num = sum(np.sum((found[m] - reference[m]) ** 2) for m in reference)
  return math.sqrt(num / sum(np.sum(r ** 2) for r in reference.values()))


def _timings(node, path: str = "") -> list[tuple[str, float]]:
  """Every number under a `seconds` key or in merge_speed's `core_cold` / `core_warm`."""
  found = []
  if isinstance(node, dict):
    for key, value in node.items():
      if key in ("seconds", "core_cold", "core_warm"):
        found += _numbers(value, f"{path}/{key}")
      else:
        found += _timings(value, f"{path}/{key}")
  elif isinstance(node, list):
    for i, value in enumerate(node):
      found += _timings(value, f"{path}[{i}]")
  return found


def _numbers(node, path: str) -> list[tuple[str, float]]:
  if isinstance(node, dict):
    return [x for k, v in node.items() for x in _numbers(v, f"{path}/{k}")]
  assert isinstance(node, (int, float)) and not isinstance(node, bool), (path, node)
  return [(path, float(node))]


@pytest.fixture(scope="module")
def device_check(tmp_path_factory):
  """benchmarks/device_check.sh --tiny, on the CPU backend with 2 host devices."""
  out = tmp_path_factory.mktemp("device_check")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), "--tiny",
                         str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return out


def test_device_check_tiny_writes_finite_positive_timings(device_check):
  summary = json.loads((device_check / "summary.json").read_text())
  assert summary["ok"] and summary["tiny"]
  assert [s["name"] for s in summary["steps"]] == ["devices", "imports", "merge_speed",
                                                   "backbone_io", "sharded"]
  assert all(s["rc"] == 0 for s in summary["steps"])
  assert summary["total_seconds"] < 60, summary   # the budget of the --tiny run in CI
  files = sorted(glob.glob(str(device_check / "*.json")))
  assert {os.path.basename(f) for f in files} == {
      "devices.json", "imports.json", "merge_speed.json", "backbone_io.json", "sharded.json",
      "summary.json"}
  for path in files:
    if path.endswith("summary.json"):
      continue
    timings = _timings(json.load(open(path)))
    assert timings, f"{path}: no timings"
    bad = [(k, v) for k, v in timings if not (math.isfinite(v) and v > 0)]
    assert not bad, f"{path}: timings that are not finite and positive: {bad}"
  # the figures the script exists for are there
  merge_speed = json.loads((device_check / "merge_speed.json").read_text())
  assert {"load", "align", "threshold+merge", "write", "total"} <= set(merge_speed["core_cold"])
  backbone = json.loads((device_check / "backbone_io.json").read_text())
  assert backbone["ours"]["seconds"]["total"] > 0 and backbone["plain"]["seconds"]["total"] > 0
  devices = json.loads((device_check / "devices.json").read_text())
  assert devices["devices"] == ["cpu:0", "cpu:1"] and devices["nvidia_smi_L"]


def test_device_check_imports_the_merge_path_without_ml_collections(device_check):
  report = json.loads((device_check / "imports.json").read_text())
  assert report["ok"], report
  assert "knots_jax.export.full_model" in report["merge_path"]
  assert "knots_jax.parallel.sharding" in report["merge_path"]


def test_device_check_sharded_merge_matches_numpy(device_check):
  report = json.loads((device_check / "sharded.json").read_text())
  assert report["mesh_shape"] == {"stack": 2}   # really sharded, over both host devices
  files = device_check / "sharded_files"
  reference = _ta_sum(sorted(glob.glob(str(files / "adapters" / "task*"))))
  merged = _lora_deltas(str(files / "merged_ta"))
  error = _rel(merged, reference)
  assert error < 1e-5   # float32 merge against a float64 reference, relative to its norm
  assert report["checks"]["modules_checked"] == len(reference) == 8
  assert report["checks"]["knots_ta_sharded_vs_numpy_rel_error"] == pytest.approx(
      error, rel=1e-3, abs=1e-9)
  # the same KnOTS-TIES on 2 devices and on 1: rounding only
  assert report["checks"]["knots_ties_sharded_vs_unsharded_rel_diff"] < 1e-5


def test_peers_errors_agree_with_numpy(tmp_path):
  """PEFT and ours on the same PEFT files: exact merges at rounding, rank-r truncations at the
  Eckart-Young bound sqrt(sum_{k>r} sigma_k^2) / ||T|| computed here."""
  work = tmp_path / "work"
  out = tmp_path / "peers.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), "--layers", "1",
       "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--adapters", "3", "--rank", "2",
       "--repeat", "1", "--runs", "peft_cat,peft_svd,ours_knots_ta,ours_mm_svd",
       "--workdir", str(work), "--json", str(out)],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  results = json.loads(out.read_text())
  runs = results["runs"]
  reference = _ta_sum([str(work / p) for p in results["workdir"]["adapters"]])
  # our own reading of every written adapter against the script's figures
  for name, r in runs.items():
    merged = work / r["merged_adapter"]
    assert r["rel_error_to_ta"] == pytest.approx(_rel(_lora_deltas(str(merged)), reference),
                                                 rel=1e-6, abs=1e-12), name
  assert runs["peft_cat"]["rel_error_to_ta"] < 1e-6
  assert runs["ours_knots_ta"]["rel_error_to_ta"] < 1e-5
  assert runs["peft_cat"]["rank"] == runs["ours_knots_ta"]["rank"] == 6
  num = sum(np.sum(np.linalg.svd(t, compute_uv=False)[2:] ** 2) for t in reference.values())
  bound = math.sqrt(num / sum(np.sum(t ** 2) for t in reference.values()))
  assert bound > 0.1   # the truncation matters at this size: the check is not vacuous
  for name in ("peft_svd", "ours_mm_svd"):
    assert runs[name]["rank"] == 2
    assert runs[name]["rel_error_to_ta"] == pytest.approx(bound, rel=1e-5), name
  for name, r in runs.items():
    for phase in ("cold", "warm"):
      assert all(math.isfinite(v) and v >= 0 for v in r["seconds"][phase].values()), name
      assert r["seconds"][phase]["total"] > 0
  assert runs["peft_svd"]["cold_total_over_paired"] > 0
  assert "free_g" in results["machine"] and results["machine"]["nproc"]
