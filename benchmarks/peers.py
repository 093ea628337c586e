r"""knots_jax beside PEFT's `add_weighted_adapter`, on the same PEFT adapter files.

  python benchmarks/peers.py                         # the figures in docs/performance.md
  python benchmarks/peers.py --size llama8b_like     # Llama-3-8B attention shapes (slow on a CPU)
  python benchmarks/peers.py --layers 2 --hidden 64  # any size from flags

The script builds a random `transformers` Llama whose attention shapes are the
ones asked for (hidden size, heads, key/value heads, layers; a tiny MLP and
vocabulary, which no merge reads) and writes it with `save_pretrained`; then
`peft` itself puts `--adapters` LoRA adapters of rank `--rank` (`lora_alpha`
`--alpha`, default 2 r, so PEFT's scale is 2) on q, k, v and o, fills A and B
with seeded random values and saves them. Nothing is downloaded.

Every run below is made in its own fresh process (imports done before the clock
starts), from those files to a merged adapter written to disk:

  peft_cat, peft_svd,         PEFT: `PeftModel.from_pretrained` + `load_adapter` for
  peft_ties_svd,              every adapter, `add_weighted_adapter(weights=1, ...)` with
  peft_dare_ties_svd          that combination type, `save_pretrained` of the merged one.
                              PEFT needs the base model: its load is timed apart.
  ours_knots_ta,              knots_jax: `load_adapters`, `merge(method)`,
  ours_knots_ties,            `save_peft_adapter`, on the core path (float32)
  ours_knots_dare_ties
  ours_mm_svd                 knots_jax's truncated SVD of the task-arithmetic sum
                              (the rank PEFT's `svd` uses: the adapters' largest)
  dense_knots_ta, ...         the same KnOTS merges with `path="dense"`, float64: one
                              SVD of the concatenated dense updates per module, the
                              reference implementation's way

Opt-in rows (`--runs`): authors_core_ties (the Core Space authors' TIES on the per-layer
cores, transcribed in PyTorch, algorithm only) beside ours_core_ties (`core_ties`,
`top_k_scope=layer`); ours_ties_layer / ours_ties_model (dense `ties`, thresholds per
module / per model; merged in memory, not written).

Each run is made twice in its process: cold (first call, jit compilation for
ours; JAX's persistent compilation cache is off unless `--compile-cache DIR`)
and warm (the same again; PEFT keeps its base model and loads the adapters
again), and each process `--repeat` times (default 3): the one with the median
cold total is reported, every total is kept. Settings: TIES keeps 30 % (PEFT `density=0.3`
per tensor; ours `top_k=30` over the whole model, the reference's choice);
DARE-TIES as in the KnOTS paper: drop p = 0.1 and no magnitude trim (PEFT
`density=0.9`; ours `drop_rate=0.1, top_k=100`). These are different methods
(per-tensor against whole-model top-K, on the updates against on the aligned
Sigma V_i^T), so their results are not expected to agree with each other.

Reported per run: the times, the ratio of each total to ours (the same merge on
the core path: knots_ta for cat and svd; of the median runs, and of the best of
the repeats, the least disturbed by other work on a shared machine), and the
relative error, Frobenius over all modules, of the written adapter against the
exact task-arithmetic sum sum_i s_i B_i A_i, both computed here in float64 NumPy
from the files. PEFT's
`*_svd` truncate every module to a rank (the largest adapter rank unless
`--svd-rank`); `cat` and ours are exact. For the TIES-family rows the figure is
the distance of that merge from task arithmetic (trim, sign election and
disjoint mean included), not an error. Dense rows also give their difference to
the core path's result: rounding for TA; for TIES the float32 core path and the
float64 dense path can differ by more, as entries close to the threshold or with
an elected sign close to 0 go one way or the other; DARE's random mask depends on
the compute dtype, so the float64 dense DARE-TIES drops other entries than the
float32 core path with the same seed.

Results: benchmarks/results/peers[_SIZE].json and .log (see --json, --log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."

# Attention shapes (q, o: hidden x hidden; k, v: kv_heads * head_dim x hidden).
SIZES = {
    "small": dict(hidden=1024, heads=16, kv_heads=4, layers=4),
    "llama8b_like": dict(hidden=4096, heads=32, kv_heads=8, layers=32),
}

PEFT_TYPES = ("cat", "svd", "ties_svd", "dare_ties_svd")
OURS_METHODS = ("knots_ta", "knots_ties", "knots_dare_ties")
# Which of our core-path runs each run is compared with.
PAIRED_WITH = {"peft_cat": "ours_knots_ta", "peft_svd": "ours_knots_ta",
               "peft_ties_svd": "ours_knots_ties", "peft_dare_ties_svd": "ours_knots_dare_ties",
               "ours_mm_svd": "ours_knots_ta",
               **{f"dense_{m}": f"ours_{m}" for m in OURS_METHODS}}
DEFAULT_RUNS = ([f"peft_{t}" for t in PEFT_TYPES] + [f"ours_{m}" for m in OURS_METHODS]
                + ["ours_mm_svd"] + [f"dense_{m}" for m in OURS_METHODS])
# Opt-in (--runs): Core Space TIES per layer, the authors' algorithm (PyTorch) beside
# ours; dense TIES with per-layer against whole-model thresholds.
EXTRA_RUNS = ("authors_core_ties", "ours_core_ties", "ours_ties_layer", "ours_ties_model")
PAIRED_WITH.update({"authors_core_ties": "ours_core_ties", "ours_ties_layer": "ours_ties_model"})


# ----------------------------------------------------------------- NumPy side


def _lora_scale(config: dict, module: str, rank: int) -> float:
  """PEFT's scale of `module`: lora_alpha / r (or / sqrt(r) with rslora), patterns applied."""
  alpha = float(config.get("lora_alpha", rank))
  for pattern, value in (config.get("alpha_pattern") or {}).items():
    if module == pattern or module.endswith("." + pattern):
      alpha = float(value)
  if config.get("use_rslora"):
    return alpha / math.sqrt(rank)
  return alpha / rank


