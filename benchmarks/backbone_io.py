r"""Full merged model on disk: our read + merge + write against a plain copy of the files.

  python benchmarks/backbone_io.py            # a ~1.1 B-parameter Llama in bf16, 2GB shards
  python benchmarks/backbone_io.py --quick    # ~100 M parameters, 100MB shards (a check)

The script writes a random Llama-shaped HF checkpoint in bf16 itself (random
tensors under the right names and shapes, safetensors shards + index +
config.json; no transformers initialisation) and 6 PEFT adapters of rank 16
on q, k, v, o. Then, each in its own fresh process (so neither compiled
programs nor the peak resident memory of one run reach the next):

  plain       read every tensor with safetensors and write them again as shards
              of the same size (safetensors.numpy.save_file, one shard in
              memory): the baseline of the target
  cp          `shutil.copyfile` of every file (the kernel copies; informational)
  ours        load the adapters, KnOTS-TIES (top-K 30) from a cold start (jit
              compilation included), then `full_model.save_merged_model`: the
              unchanged tensors copied file to file on a thread while the
              q/k/v/o weights get base + merged update; then warm repeats of
              both (informational). This is what `knots-jax merge` does on the
              CPU backend.
  overlap     the same with `full_model.MergedModelWriter(overlap=True)`: the copy
              starts before the merge and runs beside it (the default on
              accelerators; on the CPU backend it competes with XLA for cores)
  orbax       the same merge, then `orbax_model.save_merged_model_orbax`
              (informational: it holds the whole merged model)

each `--repeat` times (default 3; the run with the median total is reported,
every total is kept), and reports the wall times, `ours / plain` (target <= 2), and each process's
peak RSS (VmHWM) against the largest shard (target for `ours`:
< 1.5x). The base files are in the page cache for every run (they were just
written), so the times are of CPU and memory work more than of disk reads.
Results go to benchmarks/results/backbone_io[_quick].json with the machine.

On a busy machine (more runnable processes than cores), XLA's multi-threaded
CPU kernels can spin while waiting for a descheduled thread: on the project's
2-core machine at load ~5 a warm 100 M-model merge took 12-78 s instead of
0.15-0.2 s, with CPU time equal to wall time. Measure on a quiet machine, or
pass XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
(recorded in the results) to compare on a busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ~1.1 B parameters (Llama-2 vocabulary, Llama-3.2-1B-like body) and ~100 M for --quick.
FULL = dict(vocab=32000, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
            shard="2GB")
QUICK = dict(vocab=32000, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4,
             shard="100MB")


def llama_shapes(size: dict) -> dict[str, tuple[int, ...]]:
  """{HF tensor name: shape} of a Llama with untied embeddings, in checkpoint order."""
  h, head = size["hidden"], size["hidden"] // size["heads"]
  kv = size["kv_heads"] * head
  shapes = {"model.embed_tokens.weight": (size["vocab"], h)}
  for l in range(size["layers"]):
    p = f"model.layers.{l}"
    shapes.update({
        f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
        f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
        f"{p}.mlp.gate_proj.weight": (size["intermediate"], h),
        f"{p}.mlp.up_proj.weight": (size["intermediate"], h),
        f"{p}.mlp.down_proj.weight": (h, size["intermediate"]),
        f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)})
  shapes["model.norm.weight"] = (h,)
  shapes["lm_head.weight"] = (size["vocab"], h)
  return shapes


def hf_config(size: dict) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": size["vocab"], "hidden_size": size["hidden"],
          "intermediate_size": size["intermediate"], "num_hidden_layers": size["layers"],
          "num_attention_heads": size["heads"], "num_key_value_heads": size["kv_heads"],
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}


def write_base(path: str, size: dict) -> dict:
  """Random bf16 Llama as HF safetensors shards (one shard in memory at a time)."""
  import ml_dtypes
  from safetensors.numpy import save_file

  from knots_jax.export import full_model
  from knots_jax.io import hf_checkpoint
  shapes = llama_shapes(size)
  header = {k: (None, s, np.dtype(ml_dtypes.bfloat16)) for k, s in shapes.items()}
  plan = full_model.plan_shards(header, full_model.parse_size(size["shard"]))
  os.makedirs(path)
  rng = np.random.default_rng(0)
  weight_map, sizes = {}, []
  for i, keys in enumerate(plan):
    name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
    tensors = {}
    for k in keys:
      x = rng.standard_normal(shapes[k], np.float32)
      x *= 0.02
      tensors[k] = x.astype(ml_dtypes.bfloat16)
      del x
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    sizes.append(sum(t.nbytes for t in tensors.values()))
    weight_map.update({k: name for k in keys})
    del tensors
  with open(os.path.join(path, hf_checkpoint.INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config(size), f)
  return {"parameters": int(sum(np.prod(s) for s in shapes.values())), "shards": len(plan),
          "largest_shard_bytes": max(sizes), "total_bytes": sum(sizes)}


def write_adapters(root: str, size: dict, n: int, rank: int) -> list[str]:
  from benchmarks.merge_speed import write_adapters as write
  h, kv = size["hidden"], size["kv_heads"] * (size["hidden"] // size["heads"])
  shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
  return write(root, n, rank, size["layers"], 1, shapes=shapes)


def _status_mib(field: str) -> float:
  """VmRSS (now) or VmHWM (peak since start or the last `_reset_peak`) of this process, MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _rss_now_mib() -> float:
  return _status_mib("VmRSS")


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0: clear_refs 5); False if not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


