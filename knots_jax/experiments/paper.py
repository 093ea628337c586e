"""The paper's ViT evaluation on real data: eight tasks, CLIP heads, every merge's table.

`run_paper_vision(config)` (configs/vit_b32_8tasks.py, configs/vit_l14_8tasks.py)
is the offline benchmark's pipeline (knots_jax.experiments.offline.benchmark: zero-shot,
fine-tuned, ensemble, the linear search of every method, joint task) with
the pieces read from disk instead of made:

* the base model: a HF CLIP directory (`CLIPModel` or
  `CLIPVisionModelWithProjection`, safetensors), `config.model_dir`;
* the adapters: PEFT directories `<config.adapters_root>/<task>`;
* the heads: `<config.heads_dir>/<task>.safetensors`, one `heads.ClassHeads`
  per task (scripts/make_clip_heads.py: CLIP's zero-shot text heads);
* the data: `config.datasets.<task>` (evaluation/real_data.py), val split for
  the search, test split for the reported numbers, each capped at
  `config.max_examples.<split>` images (the Evaluator holds them in memory).

The joint task's head of a label name shared by several tasks (MNIST's and
SVHN's "0" ... "9") is the first such task's text embedding, in task order.

`vision_config` builds the config both ViT files start from; `check_config`
names every path still at its placeholder or missing on disk.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np

import knots_jax
from knots_jax.evaluation import metrics
from knots_jax.experiments import real_data
from knots_jax.experiments.offline import benchmark
from knots_jax.experiments.offline import heads as heads_lib
from knots_jax.io import config_args, output_dir
from knots_jax.models import clip

PLACEHOLDER = "<set root>"
VIT_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")
VIT_METHODS = "ta,ties,dare_ties,knots_ties,knots_dare_ties"
HEADS_SUFFIX = ".safetensors"


# ------------------------------------------------------------------- config


def _dataset(root: str, task: str) -> dict:
  return dict(path=os.path.join(root, "datasets", task),   # save_to_disk dir or image folder
              format="hf",               # `hf` (datasets.save_to_disk) or `folder`
              val_split="validation",    # the search's split; a slice works: `train[-1000:]`
              test_split="test",         # the reported split
              image_key="image",         # hf: image column
              label_key="label")         # hf: ClassLabel column (its names are the classes)


def vision_config(model: str, root: str = PLACEHOLDER) -> ml_collections.ConfigDict:
  """The paper's ViT setting for CLIP `model` (e.g. `clip-vit-base-patch32`) under `root`.

  Default layout: <root>/models/<model>, <root>/adapters/<model>/<task>,
  <root>/heads/<model>/<task>.safetensors, <root>/datasets/<task>.
  """
  c = ml_collections.ConfigDict()
  c.model = model                  # the CLIP's name: default paths and workdir
  c.root = root                    # only used to derive the defaults below
  c.model_dir = os.path.join(root, "models", model)             # HF CLIP dir (safetensors)
  c.adapters_root = os.path.join(root, "adapters", model)       # PEFT dirs <adapters_root>/<task>
  c.heads_dir = os.path.join(root, "heads", model)              # <heads_dir>/<task>.safetensors
  c.tasks = ",".join(VIT_TASKS)    # the paper's eight tasks, in its table order
  c.datasets = {t: _dataset(root, t) for t in VIT_TASKS}
  c.max_examples = dict(val=500,   # images per task for the search (0: all)
                        test=2000)  # images per task reported (0: all; see docs/paper_settings.md)
  c.seed = 0                       # the capped subsets and DARE's masks
  c.methods = VIT_METHODS          # merged with the linear search, in this order
  c.search = dict(                 # the paper's grids (App. C)
      scalings="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
      top_ks="10,20,30,40,50,60,70,80,90,100",
      drop_rates="0.99,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1",
      stop_early=False)            # True: stop at the first worse candidate (the reference)
  c.hits_k = "1,3,5"               # joint-task Hits@k
  c.eval_batch_size = 256          # images per forward pass
  c.workdir = os.path.join("outputs", f"paper_{model}")   # results.json, results.md
  c.overwrite = True               # replace workdir (atomically)
  c.progress = True
  return c


def _quick(c: ml_collections.ConfigDict) -> None:
  c.max_examples = dict(val=50, test=100)
  c.search.update(scalings="0.5,1.0", top_ks="20,100", drop_rates="0.9,0.5")


PRESETS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {"quick": _quick}


def apply_arg(c: ml_collections.ConfigDict, arg: str | None, source: str,
              presets: Mapping[str, Callable] = PRESETS) -> ml_collections.ConfigDict:
  """Presets and `key=value` items (dotted keys reach nested fields), comma-separated.

  `root=` is applied first (it moves every default path); the rest in order.
  A bare word that is not a preset continues the previous value, so lists
  need no quoting: `tasks=mnist,svhn,quick` sets two tasks, then `quick`.
  """
  items, rest = [i.strip() for i in (arg or "").split(",") if i.strip()], []
  for item in items:
    key, sep, value = item.partition("=")
    if sep and key.strip() == "root":
      c = vision_config(c.model, value.strip())
    else:
      rest.append(item)
  return config_args.apply_arg(c, ",".join(rest), presets=presets, source=source)


def task_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [t.strip() for t in config.tasks.split(",") if t.strip()]
  if not names:
    raise ValueError("config.tasks is empty")
  missing = [t for t in names if t not in config.datasets]
  if missing:
    raise ValueError(f"config.tasks: no `datasets.<task>` entry for {missing}; entries: "
                     f"{', '.join(config.datasets.keys())}")
  return names


def adapter_dir(config: ml_collections.ConfigDict, task: str) -> str:
  return os.path.join(config.adapters_root, task)


def heads_path(config: ml_collections.ConfigDict, task: str) -> str:
  return os.path.join(config.heads_dir, task + HEADS_SUFFIX)


def check_paths(paths: Mapping[str, str], files: Mapping[str, str], config_file: str) -> None:
  """ValueError listing every path still at the placeholder, then every missing file.

  Args:
    paths: {config field: path} that must be set.
    files: {what: path} that must exist.
    config_file: the config to name in the example command.
  """
  unset = [k for k, v in paths.items() if PLACEHOLDER in v or not v]
  if unset:
    raise ValueError(f"paths not set: {', '.join(unset)} still hold the placeholder "
                     f"`{PLACEHOLDER}`; give `root=/your/dir` (and/or the fields themselves) "
                     f"after the config file, e.g. --config {config_file}:root=/data "
                     "(layout: docs/paper_settings.md)")
  missing = [f"{k}: {v}" for k, v in files.items() if not os.path.exists(v)]
  if missing:
    raise ValueError("missing on disk (docs/paper_settings.md says how to make them):\n  "
                     + "\n  ".join(missing))


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError listing every path that is still the placeholder, then every missing one."""
  tasks = task_names(config)
  paths = {"model_dir": config.model_dir, "adapters_root": config.adapters_root,
           "heads_dir": config.heads_dir}
  paths.update({f"datasets.{t}.path": config.datasets[t].path for t in tasks})
  files = {"model_dir": os.path.join(config.model_dir, "config.json")}
  files.update({f"adapter of `{t}`": adapter_dir(config, t) for t in tasks})
  files.update({f"heads of `{t}`": heads_path(config, t) for t in tasks})
  files.update({f"datasets.{t}.path": config.datasets[t].path for t in tasks})
  check_paths(paths, files, "configs/vit_b32_8tasks.py")