def adapter_modules(adapter_dir: str) -> list[str]:
  """The module names of a PEFT safetensors adapter, sorted (from the file's keys)."""
  from safetensors import safe_open
  with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="numpy") as f:
    return sorted(k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in f.keys()
                  if k.endswith(".lora_A.weight"))


def read_lora_deltas(adapter_dir: str, modules: Iterable[str] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
  """(module, scale * B @ A in float64) of a PEFT adapter directory, read with safetensors.

  Independent of knots_jax: only the files and PEFT's scaling rule. `modules`
  limits the modules read (default: all of them, sorted).
  """
  from safetensors import safe_open
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  weights = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (peers.py reads only "
                            "safetensors adapters)")
  names = adapter_modules(adapter_dir) if modules is None else list(modules)
  with safe_open(weights, framework="numpy") as f:
    for module in names:
      a = f.get_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight").astype(np.float64)
      b = f.get_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight").astype(np.float64)
      yield module, _lora_scale(config, module, a.shape[0]) * (b @ a)


def task_arithmetic_sum(adapter_dirs: Sequence[str], modules: Iterable[str] | None = None
                        ) -> dict[str, np.ndarray]:
  """sum_i s_i B_i A_i per module, in float64 NumPy."""
  total: dict[str, np.ndarray] = {}
  for path in adapter_dirs:
    for module, delta in read_lora_deltas(path, modules):
      total[module] = total[module] + delta if module in total else delta
  return total


def relative_error(adapter_dir: str, reference: dict[str, np.ndarray]) -> float:
  """||merged - reference||_F / ||reference||_F over every module of `reference`."""
  diff, norm = 0.0, 0.0
  found = dict(read_lora_deltas(adapter_dir, sorted(reference)))
  for module, ref in reference.items():
    diff += float(np.sum((found[module] - ref) ** 2))
    norm += float(np.sum(ref ** 2))
  return math.sqrt(diff / norm)


def adapter_rank(adapter_dir: str) -> int:
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    return int(json.load(f)["r"])


# ------------------------------------------------------------- making the files


def llama_config(size: dict):
  """A random Llama with the attention shapes of `size`; tiny MLP and vocabulary."""
  import transformers
  return transformers.LlamaConfig(
      vocab_size=256, hidden_size=size["hidden"], intermediate_size=64,
      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
      num_key_value_heads=size["kv_heads"], max_position_embeddings=128,
      tie_word_embeddings=False)


def make_files(spec: dict) -> dict:
  """The base model (transformers) and the adapters (peft), all from seeds."""
  import peft
  import torch
  import transformers
  torch.manual_seed(spec["seed"])
  base = os.path.join(spec["root"], "base")
  transformers.LlamaForCausalLM(llama_config(spec["size"])).save_pretrained(base)
  model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
  names = [f"task{i}" for i in range(spec["adapters"])]
  config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(TARGETS),
                           init_lora_weights=False)
  peft_model = peft.get_peft_model(model, config, adapter_name=names[0])
  for name in names[1:]:
    peft_model.add_adapter(name, config)
  adapters_dir = os.path.join(spec["root"], "adapters")
  with torch.no_grad():
    for i, name in enumerate(names):
      generator = torch.Generator().manual_seed(spec["seed"] * 1000 + i + 1)
      for module in peft_model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
          a, b = module.lora_A[name].weight, module.lora_B[name].weight
          a.copy_(torch.randn(a.shape, generator=generator) / math.sqrt(a.shape[1]))
          b.copy_(0.02 * torch.randn(b.shape, generator=generator))
      peft_model.save_pretrained(adapters_dir, selected_adapters=[name])
  paths = [os.path.join(adapters_dir, name) for name in names]
  for path in paths:
    if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
      raise RuntimeError(f"peft did not write {path}/adapter_model.safetensors")
  return {"base": base, "adapters": paths,
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}}