_PEAK = [0.0]   # the process's peak RSS so far, over the phases (VmHWM is reset per phase)


def _phase_peak(fn):
  """(fn(), peak RSS during fn in MiB or None when VmHWM cannot be reset)."""
  _PEAK[0] = max(_PEAK[0], _status_mib("VmHWM"))
  can = _reset_peak()
  value = fn()
  peak = _status_mib("VmHWM")
  _PEAK[0] = max(_PEAK[0], peak)
  return value, (peak if can else None)


def _process_peak_mib() -> float:
  """Peak RSS of this process. VmHWM, not `ru_maxrss`: after fork + exec, ru_maxrss
  starts from the forking parent's RSS (here the script that wrote the base model)."""
  return max(_PEAK[0], _status_mib("VmHWM"))


def _plain_copy(spec: dict, index: str) -> None:
  """Every tensor read with safetensors and written again, one shard in memory at a time."""
  from safetensors import safe_open
  from safetensors.numpy import save_file
  with open(os.path.join(spec["base"], index)) as f:
    weight_map = json.load(f)["weight_map"]
  by_file: dict[str, list[str]] = {}
  for key, name in weight_map.items():
    by_file.setdefault(name, []).append(key)
  os.makedirs(spec["out"])
  for name, keys in by_file.items():
    with safe_open(os.path.join(spec["base"], name), framework="numpy") as f:
      tensors = {k: f.get_tensor(k) for k in keys}
    save_file(tensors, os.path.join(spec["out"], name), metadata={"format": "pt"})
    del tensors
  shutil.copyfile(os.path.join(spec["base"], index), os.path.join(spec["out"], index))


def _cp(spec: dict, index: str) -> None:
  os.makedirs(spec["out"])
  for name in os.listdir(spec["base"]):
    shutil.copyfile(os.path.join(spec["base"], name), os.path.join(spec["out"], name))


def child(mode: str, spec: dict) -> dict:
  """One measurement, in this (fresh) process."""
  out = {"rss_after_imports_mib": None}
  if mode in ("plain", "cp"):
    from knots_jax.io import hf_checkpoint  # imports safetensors.numpy before the clock starts
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16: safetensors' numpy reader needs it)
    out["rss_after_imports_mib"] = _rss_now_mib()
    start = time.perf_counter()
    _, out["peak_rss_write_mib"] = _phase_peak(
        lambda: (_plain_copy if mode == "plain" else _cp)(spec, hf_checkpoint.INDEX))
    out["seconds"] = {"total": time.perf_counter() - start}
    out["peak_rss_mib"] = _process_peak_mib()
    return out

  import jax

  import knots_jax
  from knots_jax.export import full_model, orbax_model
  out["rss_after_imports_mib"] = _rss_now_mib()
  out["devices"] = [str(d) for d in jax.devices()]
  merge = lambda adapters: knots_jax.merge(adapters, "knots_ties", top_k=30)
  t, start = {}, time.perf_counter()
  adapters = knots_jax.load_adapters(spec["adapters"])
  t["load adapters"] = time.perf_counter() - start
  if mode == "overlap":
    def run():
      with full_model.MergedModelWriter(spec["base"], spec["out"], max_shard_size=spec["shard"],
                                      changed=full_model.changed_keys(adapters),
                                      overlap=True) as writer:
        begin = time.perf_counter()
        result = merge(adapters)
        t["merge (cold, the copy running)"] = time.perf_counter() - begin
        begin = time.perf_counter()
        writer.finish(result)
        t["finish: merged tensors, wait for the copy"] = time.perf_counter() - begin

    _, out["peak_rss_write_mib"] = _phase_peak(run)
    t["total"] = time.perf_counter() - start
  else:
    begin = time.perf_counter()
    result, out["peak_rss_merge_mib"] = _phase_peak(lambda: merge(adapters))
    t["merge (cold: jit compilation included)"] = time.perf_counter() - begin
    out["rss_after_merge_mib"] = _rss_now_mib()

    def write(path):
      if mode == "ours":
        full_model.save_merged_model(result, spec["base"], path, max_shard_size=spec["shard"])
      else:
        orbax_model.save_merged_model_orbax(result, spec["base"], path)

    begin = time.perf_counter()
    _, out["peak_rss_write_mib"] = _phase_peak(lambda: write(spec["out"]))
    t["read + add + write"] = time.perf_counter() - begin
    t["total"] = time.perf_counter() - start
    begin = time.perf_counter()
    write(spec["out"] + "_again")   # the add programs are compiled by now
    t["(read + add + write, again)"] = time.perf_counter() - begin
    shutil.rmtree(spec["out"] + "_again", ignore_errors=True)
    begin = time.perf_counter()
    merge(adapters)   # warm: compiled programs reused
    t["(merge, warm)"] = time.perf_counter() - begin
    t["(total with a warm merge)"] = (t["load adapters"] + t["(merge, warm)"]
                                      + t["read + add + write"])
  out["seconds"] = t
  out["peak_rss_mib"] = _process_peak_mib()
  return out


