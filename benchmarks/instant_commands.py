"""Wall time of the commands that compute nothing, each in a fresh process.

  python benchmarks/instant_commands.py [--repeat 5]

`knots-jax --help`, `methods`, `presets`, `merge --help`, a config typo and the
dry run of the demo job (`configs/demo.py`: three float32 PEFT adapters and a
base model, read and checked). None imports JAX (tests/test_layout.py checks
that). Best and median of `--repeat` runs, including Python's start; writes
benchmarks/results/instant_commands.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "--help": ["--help"],
    "methods": ["methods"],
    "presets": ["presets"],
    "merge --help": ["merge", "--help"],
    "config typo": ["merge", "--config", "configs/merge.py", "--config.topk=3"],
    "dry run (demo)": ["merge", "--config", "configs/demo.py", "--config.dry_run=true"],
}


def _seconds(argv) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "knots_jax.cli.main", *argv], cwd=ROOT,
                 capture_output=True, check=False)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=5)
  args = parser.parse_args()
  rows = {}
  for name, argv in COMMANDS.items():
    times = [_seconds(argv) for _ in range(args.repeat)]
    rows[name] = {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
    print(f"{name:16s} best {min(times):.2f} s, median {statistics.median(times):.2f} s")
  record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "python": platform.python_version(), "repeat": args.repeat, "commands": rows}
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  with open(os.path.join(ROOT, "benchmarks", "results", "instant_commands.json"), "w") as f:
    json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
