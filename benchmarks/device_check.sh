#!/usr/bin/env bash
# Device check: the figures of docs/performance.md on an accelerator machine, in one go.
#
#   benchmarks/device_check.sh OUTDIR           # Llama-3-8B shapes; < 5 min on one GPU
#   benchmarks/device_check.sh --tiny OUTDIR    # tiny sizes, seconds on a CPU (the test)
#
# For a machine whose Python already has jax (with CUDA), flax, optax, orbax,
# transformers, peft and safetensors, but not ml_collections, and where
# `pip install -e .` may not have been run: the repository is put on PYTHONPATH.
# Steps, each in its own process(es), each log in OUTDIR/<step>.log:
#
#   devices      `nvidia-smi -L` and `jax.devices()`: OUTDIR/devices.json
#   imports      the merge path imported with ml_collections blocked; what pulls
#                it in, if anything (the traceback's import chain): imports.json
#   merge_speed  benchmarks/merge_speed.py: KnOTS-TIES of 6 rank-16 adapters on
#                q, k, v, o of 32 Llama-3-8B layers, files to merged adapter, cold
#                and warm (the dense float64 path is left out: too slow for the
#                budget; DEVICE_CHECK_DENSE_MODULES=1 times one module of each
#                shape): merge_speed.json
#   backbone_io  benchmarks/backbone_io.py's full-model write, 1.1 B parameters in
#                bf16: the plain read + write and ours (merge + save_merged_model),
#                one fresh process each: backbone_io.json
#   sharded      KnOTS-TIES with every stack sharded over a mesh of all local
#                devices (`make_mesh()`), cold and warm, against the same merge
#                unsharded; KnOTS-TA sharded against sum_i s_i B_i A_i in float64
#                NumPy (on layers 0 and 31; every module with --tiny): sharded.json
#
# Every figure is written as JSON; OUTDIR/summary.json lists the steps, their exit
# status and wall time. The exit status is 0 when every step succeeded and the
# merge path imports without ml_collections. PYTHON (default: python) chooses the
# interpreter, DEVICE_CHECK_STEP_TIMEOUT (default 240 s) the limit of each step;
# KNOTS_JAX_COMPILE_CACHE is `off` unless set (cold figures include compilation).
# With --tiny, the adapters and the merged KnOTS-TA adapter of the sharded step stay
# in OUTDIR/sharded_files/ so that a test can check them against its own reference.

set -u -o pipefail

usage() {
  echo "usage: benchmarks/device_check.sh [--tiny] OUTDIR"
}

TINY=0
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "device_check.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *)
      if [ -n "$OUTDIR" ]; then
        echo "device_check.sh: one OUTDIR only (got '$OUTDIR' and '$1')" >&2; usage >&2; exit 2
      fi
      OUTDIR=$1; shift ;;
  esac
done
if [ -z "$OUTDIR" ]; then
  echo "device_check.sh: OUTDIR is missing" >&2; usage >&2; exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUTDIR" || { echo "device_check.sh: cannot create OUTDIR '$OUTDIR'" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DEVICE_CHECK_OUT="$OUTDIR" DEVICE_CHECK_TINY="$TINY"
# cold figures include jit compilation unless the caller names a cache directory
export KNOTS_JAX_COMPILE_CACHE="${KNOTS_JAX_COMPILE_CACHE:-off}"
PYTHON=${PYTHON:-python}
STEP_TIMEOUT=${DEVICE_CHECK_STEP_TIMEOUT:-240}
DENSE_MODULES=${DEVICE_CHECK_DENSE_MODULES:-0}
STEPS="$OUTDIR/steps.jsonl"
: > "$STEPS"
START=$(date +%s.%N)
FAILED=0