# -------------------------------------------------------------------- data


def load_splits(config: ml_collections.ConfigDict, tasks: list[str],
                image_size: int) -> dict[str, dict[str, real_data.Split]]:
  """{split: {task: Split}} of the val and test splits, capped by `max_examples`."""
  out: dict[str, dict] = {"val": {}, "test": {}}
  for t in tasks:
    d = config.datasets[t]
    spec = real_data.DatasetSpec(t, d.path, d.format, d.image_key, d.label_key)
    for split, name in (("val", d.val_split), ("test", d.test_split)):
      out[split][t] = real_data.load_split(spec, name, image_size, seed=config.seed,
                                           max_examples=int(config.max_examples[split]))
  return out


def load_task_heads(config: ml_collections.ConfigDict, tasks: list[str],
                    label_names: Mapping[str, tuple[str, ...]]
                    ) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...], dict, float]:
  """Per-task heads [C, D], the union's [U, D], its names and maps, and the logit scale."""
  loaded = {t: heads_lib.load_heads(heads_path(config, t)) for t in tasks}
  scales = {t: h.logit_scale for t, h in loaded.items()}
  if len(set(scales.values())) != 1:
    raise ValueError(f"{config.heads_dir}: the heads files disagree on logit_scale: {scales}")
  task_heads = {}
  for t in tasks:
    try:
      task_heads[t] = loaded[t].matrix(label_names[t])
    except ValueError as e:
      raise ValueError(f"{heads_path(config, t)}: does not match the class names of dataset "
                       f"`{config.datasets[t].path}` ({e}); remake it with "
                       "scripts/make_clip_heads.py") from e
  union_names, maps = metrics.union_labels(label_names)
  first = {}
  for t in tasks:
    for local, u in enumerate(maps[t]):
      first.setdefault(int(u), task_heads[t][local])
  union_head = np.stack([first[u] for u in range(len(union_names))])
  return task_heads, union_head, union_names, maps, float(next(iter(scales.values())))