def measure(mode: str, spec: dict) -> dict:
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                         json.dumps(spec)], capture_output=True, text=True, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_devices": [str(d) for d in jax.devices()],
          "load_average_at_start": list(os.getloadavg()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="~100 M parameters, 100MB shards")
  parser.add_argument("--adapters", type=int, default=6)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeat", type=int, default=3,
                      help="fresh processes per run; the one with the median total is reported")
  parser.add_argument("--modes", default="plain,cp,ours,overlap,orbax",
                      help="runs to make (plain and ours are needed for the ratios)")
  parser.add_argument("--json", default="", help="results file (default: benchmarks/results/"
                                                 "backbone_io[_quick].json)")
  parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
    return

  size = QUICK if args.quick else FULL
  results = {"machine": machine(), "size": size, "adapters": args.adapters, "rank": args.rank,
             "repeat": args.repeat}
  print("machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()))
  root = tempfile.mkdtemp(prefix="knots_backbone_io_")
  try:
    start = time.perf_counter()
    base = os.path.join(root, "base")
    results["base"] = write_base(base, size)
    adapters = write_adapters(os.path.join(root, "adapters"), size, args.adapters, args.rank)
    largest = results["base"]["largest_shard_bytes"] / 2**20
    print(f"wrote a {results['base']['parameters'] / 1e6:.0f} M-parameter bf16 base "
          f"({results['base']['shards']} shards, largest {largest:.0f} MiB) and "
          f"{args.adapters} adapters in {time.perf_counter() - start:.1f}s")
    modes = args.modes.split(",")
    for mode in modes:
      spec = {"base": base, "out": os.path.join(root, f"out_{mode}"), "adapters": adapters,
              "shard": size["shard"]}
      runs = []
      for _ in range(args.repeat):
        os.sync()   # no dirty pages of the previous run written back during this one
        runs.append(measure(mode, spec))
        shutil.rmtree(spec["out"], ignore_errors=True)
      totals = [run["seconds"]["total"] for run in runs]
      r = runs[int(np.argsort(totals)[len(runs) // 2])]
      r["totals_of_all_runs"] = totals
      r["peak_rss_over_largest_shard"] = r["peak_rss_mib"] / largest
      if r.get("peak_rss_write_mib") is not None:
        r["write_peak_over_largest_shard"] = r["peak_rss_write_mib"] / largest
      results[mode] = r
      print(f"{mode:>5}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["seconds"].items())
            + f"  [median of {len(runs)}; totals {', '.join(f'{x:.2f}' for x in totals)}]")
      print(f"       peak RSS {r['peak_rss_mib']:.0f} MiB ({r['peak_rss_over_largest_shard']:.2f}x "
            f"the largest shard); {r['rss_after_imports_mib']:.0f} MiB after imports"
            + (f", {r['peak_rss_merge_mib']:.0f} MiB peak while merging"
               if r.get("peak_rss_merge_mib") else "")
            + (f", {r['peak_rss_write_mib']:.0f} MiB peak while reading/writing the model"
               if r.get("peak_rss_write_mib") else "")
            + (f" ({r['rss_after_merge_mib']:.0f} MiB before it)"
               if r.get("rss_after_merge_mib") else ""))
      shutil.rmtree(spec["out"], ignore_errors=True)
    total = {m: results[m]["seconds"]["total"] for m in modes}
    ratios = {f"{m}_total_over_{b}": total[m] / total[b]
              for m in modes if m not in ("plain", "cp") for b in ("plain", "cp") if b in modes}
    if "ours" in modes and "plain" in modes:
      ours = results["ours"]["seconds"]
      ratios["ours_total_warm_merge_over_plain"] = (ours["(total with a warm merge)"]
                                                    / total["plain"])
      ratios["ours_read_add_write_over_plain"] = ours["read + add + write"] / total["plain"]
    results["ratios"] = ratios
    results["load_average_at_end"] = list(os.getloadavg())
    print("time ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + " (target: ours_total_over_plain <= 2)")
    if "ours" in modes:
      print(f"peak RSS of ours: {results['ours']['peak_rss_over_largest_shard']:.2f}x the "
            "largest shard (target < 1.5)")
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"backbone_io{'_quick' if args.quick else ''}.json")
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    print(f"results: {path}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