# step NAME COMMAND...: runs COMMAND under `timeout`, output to OUTDIR/NAME.log,
# and records {name, rc, seconds} in steps.jsonl.
step() {
  local name=$1; shift
  local begin end rc
  begin=$(date +%s.%N)
  echo "== $name: $*" | tee "$OUTDIR/$name.log"
  timeout "$STEP_TIMEOUT" "$@" >> "$OUTDIR/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$begin" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $seconds}" >> "$STEPS"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    echo "== $name FAILED (rc $rc; 124: over the ${STEP_TIMEOUT}s limit)," \
      "last lines of $OUTDIR/$name.log:"
    tail -n 15 "$OUTDIR/$name.log"
  else
    echo "== $name done in ${seconds}s"
  fi
}

# ------------------------------------------------------------------- devices
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi -L > "$OUTDIR/nvidia_smi.txt" 2>&1 || true
else
  echo "nvidia-smi: not found on this machine" > "$OUTDIR/nvidia_smi.txt"
fi
step devices "$PYTHON" - <<'EOF'
"""jax.devices() and nvidia-smi -L as JSON."""
import json, os, platform, time
start = time.perf_counter()
import jax
out = os.environ["DEVICE_CHECK_OUT"]
devices = jax.devices()
info = {"jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in devices], "device_kinds": [d.device_kind for d in devices],
        "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
        "nvidia_smi_L": open(os.path.join(out, "nvidia_smi.txt")).read().splitlines(),
        "nproc": os.cpu_count(), "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_platforms": os.environ.get("JAX_PLATFORMS", ""),
        "knots_jax_compile_cache": os.environ.get("KNOTS_JAX_COMPILE_CACHE", ""),
        "seconds": {"import jax + list devices": time.perf_counter() - start}}
print(json.dumps(info, indent=2))
with open(os.path.join(out, "devices.json"), "w") as f:
  json.dump(info, f, indent=2)
EOF

# ------------------------------------------------------------------- imports
step imports "$PYTHON" - <<'EOF'
"""The merge path with ml_collections blocked; on failure, the chain of imports that
reached it (from the traceback)."""
import importlib, json, os, sys, time, traceback
sys.modules["ml_collections"] = None   # `import ml_collections` now raises ImportError
MERGE_PATH = ["knots_jax", "knots_jax.adapters", "knots_jax.alignment", "knots_jax.merging",
              "knots_jax.export", "knots_jax.export.full_model", "knots_jax.parallel.sharding",
              # what benchmarks/merge_speed.py and backbone_io.py import besides the above
              "knots_jax.alignment.knots_svd", "knots_jax.export.peft_adapter",
              "knots_jax.export.orbax_model", "knots_jax.io.hf_checkpoint"]
# These read ml_collections configs; needing it is expected (informational).
CONFIG_LAYER = ["knots_jax.pipeline", "knots_jax.cli.main"]


def chain(error: BaseException) -> list[str]:
  """`file:line: code` of every frame of the import, innermost last."""
  return [f"{os.path.relpath(f.filename)}:{f.lineno}: {f.line}"
          for f in traceback.extract_tb(error.__traceback__)
          if "importlib._bootstrap" not in f.filename]


report = {"merge_path": {}, "config_layer": {}}
start = time.perf_counter()
for group, modules in (("merge_path", MERGE_PATH), ("config_layer", CONFIG_LAYER)):
  for name in modules:
    try:
      importlib.import_module(name)
      report[group][name] = {"ok": True}
    except Exception as e:   # noqa: BLE001  (any failure is the finding)
      report[group][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "import_chain": chain(e)}
report["seconds"] = {"imports": time.perf_counter() - start}
report["ok"] = all(r["ok"] for r in report["merge_path"].values())
print(json.dumps(report, indent=2))
with open(os.path.join(os.environ["DEVICE_CHECK_OUT"], "imports.json"), "w") as f:
  json.dump(report, f, indent=2)
for name, r in report["merge_path"].items():
  if not r["ok"]:
    print(f"{name} does not import without ml_collections: {r['error']}\n  "
          + "\n  ".join(r["import_chain"]), file=sys.stderr)
sys.exit(0 if report["ok"] else 1)
EOF

