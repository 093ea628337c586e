r"""Trains the offline benchmark's files into assets/offline/ (base ViT, heads, 8 LoRA adapters).

  python scripts/train_offline_assets.py                      # from the repository root
  python scripts/train_offline_assets.py --config quick --out /tmp/assets

Pretrains the small CLIP ViT on procedural scenes, computes the frozen class
heads, fine-tunes one rank-16 LoRA per task with optax (all on the CPU, a few
minutes; configs/offline_benchmark.py says how), and writes the directory
atomically with a manifest.json of how it was made. Deterministic given the
config's seed (on one machine and library version).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from knots_jax.experiments.offline import assets  # noqa: E402


def load_config(arg: str | None):
  """`get_config(arg)` of configs/offline_benchmark.py."""
  path = os.path.join(ROOT, "configs", "offline_benchmark.py")
  spec = importlib.util.spec_from_file_location("offline_benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="", help="presets / key=value items of "
                      "configs/offline_benchmark.py, e.g. `quick` or `lora.steps=200`")
  parser.add_argument("--out", default=os.path.join(ROOT, "assets", "offline"),
                      help="output directory (default: assets/offline)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  out = os.path.abspath(args.out)
  base = os.path.join(out, assets.BASE_DIR)
  inside = os.path.commonpath([base, ROOT]) == ROOT
  manifest = assets.build_assets(config, out, overwrite=args.overwrite, progress=True,
                                 base_model_name=os.path.relpath(base, ROOT) if inside else base)
  summary = {t: round(r["val_accuracy"], 3) for t, r in manifest["adapters"].items()}
  print(json.dumps({"out": out, "seconds": round(manifest["seconds"], 1),
                    "pretrain_log": manifest["pretrain_log"], "val_accuracy": summary}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