# --------------------------------------------------------------- the runs


def _peft_child(spec: dict) -> dict:
  """PEFT: base model, adapters, add_weighted_adapter, save_pretrained; cold then warm."""
  import peft
  import torch
  import transformers
  device = spec["torch_device"]

  def sync():
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  combination = spec["run"].removeprefix("peft_")
  options = {"svd_rank": spec["svd_rank"] or None}
  if combination == "ties_svd":
    options["density"] = spec["ties_density"]
  if combination == "dare_ties_svd":
    options["density"] = 1.0 - spec["drop_rate"]
  if combination == "cat":
    options = {}
  t: dict[str, dict[str, float]] = {"cold": {}, "warm": {}}
  start = time.perf_counter()
  base = transformers.LlamaForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
  base = base.to(device).eval()
  sync()
  t["cold"]["base model"] = time.perf_counter() - start
  t["warm"]["base model"] = 0.0   # the warm run keeps the base model in memory
  model = None
  for phase, merged in (("cold", "merged"), ("warm", "merged_again")):
    names = [f"{phase}{i}" for i in range(len(spec["adapters"]))]
    start = time.perf_counter()
    if model is None:
      model = peft.PeftModel.from_pretrained(base, spec["adapters"][0], adapter_name=names[0])
    else:
      model.load_adapter(spec["adapters"][0], adapter_name=names[0])
    for path, name in zip(spec["adapters"][1:], names[1:]):
      model.load_adapter(path, adapter_name=name)
    sync()
    t[phase]["load"] = time.perf_counter() - start
    torch.manual_seed(spec["seed"])   # DARE's random drop
    start = time.perf_counter()
    with torch.no_grad():
      model.add_weighted_adapter(names, [1.0] * len(names), merged, combination_type=combination,
                                 **options)
    sync()
    t[phase]["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(spec["out"] + ("" if phase == "cold" else "_warm"),
                          selected_adapters=[merged])
    t[phase]["write"] = time.perf_counter() - start
    model.delete_adapter(merged)
  for phase in t.values():
    phase["total"] = sum(phase.values())
  shutil.rmtree(spec["out"] + "_warm", ignore_errors=True)
  return {"seconds": t, "merged_dir": os.path.join(spec["out"], "merged"),
          "options": {"combination_type": combination, **options, "weights": 1.0},
          "device": device, "torch_threads": torch.get_num_threads()}