def make_evaluator(config: ml_collections.ConfigDict, tasks: list[str],
                   adapters: knots_jax.AdapterSet) -> benchmark.Evaluator:
  """The benchmark's Evaluator over the real data and heads of `config`."""
  model = clip.from_pretrained(config.model_dir)
  splits = load_splits(config, tasks, model.config.image_size)
  label_names = {t: splits["test"][t].label_names for t in tasks}
  for t in tasks:
    if splits["val"][t].label_names != label_names[t]:
      raise ValueError(f"task `{t}`: the val and test splits of `{config.datasets[t].path}` "
                       "have different class names")
  task_heads, union_head, union_names, maps, scale = load_task_heads(config, tasks, label_names)
  keys = [f"{m}.weight" for m in adapters.module_names]
  base = {k: np.asarray(v) for k, v in clip.hf_tensors(model).items() if k in keys}
  missing = sorted(set(keys) - set(base))
  if missing:
    raise ValueError(f"{config.model_dir}: the adapters adapt modules the CLIP vision model does "
                     f"not have: {missing[:3]}")
  return benchmark.Evaluator(model, config.model_dir, tasks, splits, task_heads, union_names,
                             maps, union_head, scale, int(config.eval_batch_size), base)


# --------------------------------------------------------------------- entry


def _row(acc: Mapping[str, float], finetuned: Mapping[str, float]) -> dict:
  return metrics.TaskScores.from_accuracies(acc, finetuned).to_dict()


def run_paper_vision(config: ml_collections.ConfigDict) -> dict:
  """Runs the ViT setting of `config`; prints and writes results.json / results.md to workdir."""
  start = time.perf_counter()
  check_config(config)
  output_dir.check_output_dir(config.workdir, config.overwrite)
  tasks = task_names(config)
  ks = tuple(int(k) for k in config.hits_k.split(",") if k.strip())
  adapters = knots_jax.load_adapters([adapter_dir(config, t) for t in tasks], names=tasks)
  ev = make_evaluator(config, tasks, adapters)
  data_seconds = time.perf_counter() - start

  t0 = time.perf_counter()
  ev.use_base()
  zero_val, zero_test = ev.accuracies(ev.embeds("val"), "val"), ev.embeds("test")
  finetuned, ensemble, ensemble_joint = benchmark.evaluate_fine_tuned(ev, adapters, ks,
                                                                      config.progress)
  rows = {"zero_shot": {**_row(ev.accuracies(zero_test, "test"), finetuned["test"]),
                        "joint": ev.joint(zero_test, ks).to_dict(),
                        "val": _row(zero_val, finetuned["val"])},
          "fine_tuned": {**_row(finetuned["test"], finetuned["test"]),
                         "val": _row(finetuned["val"], finetuned["val"])},
          "ensemble": {**_row(ensemble, finetuned["test"]), "joint": ensemble_joint}}
  baselines_seconds = time.perf_counter() - t0
  merged = benchmark.evaluate_merges(ev, adapters, finetuned, config, ks)

  sizes = {s: {t: len(ev.splits[s][t]) for t in tasks} for s in ("val", "test")}
  low, high = min(sizes["test"].values()), max(sizes["test"].values())
  results = {
      "benchmark": "knots_jax: the KnOTS paper's ViT setting on real data "
                   "(docs/paper_settings.md)",
      "tasks": tasks, "methods": [m.strip() for m in config.methods.split(",") if m.strip()],
      "hits_k": list(ks), "test_images": str(low) if low == high else f"{low} to {high}",
      "images": sizes, "union_labels": len(ev.union_names), "union_names": list(ev.union_names),
      "rows": {**rows, **merged["rows"]},
      "seconds": {"data": data_seconds, "baselines": baselines_seconds,
                  "align": merged["align_seconds"], "total": time.perf_counter() - start},
      "config": config.to_dict(),
  }
  text = (f"# KnOTS paper setting: {os.path.basename(os.path.normpath(config.model_dir))}\n\n"
          f"{benchmark.markdown_tables(results)}\n\nTotal time: "
          f"{time.perf_counter() - start:.0f} s ({jax.default_backend()}).\n")
  print(text)
  output_dir.write_results(config.workdir, results, text, overwrite=config.overwrite)
  return results


__all__ = ["PLACEHOLDER", "PRESETS", "VIT_METHODS", "VIT_TASKS", "adapter_dir", "apply_arg",
           "check_config", "heads_path", "load_splits", "load_task_heads", "make_evaluator",
           "run_paper_vision", "task_names", "vision_config"]
