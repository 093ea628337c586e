"""The benchmark's trained files: made once by `build_assets`, read by `load_assets`.

Layout of an assets directory (shipped in assets/offline/, or a cache):

    base/                       the pretrained ViT: config.json + model.safetensors
                                (clip.save_pretrained; transformers loads it)
    adapters/<task>/            one PEFT LoRA adapter per task: adapter_config.json +
                                adapter_model.safetensors (knots_jax.load_adapters and
                                peft.PeftModel read it)
    heads.safetensors           the frozen class heads (heads.py)
    manifest.json               how they were made: the training config, losses,
                                accuracies, library versions, seconds

Everything is written into a temporary directory that replaces the target
only when complete (outputs.atomic_output_dir).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Mapping

import flax
import jax
import ml_collections
import numpy as np
import optax
import safetensors.numpy

from knots_jax.experiments.offline import heads as heads_lib
from knots_jax.experiments.offline import tasks as tasks_lib
from knots_jax.experiments.offline import training, vit
from knots_jax.export import peft_adapter
from knots_jax.io import output_dir
from knots_jax.models import clip, lora

MANIFEST = "manifest.json"
# Bumped when the data, the model or the training code change what a config produces:
# a cache of another version is rebuilt, shipped assets of another version are refused.
ASSETS_VERSION = 1
BASE_DIR = "base"
ADAPTERS_DIR = "adapters"
_METADATA = {"format": "pt"}
# The parts of the config that decide the trained files (a cache is reused only if they match).
TRAINING_KEYS = ("seed", "tasks", "data", "model", "pretrain", "heads", "lora")


def task_names(config: ml_collections.ConfigDict) -> list[str]:
  """The config's comma-separated tasks, checked against tasks.TASKS."""
  names = [t.strip() for t in str(config.tasks).split(",") if t.strip()]
  if not names:
    raise ValueError("config.tasks is empty; give a comma-separated list of "
                     f"{', '.join(tasks_lib.TASKS)}")
  for name in names:
    tasks_lib.get_task(name)
  if len(set(names)) != len(names):
    raise ValueError(f"config.tasks repeats a task: {names}")
  return names


def training_config(config: ml_collections.ConfigDict) -> dict:
  """The JSON form of the config entries that decide the trained files."""
  picked = {k: config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
            else config[k] for k in TRAINING_KEYS}
  return json.loads(json.dumps(picked))


def save_adapter(factors: Mapping[str, tuple[np.ndarray, np.ndarray]], out_dir: str, *,
                 rank: int, alpha: float, base_model: str) -> None:
  """Writes LoRA factors {module: (a [r, in], b [out, r])} as a PEFT adapter directory."""
  modules = sorted(factors)
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
      "r": int(rank), "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
      "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
      "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
      "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
  }
  tensors = {}
  for m in modules:
    a, b = factors[m]
    tensors[f"{peft_adapter.PEFT_PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
    tensors[f"{peft_adapter.PEFT_PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
  os.makedirs(out_dir)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, peft_adapter.ADAPTER_WEIGHTS),
                              metadata=_METADATA)
  output_dir.write_json(os.path.join(out_dir, peft_adapter.ADAPTER_CONFIG), config)


def _accuracy(model, split: tasks_lib.Split, heads: heads_lib.ClassHeads) -> float:
  logits = heads.logits(vit.embed(model, split.images), split.label_names)
  return float(np.mean(np.argmax(logits, 1) == split.labels))


