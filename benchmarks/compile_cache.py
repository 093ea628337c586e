"""First and second fresh-process merges with JAX's persistent compilation cache.

  python benchmarks/compile_cache.py [--repeat 3]

Runs `knots-jax merge --config configs/demo.py` (KnOTS-TIES of the three shipped
adapters, files to a written adapter and merged weights) in fresh processes: once
with the cache off, then twice with a new, empty cache directory (the first
fills it, the second loads from it). Wall time of each process, including
Python's start and JAX's import. Writes benchmarks/results/compile_cache.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cache: str, out: str) -> float:
  env = {**os.environ, "KNOTS_JAX_COMPILE_CACHE": cache}
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "knots_jax.cli.main", "merge", "--config",
                  os.path.join(ROOT, "configs", "demo.py"), f"--config.output={out}",
                  "--config.progress=false"], env=env, check=True, capture_output=True,
                 cwd=ROOT)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=3)
  args = parser.parse_args()
  rows = []
  for _ in range(args.repeat):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, "cache")
      rows.append({"no cache": _run("off", os.path.join(tmp, "o0")),
                   "first (fills the cache)": _run(cache, os.path.join(tmp, "o1")),
                   "second (loads it)": _run(cache, os.path.join(tmp, "o2"))})
  median = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
  record = {"command": "python benchmarks/compile_cache.py", "machine": {
      "cpus": os.cpu_count(), "processor": platform.processor(), "python": platform.python_version()},
      "runs": rows, "median_seconds": median}
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  with open(os.path.join(ROOT, "benchmarks", "results", "compile_cache.json"), "w") as f:
    json.dump(record, f, indent=2)
  for k, v in median.items():
    print(f"{k:<26} {v:6.2f} s")


if __name__ == "__main__":
  main()
