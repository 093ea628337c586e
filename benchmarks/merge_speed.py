r"""KnOTS-TIES on Llama-3-8B-shaped adapters: core path vs the dense float64 path.

  python benchmarks/merge_speed.py                 # the figures in docs/performance.md
  python benchmarks/merge_speed.py --devices 1,8   # + the core path on 1 and 8 devices
  python benchmarks/merge_speed.py --quick         # a small check of everything

Writes 6 PEFT adapters of rank 16 on q,k,v,o of 32 layers (q,o 4096x4096; k,v
1024x4096, as Llama-3-8B with grouped-query attention) to a temporary
directory, then times KnOTS-TIES from the files to a written merged adapter
(load, align, threshold + merge, write), cold (with jit compilation) and warm.
The dense float64 path (one SVD of the 4096 x 6*4096 concatenation per module)
is timed on a few modules and extrapolated to all of them, as stated in the output.

`--devices 1,8` also times the core path (cold and warm, files to written
adapter) in one fresh process per configuration: `1` one CPU device, `8`
eight host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set before jax is imported) with the merge sharded over a mesh of them; and,
when jax finds a GPU or TPU, `accelerator`: every accelerator device in a mesh.
Host devices share the machine's cores: 8 of them measure the sharded code
path and its overheads, not a speed-up. `--quick` shrinks everything (4
layers, widths / 8, one dense module) and turns on `--devices 1,8,accelerator`
(the last one is skipped without a GPU/TPU). Results go
to `--json`, by default benchmarks/results/merge_speed_quick.json for --quick.
On a busy machine XLA's multi-threaded CPU kernels can spin-wait and inflate
warm timings by 10-100x (see benchmarks/backbone_io.py); the XLA_FLAGS in
effect and the load average are recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the dense float64 reference only

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import knots_jax  # noqa: E402
from knots_jax.alignment import knots_svd  # noqa: E402
from knots_jax.export import peft_adapter  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
          "o_proj": (4096, 4096)}


def write_adapters(root: str, n: int, rank: int, layers: int, scale_hidden: int,
                   shapes: dict[str, tuple[int, int]] = SHAPES) -> list[str]:
  """n PEFT adapter directories with random factors on `shapes` (out, in), in PEFT's layout."""
  paths = []
  rng = np.random.default_rng(0)
  for i in range(n):
    tensors = {}
    for l in range(layers):
      for name, (out, inp) in shapes.items():
        out, inp = out // scale_hidden, inp // scale_hidden
        key = f"base_model.model.model.layers.{l}.self_attn.{name}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, inp), np.float32)
                                           / np.sqrt(inp)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((out, rank), np.float32))
    path = os.path.join(root, f"task{i}")
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
              list(shapes), "base_model_name_or_path": "llama-3-8b-shaped", "task_type":
              "CAUSAL_LM", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump(config, f)
    paths.append(path)
  return paths


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_core(paths: list[str], out_dir: str, top_k: float, mesh=None) -> dict:
  """Files -> written merged adapter, with a breakdown (sharded over `mesh` if given)."""
  t = {}
  start = time.perf_counter()
  adapters = knots_jax.load_adapters(paths)
  t["load"] = time.perf_counter() - start
  result = knots_jax.merge(adapters, "knots_ties", scaling=1.0, top_k=top_k, mesh=mesh)
  t["align"] = result.stats["align_seconds"]
  t["threshold+merge"] = result.stats["merge_seconds"]
  t["(of which threshold)"] = result.stats["threshold_seconds"]
  start = time.perf_counter()
  peft_adapter.save_peft_adapter(result, out_dir, overwrite=True)
  t["write"] = time.perf_counter() - start
  t["total"] = sum(v for k, v in t.items() if not k.startswith("("))
  return t


def time_dense(paths: list[str], modules: int) -> dict:
  """Dense float64 SVD of the concatenated updates, on `modules` modules of each shape."""
  adapters = knots_jax.load_adapters(paths)
  per_shape = {}
  for name in ("q_proj", "k_proj"):
    mods = [m for m in adapters.module_names if m.endswith(name)][:modules]
    seconds = []
    for m in mods:
      delta = jnp.asarray(np.stack([f.delta() for f in adapters.factors(m)])[None])
      start = time.perf_counter()
      out = knots_svd._dense_stack(delta, knots_svd.DEFAULT_TOL, None)
      jax.block_until_ready(out)
      seconds.append(time.perf_counter() - start)
    per_shape[name] = float(np.median(seconds))
  return per_shape


def machine_info() -> dict:
  """Where the figures were taken: platform, cores, jax and its devices, load."""
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_devices": [str(d) for d in jax.devices()], "load_average": list(os.getloadavg()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def device_child(config: str, paths: list[str], top_k: float) -> dict:
  """In a fresh process set up by `time_devices`: the core path on this process's devices."""
  from knots_jax.parallel import sharding
  devices = jax.devices()
  mesh = sharding.make_mesh() if len(devices) > 1 else None
  root = tempfile.mkdtemp(prefix="knots_bench_out_")
  try:
    cold = time_core(paths, os.path.join(root, "merged"), top_k, mesh)
    warm = time_core(paths, os.path.join(root, "merged"), top_k, mesh)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return {"config": config, "devices": [str(d) for d in devices], "mesh": mesh is not None,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "core_cold": cold, "core_warm": warm, "peak_rss_gib": peak_rss_gib()}


