r"""KnOTS-TIES on Llama-3-8B-shaped adapters: core path vs the dense float64 path.

  python benchmarks/merge_speed.py                 # the figures in docs/performance.md
  python benchmarks/merge_speed.py --layers 2 --dense-modules 0   # a quick check

Writes 6 PEFT adapters of rank 16 on q,k,v,o of 32 layers (q,o 4096x4096; k,v
1024x4096, as Llama-3-8B with grouped-query attention) to a temporary
directory, then times KnOTS-TIES from the files to a written merged adapter
(load, align, threshold + merge, write), cold (with jit compilation) and warm.
The dense float64 path (one SVD of the 4096 x 6*4096 concatenation per module)
is timed on a few modules and extrapolated to all of them, as stated in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the dense float64 reference only

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import knots_jax  # noqa: E402
from knots_jax import decomposition as align_lib  # noqa: E402
from knots_jax import export  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
          "o_proj": (4096, 4096)}


def write_adapters(root: str, n: int, rank: int, layers: int, scale_hidden: int) -> list[str]:
  """n PEFT adapter directories with random factors, in PEFT's own layout."""
  paths = []
  rng = np.random.default_rng(0)
  for i in range(n):
    tensors = {}
    for l in range(layers):
      for name, (out, inp) in SHAPES.items():
        out, inp = out // scale_hidden, inp // scale_hidden
        key = f"base_model.model.model.layers.{l}.self_attn.{name}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, inp), np.float32)
                                           / np.sqrt(inp)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((out, rank), np.float32))
    path = os.path.join(root, f"task{i}")
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules":
              list(SHAPES), "base_model_name_or_path": "llama-3-8b-shaped", "task_type":
              "CAUSAL_LM", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump(config, f)
    paths.append(path)
  return paths


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_core(paths: list[str], out_dir: str, top_k: float) -> dict:
  """Files -> written merged adapter, with a breakdown."""
  t = {}
  start = time.perf_counter()
  adapters = knots_jax.load_adapters(paths)
  t["load"] = time.perf_counter() - start
  result = knots_jax.merge(adapters, "knots_ties", scaling=1.0, top_k=top_k)
  t["align"] = result.stats["align_seconds"]
  t["threshold+merge"] = result.stats["merge_seconds"]
  t["(of which threshold)"] = result.stats["threshold_seconds"]
  start = time.perf_counter()
  export.save_peft_adapter(result, out_dir, overwrite=True)
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
      out = align_lib._dense_stack(delta, align_lib.DEFAULT_TOL, None)
      jax.block_until_ready(out)
      seconds.append(time.perf_counter() - start)
    per_shape[name] = float(np.median(seconds))
  return per_shape


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
  args = parser.parse_args()

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
               "peak_rss_before_merge_gib": rss_before}
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
    if args.json:
      with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