# --------------------------------------------------------------- merge_speed
if [ "$TINY" = 1 ]; then
  MERGE_SPEED_SIZE=(--layers 2 --scale-hidden 64 --adapters 3 --rank 4)
else
  MERGE_SPEED_SIZE=()
fi
step merge_speed "$PYTHON" benchmarks/merge_speed.py \
  ${MERGE_SPEED_SIZE[@]+"${MERGE_SPEED_SIZE[@]}"} \
  --dense-modules "$DENSE_MODULES" --json "$OUTDIR/merge_speed.json"

# --------------------------------------------------------------- backbone_io
step backbone_io "$PYTHON" - <<'EOF'
"""backbone_io.py's plain read + write and ours, one fresh process each (its `measure`).

This process never starts a jax backend (no `backbone_io.machine()`, which lists the
devices): on a GPU it would take most of the memory before the `ours` process starts."""
import json, os, platform, shutil, tempfile, time
from benchmarks import backbone_io
tiny = os.environ["DEVICE_CHECK_TINY"] == "1"
size = (dict(vocab=512, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, shard="1MB")
        if tiny else backbone_io.FULL)
adapters, rank = (3, 4) if tiny else (6, 16)
machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
           "load_average_at_start": list(os.getloadavg()),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
results = {"machine": machine, "size": size, "adapters": adapters, "rank": rank, "repeat": 1}
root = tempfile.mkdtemp(prefix="device_check_backbone_")
try:
  start = time.perf_counter()
  base = os.path.join(root, "base")
  results["base"] = backbone_io.write_base(base, size)
  paths = backbone_io.write_adapters(os.path.join(root, "adapters"), size, adapters, rank)
  results["seconds"] = {"write the base model and the adapters": time.perf_counter() - start}
  largest = results["base"]["largest_shard_bytes"] / 2**20
  for mode in ("plain", "ours"):
    spec = {"base": base, "out": os.path.join(root, f"out_{mode}"), "adapters": paths,
            "shard": size["shard"]}
    os.sync()
    r = results[mode] = backbone_io.measure(mode, spec)
    r["peak_rss_over_largest_shard"] = r["peak_rss_mib"] / largest
    shutil.rmtree(spec["out"], ignore_errors=True)
    print(f"{mode}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["seconds"].items())
          + f"; peak RSS {r['peak_rss_mib']:.0f} MiB")
  results["ratios"] = {"ours_total_over_plain": results["ours"]["seconds"]["total"]
                                                / results["plain"]["seconds"]["total"]}
  print(f"ours / plain: {results['ratios']['ours_total_over_plain']:.2f}x")
finally:
  shutil.rmtree(root, ignore_errors=True)
with open(os.path.join(os.environ["DEVICE_CHECK_OUT"], "backbone_io.json"), "w") as f:
  json.dump(results, f, indent=2)
EOF

# ------------------------------------------------------------------- sharded
step sharded "$PYTHON" - <<'EOF'
"""KnOTS-TIES sharded over all local devices against unsharded; KnOTS-TA against NumPy."""
import json, math, os, shutil, tempfile, time
import jax
import numpy as np
import knots_jax
from knots_jax.parallel.sharding import make_mesh
from benchmarks.merge_speed import write_adapters   # (enables jax x64, as merge_speed runs)
from benchmarks.peers import adapter_modules, read_lora_deltas, task_arithmetic_sum

out = os.environ["DEVICE_CHECK_OUT"]
tiny = os.environ["DEVICE_CHECK_TINY"] == "1"
layers, n, rank, scale_hidden = (2, 3, 4, 64) if tiny else (32, 6, 16, 1)
root = (os.path.join(out, "sharded_files") if tiny
        else tempfile.mkdtemp(prefix="device_check_sharded_"))
shutil.rmtree(root, ignore_errors=True)
os.makedirs(root)