def time_devices(configs: list[str], paths: list[str], top_k: float) -> list[dict]:
  """The core path in one subprocess per device configuration (`1`, `8`, `accelerator`)."""
  runs = []
  for config in configs:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    flags = [f for f in env.get("XLA_FLAGS", "").split()   # the user's flags are kept
             if not f.startswith("--xla_force_host_platform_device_count")]
    if config == "accelerator":
      if jax.default_backend() == "cpu":
        print("no GPU/TPU found: skipping the accelerator configuration")
        continue
    else:
      env["JAX_PLATFORMS"] = "cpu"
      # first: a bare token such as `intra_op_parallelism_threads=1` can end XLA's parsing
      flags.insert(0, f"--xla_force_host_platform_device_count={int(config)}")
    env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--device-child", config,
                           json.dumps({"paths": paths, "top_k": top_k})],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"devices={config} failed:\n{proc.stderr[-4000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    runs.append(run)
    print(f"devices={config} ({len(run['devices'])} x {run['devices'][0].split(':')[0]}), core "
          f"path: cold {run['core_cold']['total']:.2f}s, warm {run['core_warm']['total']:.2f}s "
          f"(align {run['core_warm']['align']:.2f}s, threshold+merge "
          f"{run['core_warm']['threshold+merge']:.2f}s)")
  return runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--adapters", type=int, default=6)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--top-k", type=float, default=30)
  parser.add_argument("--scale-hidden", type=int, default=1,
                      help="divide every width by this (quick runs)")
  parser.add_argument("--dense-modules", type=int, default=1,
                      help="modules of each shape timed on the dense path (0: skip)")
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--devices", default="",
                      help="comma-separated device configurations to time the core path on, "
                           "each in its own process: 1, 8 (host CPU devices), accelerator")
  parser.add_argument("--quick", action="store_true",
                      help="4 layers, widths / 8, one dense module, --devices 1,8,accelerator")
  parser.add_argument("--device-child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.device_child:
    spec = json.loads(args.device_child[1])
    print(json.dumps(device_child(args.device_child[0], spec["paths"], spec["top_k"])))
    return
  if args.quick:
    args.layers, args.scale_hidden, args.dense_modules = 4, 8, 1
    args.devices = args.devices or "1,8,accelerator"
    args.json = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                          "merge_speed_quick.json")

  root = tempfile.mkdtemp(prefix="knots_bench_")
  try:
    start = time.perf_counter()
    paths = write_adapters(root, args.adapters, args.rank, args.layers, args.scale_hidden)
    size = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) for p in paths)
    print(f"wrote {args.adapters} adapters ({size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - start:.1f}s")
    rss_before = peak_rss_gib()
    cold = time_core(paths, os.path.join(root, "merged"), args.top_k)
    warm = time_core(paths, os.path.join(root, "merged"), args.top_k)
    rss_core = peak_rss_gib()
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores, {jax.devices()[0].platform}",
               "jax": jax.__version__, "layers": args.layers, "adapters": args.adapters,
               "rank": args.rank, "top_k": args.top_k, "scale_hidden": args.scale_hidden,
               "core_cold": cold, "core_warm": warm, "peak_rss_gib": rss_core,
               "peak_rss_before_merge_gib": rss_before, "machine_info": machine_info()}
    print(f"core path, cold: " + ", ".join(f"{k} {v:.2f}s" for k, v in cold.items()))
    print(f"core path, warm: " + ", ".join(f"{k} {v:.2f}s" for k, v in warm.items()))
    print(f"peak RSS after the core merges: {rss_core:.2f} GiB")
    if args.dense_modules:
      dense = time_dense(paths, args.dense_modules)
      per_layer = 2 * dense["q_proj"] + 2 * dense["k_proj"]  # q,o and k,v have equal shapes
      total = per_layer * args.layers
      results.update(dense_seconds_per_module=dense, dense_extrapolated_total=total,
                     speedup_vs_cold=total / cold["total"], speedup_vs_warm=total / warm["total"])
      print(f"dense float64 SVD per module (median of {args.dense_modules}): "
            + ", ".join(f"{k} {v:.1f}s" for k, v in dense.items()))
      print(f"dense path extrapolated to {4 * args.layers} modules (SVD only, no "
            f"threshold/merge/write): {total:.0f}s -> core path is "
            f"{total / cold['total']:.0f}x faster cold, {total / warm['total']:.0f}x warm")
    if args.devices:
      configs = [c.strip() for c in args.devices.split(",") if c.strip()]
      results["devices"] = time_devices(configs, paths, args.top_k)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