def environment() -> dict:
  """The machine and library versions, for a manifest or a results file."""
  return {"python": platform.python_version(), "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "backend": jax.default_backend()}


def build_assets(config: ml_collections.ConfigDict, out_dir: str, *, base_model_name: str | None = None,
                 overwrite: bool = False, progress: bool = False) -> dict:
  """Pretrains the ViT, computes the heads, fine-tunes one LoRA per task; writes `out_dir`.

  Returns the manifest. `base_model_name` is recorded in every adapter's
  `base_model_name_or_path` (default: the absolute path of `out_dir/base`).
  """
  output_dir.check_output_dir(out_dir, overwrite)
  start = time.perf_counter()
  names = task_names(config)
  size = config.model.image_size
  vit_config = vit.vit_config(config.model)
  model, pre_log = training.pretrain(vit_config, config.pretrain, seed=config.seed,
                                     progress=progress)
  train = {t: tasks_lib.make_split(t, "train", config.data.train, seed=config.seed, size=size)
           for t in names}
  val = {t: tasks_lib.make_split(t, "val", config.data.val, seed=config.seed, size=size)
         for t in names}
  heads = heads_lib.prototype_heads(
      {t: vit.embed(model, s.images) for t, s in train.items()},
      {t: s.labels for t, s in train.items()}, {t: s.label_names for t, s in train.items()},
      config.heads.logit_scale, center=config.heads.center)
  adapters, records = {}, {}
  for i, t in enumerate(names):
    factors, log = training.finetune_lora(
        model, train[t], heads.matrix(train[t].label_names), heads.logit_scale, config.lora,
        seed=config.seed * 1000 + i + 1, progress=progress)
    adapters[t] = factors
    zero_shot = _accuracy(model, val[t], heads)
    for name, (a, b) in factors.items():
      lora.linears(model)[name].set_lora(a, b, config.lora.alpha / config.lora.rank)
    records[t] = {"train_log": log.to_dict(), "val_accuracy": _accuracy(model, val[t], heads),
                  "zero_shot_val_accuracy": zero_shot, "labels": list(train[t].label_names)}
    lora.detach_adapters(model)
  manifest = {
      "about": "knots_jax offline benchmark: base ViT, class heads and LoRA adapters "
               "(knots_jax/offline, docs/offline_benchmark.md)",
      "assets_version": ASSETS_VERSION, "config": training_config(config), "tasks": names,
      "pretrain_log": pre_log.to_dict(), "adapters": records,
      "environment": environment(), "seconds": time.perf_counter() - start,
  }
  with output_dir.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    clip.save_pretrained(model, os.path.join(tmp, BASE_DIR))
    base_name = base_model_name or os.path.join(os.path.abspath(out_dir), BASE_DIR)
    for t in names:
      save_adapter(adapters[t], os.path.join(tmp, ADAPTERS_DIR, t), rank=config.lora.rank,
                   alpha=config.lora.alpha, base_model=base_name)
    heads_lib.save_heads(heads, os.path.join(tmp, heads_lib.HEADS_FILE))
    output_dir.write_json(os.path.join(tmp, MANIFEST), manifest)
  return manifest


@dataclasses.dataclass(frozen=True)
class Assets:
  """Paths and contents of an assets directory."""
  root: str
  base_dir: str
  adapter_dirs: Mapping[str, str]
  heads: heads_lib.ClassHeads
  manifest: Mapping[str, object]


def read_manifest(root: str) -> dict:
  path = os.path.join(root, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path}: missing; `{root}` is not an offline-benchmark assets directory "
                     "(make one with scripts/train_offline_assets.py)") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot be read ({e})") from e
  if not isinstance(manifest, dict) or "tasks" not in manifest or "config" not in manifest:
    raise ValueError(f"{path}: not an offline-benchmark manifest (no `tasks` / `config`)")
  return manifest


def load_assets(root: str, tasks: list[str] | None = None) -> Assets:
  """Reads an assets directory, checking that it holds every file of `tasks` (default: all)."""
  manifest = read_manifest(root)
  names = list(manifest["tasks"]) if tasks is None else list(tasks)
  missing = [t for t in names if t not in manifest["tasks"]]
  if missing:
    raise ValueError(f"{os.path.join(root, MANIFEST)}: no adapter for task(s) {missing}; the "
                     f"assets hold {manifest['tasks']}")
  base_dir = os.path.join(root, BASE_DIR)
  needed = [os.path.join(base_dir, "config.json"), os.path.join(root, heads_lib.HEADS_FILE)]
  adapter_dirs = {t: os.path.join(root, ADAPTERS_DIR, t) for t in names}
  for d in adapter_dirs.values():
    needed += [os.path.join(d, peft_adapter.ADAPTER_CONFIG), os.path.join(d, peft_adapter.ADAPTER_WEIGHTS)]
  absent = [p for p in needed if not os.path.isfile(p)]
  if absent:
    raise ValueError(f"{root}: incomplete assets directory; missing {absent[:3]}"
                     + (f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""))
  heads = heads_lib.load_heads(os.path.join(root, heads_lib.HEADS_FILE))
  return Assets(root, base_dir, adapter_dirs, heads, manifest)


__all__ = ["Assets", "build_assets", "load_assets", "read_manifest", "save_adapter",
           "task_names", "training_config", "environment", "MANIFEST"]