def rel_diff(path: str, reference: dict) -> float:
  found = dict(read_lora_deltas(path, sorted(reference)))
  num = sum(float(np.sum((found[m] - ref) ** 2)) for m, ref in reference.items())
  den = sum(float(np.sum(ref ** 2)) for ref in reference.values())
  return math.sqrt(num / den)


def job(paths, method, merged_dir, mesh, **options):
  """Files to a written merged adapter, timed by phase."""
  t, start = {}, time.perf_counter()
  adapters = knots_jax.load_adapters(paths)
  t["load"] = time.perf_counter() - start
  start = time.perf_counter()
  result = knots_jax.merge(adapters, method, mesh=mesh, **options)
  jax.block_until_ready([(s.b, s.a, s.delta) for s in result.stacks])
  t["merge"] = time.perf_counter() - start
  start = time.perf_counter()
  knots_jax.save_peft_adapter(result, merged_dir, overwrite=True)
  t["write"] = time.perf_counter() - start
  t["total"] = t["load"] + t["merge"] + t["write"]
  return t


try:
  start = time.perf_counter()
  paths = write_adapters(os.path.join(root, "adapters"), n, rank, layers, scale_hidden)
  written = time.perf_counter() - start
  mesh = make_mesh()
  devices = [str(d) for d in jax.devices()]
  print(f"mesh of {len(devices)} devices: {devices}")
  results = {"devices": devices, "mesh_shape": dict(mesh.shape), "layers": layers,
             "adapters": n, "rank": rank, "scale_hidden": scale_hidden,
             "jax_enable_x64": bool(jax.config.jax_enable_x64),
             "seconds": {"write adapters": written}}
  d = lambda name: os.path.join(root, name)
  results["knots_ties_sharded"] = {"seconds": {
      "cold": job(paths, "knots_ties", d("ties_sharded"), mesh, top_k=30),
      "warm": job(paths, "knots_ties", d("ties_sharded"), mesh, top_k=30)}}
  results["knots_ties_unsharded"] = {"seconds": {
      "cold": job(paths, "knots_ties", d("ties_unsharded"), None, top_k=30)}}
  results["knots_ta_sharded"] = {"seconds": {
      "cold": job(paths, "knots_ta", d("merged_ta"), mesh)}}
  # checked modules: all with --tiny, else the first and the last layer
  modules = adapter_modules(d("merged_ta"))
  if not tiny:
    modules = [m for m in modules if m.split(".layers.")[1].split(".")[0] in ("0", str(layers - 1))]
  unsharded = dict(read_lora_deltas(d("ties_unsharded"), modules))
  reference = task_arithmetic_sum(paths, modules)
  results["checks"] = {
      "modules_checked": len(modules),
      "knots_ties_sharded_vs_unsharded_rel_diff": rel_diff(d("ties_sharded"), unsharded),
      "knots_ta_sharded_vs_numpy_rel_error": rel_diff(d("merged_ta"), reference)}
  print(json.dumps(results, indent=2))
  with open(os.path.join(out, "sharded.json"), "w") as f:
    json.dump(results, f, indent=2)
finally:
  for name in ("ties_sharded", "ties_unsharded"):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  if not tiny:
    shutil.rmtree(root, ignore_errors=True)
EOF

# ------------------------------------------------------------------- summary
END=$(date +%s.%N)
"$PYTHON" - "$STEPS" "$START" "$END" "$TINY" <<'EOF'
import json, os, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
total = float(sys.argv[3]) - float(sys.argv[2])
summary = {"tiny": sys.argv[4] == "1", "steps": steps, "total_seconds": total,
           "ok": all(s["rc"] == 0 for s in steps), "under_5_minutes": total < 300}
with open(os.path.join(os.path.dirname(sys.argv[1]), "summary.json"), "w") as f:
  json.dump(summary, f, indent=2)
parts = ", ".join("%s %.1fs rc %d" % (s["name"], s["seconds"], s["rc"]) for s in steps)
print("device check: %s in %.1fs (%s)" % ("ok" if summary["ok"] else "FAILED", total, parts))
EOF
exit "$FAILED"