def _ours_child(spec: dict) -> dict:
  """knots_jax: load_adapters, merge, save_peft_adapter; cold then warm."""
  import jax
  run = spec["run"]
  dense = run.startswith("dense_")
  if dense:
    jax.config.update("jax_enable_x64", True)   # the float64 reference path
  import knots_jax
  method = run.split("_", 1)[1]
  options: dict = {"scaling": 1.0, "seed": spec["seed"]}
  if method.endswith("ties"):
    options["top_k"] = 100 if "dare" in method else spec["top_k"]
  if "dare" in method:
    options["drop_rate"] = spec["drop_rate"]
  if method == "mm_svd":
    options["output_rank"] = spec["svd_rank"]
  if method.startswith("knots_"):
    options.update(path="dense" if dense else "core", dtype="float64" if dense else "float32")
  if method == "core_ties":
    options["top_k_scope"] = "layer"          # as the authors (matrix_per_layer)
  if method in ("ties_layer", "ties_model"):
    method, options["top_k_scope"] = "ties", method.split("_")[1]
  t: dict[str, dict[str, float]] = {}
  for phase in ("cold", "warm"):
    p = t[phase] = {}
    start = time.perf_counter()
    adapters = knots_jax.load_adapters(spec["adapters"])
    p["load"] = time.perf_counter() - start
    start = time.perf_counter()
    result = knots_jax.merge(adapters, method, **options)
    jax.block_until_ready([(s.b, s.a, s.delta) for s in result.stacks])
    p["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    if method != "ties":   # dense TIES has no LoRA factors to write: merge only
      report = knots_jax.save_peft_adapter(result, spec["out"], overwrite=True)
    p["write"] = time.perf_counter() - start
    p["total"] = p["load"] + p["merge"] + p["write"]
  return {"seconds": t, "merged_dir": spec["out"] if method != "ties" else None,
          "options": {"method": method, **options},
          "rank": report["rank"] if method != "ties" else 0,
          "devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__}


def _authors_ties(vectors, top_k: float):
  """Core Space's authors' TIES (merging_functions.ties_merging, merging_type='mean'),
  transcribed: per row a kthvalue trim, sign of the sum, disjoint mean. vectors [n, d]."""
  import torch
  n, d = vectors.shape
  k = d - int(d * top_k / 100)
  kth = vectors.abs().kthvalue(k, dim=1, keepdim=True)[0] if k > 0 else None
  pruned = vectors * (vectors.abs() >= kth) if kth is not None else vectors
  sign = torch.sign(pruned.sum(dim=0))
  sign[sign == 0] = torch.sign(sign.sum())
  keep = torch.where(sign[None] > 0, pruned > 0, pruned < 0)
  selected = pruned * keep
  return selected.sum(0) / torch.clamp((selected != 0).sum(0).float(), min=1)


def _authors_core_ties(spec: dict) -> dict:
  """The authors' core-space TIES per layer (their algorithm only, PyTorch float32, CPU):
  U_B, V_A from SVDs of the stacked factors, M_i = U_B^T B_i A_i V_A, TIES on the
  flattened M_i, merged LoRA B = U_B, A = M V_A^T written as a PEFT adapter."""
  import torch
  from safetensors.torch import load_file, save_file
  configs = []
  for path in spec["adapters"]:
    with open(os.path.join(path, "adapter_config.json")) as f:
      configs.append(json.load(f))
  t: dict[str, dict[str, float]] = {}
  for phase in ("cold", "warm"):
    p = t[phase] = {}
    start = time.perf_counter()
    tensors = [load_file(os.path.join(x, "adapter_model.safetensors")) for x in spec["adapters"]]
    p["load"] = time.perf_counter() - start
    start = time.perf_counter()
    merged = {}
    for key in sorted(k for k in tensors[0] if k.endswith(".lora_A.weight")):
      module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
      a = [w[key].float() for w in tensors]
      b = [_lora_scale(c, module, x.shape[0]) * w[key.replace("lora_A", "lora_B")].float()
           for c, x, w in zip(configs, a, tensors)]
      u_b = torch.linalg.svd(torch.cat(b, 1), full_matrices=False)[0]
      v_a = torch.linalg.svd(torch.cat(a, 0), full_matrices=False)[2].T
      cores = torch.stack([(u_b.T @ bi) @ (ai @ v_a) for bi, ai in zip(b, a)])
      m = _authors_ties(cores.reshape(len(b), -1), spec["top_k"]).reshape(cores.shape[1:])
      merged[key.replace("lora_A", "lora_B")] = u_b.contiguous()
      merged[key] = (m @ v_a.T).contiguous()
    p["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    os.makedirs(spec["out"], exist_ok=True)
    rank = next(iter(merged.values())).shape[1] if merged else 0
    config = dict(configs[0], r=rank, lora_alpha=rank, alpha_pattern={}, rank_pattern={},
                  use_rslora=False)
    with open(os.path.join(spec["out"], "adapter_config.json"), "w") as f:
      json.dump(config, f)
    save_file(merged, os.path.join(spec["out"], "adapter_model.safetensors"))
    p["write"] = time.perf_counter() - start
    p["total"] = p["load"] + p["merge"] + p["write"]
  return {"seconds": t, "merged_dir": spec["out"], "torch": torch.__version__,
          "torch_threads": torch.get_num_threads()}


def measure(spec: dict) -> dict:
  """One run in a fresh process of this script (the load average before it is recorded)."""
  load = list(os.getloadavg())
  env = dict(os.environ, KNOTS_JAX_COMPILE_CACHE=spec.get("compile_cache", "off"))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                        capture_output=True, text=True, cwd=ROOT, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"peers.py: the run `{spec['run']}` failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["load_average_before"] = load
  return result


def child(spec: dict) -> dict:
  if spec["run"] == "make_files":
    return make_files(spec)
  if spec["run"].startswith("peft_"):
    return _peft_child(spec)
  if spec["run"] == "authors_core_ties":
    return _authors_core_ties(spec)
  return _ours_child(spec)


# ------------------------------------------------------------------ the report


def machine() -> dict:
  """nproc, the CPU model, `free -g`, the load: where the figures were taken."""
  def command(*argv: str) -> str:
    try:
      return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
      return f"({argv[0]} failed: {e})"

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return {"nproc": command("nproc"), "cpu_model": cpu, "free_g": command("free", "-g"),
          "platform": platform.platform(), "python": platform.python_version(),
          "load_average_at_start": list(os.getloadavg()),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def table(results: dict) -> str:
  """The Markdown table of docs/performance.md: the best of the repeats (the least disturbed
  on a shared machine) and, for the cold run, every total."""
  lines = ["| run | rank | cold total, best [every run] | warm total, best | "
           "best cold / paired ours | best warm / paired ours | rel. error to Σ s_i B_i A_i |",
           "|---|---|---|---|---|---|---|"]
  for name, r in results["runs"].items():
    spread = " / ".join(f"{x:.2f}" for x in r["cold_totals_of_all_runs"])
    paired = PAIRED_WITH.get(name)
    if "best_cold_total_over_paired" in r:
      label = paired.removeprefix("ours_")
      ratios = (f"{r['best_cold_total_over_paired']:.2f}× ({label}) | "
                f"{r['best_warm_total_over_paired']:.2f}×")
    else:
      ratios = "1 (ours) | 1" if name not in PAIRED_WITH else "— (pair not run) | —"
    lines.append(f"| `{name}` | {r['rank']} | {min(r['cold_totals_of_all_runs']):.2f} s "
                 f"[{spread}] | {min(r['warm_totals_of_all_runs']):.2f} s | {ratios} | "
                 f"{r['rel_error_to_ta']:.2e} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="small", choices=sorted(SIZES),
                      help="attention shapes preset (the flags below override it)")
  parser.add_argument("--hidden", type=int, help="hidden size (q, o are hidden x hidden)")
  parser.add_argument("--heads", type=int, help="attention heads")
  parser.add_argument("--kv-heads", type=int, help="key/value heads (k, v narrower)")
  parser.add_argument("--layers", type=int, help="decoder layers")
  parser.add_argument("--adapters", type=int, default=6)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--top-k", type=float, default=30,
                      help="TIES: ours top_k (percent); PEFT density = top_k / 100")
  parser.add_argument("--drop-rate", type=float, default=0.1,
                      help="DARE-TIES: ours drop_rate; PEFT density = 1 - drop_rate")
  parser.add_argument("--svd-rank", type=int, default=0,
                      help="PEFT *_svd and ours mm_svd output rank (0: the largest adapter rank)")
  parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                      help="comma-separated runs (default: all): " + ", ".join(DEFAULT_RUNS))
  parser.add_argument("--repeat", type=int, default=3,
                      help="fresh processes per run; the one with the median cold total is "
                           "reported, every total is kept")
  parser.add_argument("--compile-cache", default="off",
                      help="KNOTS_JAX_COMPILE_CACHE of our runs: off (default: every cold run "
                           "compiles, as on a new machine) or a directory (JAX's persistent "
                           "cache; the first repeat fills it, the next ones load from it)")
  parser.add_argument("--torch-device", default="cpu", help="where PEFT merges (cpu, cuda)")
  parser.add_argument("--json", default="", help="results (default benchmarks/results/"
                                                 "peers[_SIZE].json)")
  parser.add_argument("--log", default="", help="log (default: the --json path with .log)")
  parser.add_argument("--workdir", default="",
                      help="make the base model, the adapters and the merged adapters here and "
                           "keep them (a new or empty directory; default: a temporary one, "
                           "removed)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return

  size = dict(SIZES[args.size])
  for key in ("hidden", "heads", "kv_heads", "layers"):
    if getattr(args, key) is not None:
      size[key] = getattr(args, key)
  if size["hidden"] % size["heads"] or size["heads"] % size["kv_heads"]:
    parser.error(f"--hidden {size['hidden']} must be a multiple of --heads {size['heads']}, "
                 f"and --heads of --kv-heads {size['kv_heads']}")
  if args.repeat < 1:
    parser.error(f"--repeat must be at least 1, got {args.repeat}")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  unknown = sorted(set(runs) - set(DEFAULT_RUNS) - set(EXTRA_RUNS))
  if unknown:
    choices = ", ".join(DEFAULT_RUNS + list(EXTRA_RUNS))
    parser.error(f"--runs: unknown {unknown}; choose from {choices}")
  alpha = 2.0 * args.rank if args.alpha is None else args.alpha
  custom = any(getattr(args, k) is not None for k in ("hidden", "heads", "kv_heads", "layers"))
  suffix = ("" if args.size == "small" else f"_{args.size}") + ("_custom" if custom else "")
  json_path = args.json or os.path.join(ROOT, "benchmarks", "results", f"peers{suffix}.json")
  log_path = args.log or os.path.splitext(json_path)[0] + ".log"
  lines: list[str] = []

  def log(text: str) -> None:
    print(text, flush=True)
    lines.append(text)

  head = size["hidden"] // size["heads"]
  results = {"command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
             "machine": machine(), "size": size, "adapters": args.adapters, "rank": args.rank,
             "lora_alpha": alpha, "seed": args.seed, "top_k": args.top_k,
             "drop_rate": args.drop_rate, "svd_rank": args.svd_rank or args.rank,
             "compile_cache": args.compile_cache,
             "shapes": {"q_proj": [size["hidden"]] * 2, "o_proj": [size["hidden"]] * 2,
                        "k_proj": [size["kv_heads"] * head, size["hidden"]],
                        "v_proj": [size["kv_heads"] * head, size["hidden"]]}}
  log(f"command: {results['command']}")
  log("machine: nproc " + results["machine"]["nproc"] + ", " + results["machine"]["cpu_model"]
      + ", load " + " ".join(f"{x:.2f}" for x in results["machine"]["load_average_at_start"]))
  log(results["machine"]["free_g"])
  if args.workdir:
    if os.path.exists(args.workdir) and os.listdir(args.workdir):
      parser.error(f"--workdir {args.workdir}: not empty; give a new or empty directory")
    os.makedirs(args.workdir, exist_ok=True)
    root = os.path.abspath(args.workdir)
  else:
    root = tempfile.mkdtemp(prefix="knots_peers_")
  try:
    start = time.perf_counter()
    made = measure({"run": "make_files", "root": root, "size": size, "seed": args.seed,
                    "adapters": args.adapters, "rank": args.rank, "alpha": alpha})
    results["versions"] = made["versions"]
    files = made["adapters"]
    mib = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) for p in files) / 2**20
    log(f"wrote a random Llama ({size}) and {args.adapters} PEFT adapters of rank {args.rank} "
        f"(lora_alpha {alpha:g}; {mib:.1f} MiB) in {time.perf_counter() - start:.1f}s; "
        f"versions {made['versions']}")
    start = time.perf_counter()
    reference = task_arithmetic_sum(files)
    log(f"exact task-arithmetic sum in float64 NumPy ({len(reference)} modules) in "
        f"{time.perf_counter() - start:.1f}s")
    common = {"base": made["base"], "adapters": files, "seed": args.seed,
              "top_k": args.top_k, "ties_density": args.top_k / 100, "drop_rate": args.drop_rate,
              "svd_rank": args.svd_rank, "torch_device": args.torch_device,
              "compile_cache": args.compile_cache}
    out = results["runs"] = {}
    for run in runs:
      spec = {**common, "run": run, "out": os.path.join(root, "out", run)}
      repeats = []
      for _ in range(args.repeat):
        shutil.rmtree(spec["out"], ignore_errors=True)
        repeats.append(measure(spec))
      cold_totals = [x["seconds"]["cold"]["total"] for x in repeats]
      r = repeats[int(np.argsort(cold_totals)[len(repeats) // 2])]   # the median cold run
      r["cold_totals_of_all_runs"] = cold_totals
      r["warm_totals_of_all_runs"] = [x["seconds"]["warm"]["total"] for x in repeats]
      if r["merged_dir"]:
        r["rank"] = adapter_rank(r["merged_dir"])
        r["rel_error_to_ta"] = relative_error(r["merged_dir"], reference)
      else:   # dense TIES: merged in memory, not written
        r["rel_error_to_ta"] = float("nan")
      out[run] = r
      cold, warm = r["seconds"]["cold"], r["seconds"]["warm"]
      log(f"{run:>22}: rank {r['rank']:>3}, cold " + ", ".join(f"{k} {v:.3f}s"
                                                               for k, v in cold.items())
          + f" | warm total {warm['total']:.3f}s (merge {warm['merge']:.3f}s)"
          + f" | rel. error to TA {r['rel_error_to_ta']:.3e}"
          + f" | load before {r['load_average_before'][0]:.2f}"
          + (f" | [median of {args.repeat}: cold totals "
             + ", ".join(f"{x:.2f}" for x in cold_totals) + "; warm totals "
             + ", ".join(f"{x:.2f}" for x in r["warm_totals_of_all_runs"]) + "]"
             if args.repeat > 1 else ""))
    for run, r in out.items():
      paired = PAIRED_WITH.get(run)
      if paired in out:
        for phase in ("cold", "warm"):
          r[f"{phase}_total_over_paired"] = (r["seconds"][phase]["total"]
                                             / out[paired]["seconds"][phase]["total"])
          r[f"{phase}_merge_over_paired"] = (r["seconds"][phase]["merge"]
                                             / out[paired]["seconds"][phase]["merge"])
        for phase in ("cold", "warm"):
          r[f"best_{phase}_total_over_paired"] = (min(r[f"{phase}_totals_of_all_runs"])
                                                  / min(out[paired][f"{phase}_totals_of_all_runs"]))
        r["paired_with"] = paired
        if run.startswith("dense_") or run == "authors_core_ties":
          core = dict(read_lora_deltas(out[paired]["merged_dir"]))
          r["rel_difference_to_core"] = relative_error(r["merged_dir"], core)
        log(f"{run:>22} / {paired}: total {r['cold_total_over_paired']:.2f}x cold, "
            f"{r['warm_total_over_paired']:.2f}x warm; merge {r['cold_merge_over_paired']:.2f}x "
            f"cold, {r['warm_merge_over_paired']:.2f}x warm (the median runs); best total "
            f"{r['best_cold_total_over_paired']:.2f}x cold, "
            f"{r['best_warm_total_over_paired']:.2f}x warm"
            + (f"; rel. difference to the core path {r['rel_difference_to_core']:.2e}"
               if "rel_difference_to_core" in r else ""))
    for r in out.values():
      merged = r.pop("merged_dir")
      if args.workdir and merged:
        r["merged_adapter"] = os.path.relpath(merged, root)
    if args.workdir:
      results["workdir"] = {"base": os.path.relpath(made["base"], root),
                            "adapters": [os.path.relpath(p, root) for p in files]}
    results["load_average_at_end"] = list(os.getloadavg())
    log("")
    log(table(results))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(results, f, indent=2)
    with open(log_path, "w") as f:
      f.write("\n".join(lines) + "\n")
    log(f"results: {json_path}, {log_path}")
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
