"""The offline benchmark: the KnOTS paper's ViT table on a CPU, in minutes.

`run_benchmark(config)` (config: configs/offline_benchmark.py):

1. assets: the shipped base ViT, class heads and one LoRA adapter per task
   (assets/offline), or, with `config.train`, the same trained from scratch
   into `config.cache_dir` (reused while its training config matches);
2. data: the val and test splits of every task (tasks.py, from `config.seed`);
3. zero-shot: the base model with the frozen heads;
4. fine-tuned: the base with each adapter attached (PEFT's forward), on its
   own task: the accuracies every merge is normalized by; and every
   fine-tuned model on every test image, for the ensemble baseline;
5. merges: the adapters aligned once (`knots_jax.align`), then every method
   of `config.methods` with the paper's linear search
   (`knots_jax.evaluation.linear_search`): alpha, then top-K or DARE's p, on
   the average normalized accuracy over the val splits; the chosen merge is
   loaded into the ViT (`full_model.merged_model_weights`) and scored on test,
   per task and on the joint task (Hits@k over the union of label names);
6. output: Markdown tables printed and written with results.json to
   `config.workdir` (atomically).

The joint task uses each method's setting chosen by the per-task search (the
reference's joint script evaluates fixed, previously chosen settings).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

import knots_jax
from knots_jax.alignment import decompose
from knots_jax.evaluation import metrics, search
from knots_jax.experiments.offline import assets as assets_lib
from knots_jax.experiments.offline import tasks as tasks_lib
from knots_jax.experiments.offline import vit
from knots_jax.export import full_model
from knots_jax.io import output_dir
from knots_jax.merging.result import MergeResult
from knots_jax.methods import registry
from knots_jax.models import clip, lora

RESULTS_JSON, RESULTS_MD = output_dir.RESULTS_JSON, output_dir.RESULTS_MD
# Merges that need data (knots_jax.merging.regmean / fisher): computed from each task's
# val images (unlabeled for RegMean; labels sampled from the model for Fisher),
# no hyper-parameter search.
DATA_METHODS = ("regmean", "fisher")
FISHER_EXAMPLES = 64   # per task
REGMEAN_OFF_DIAGONAL = 0.9   # RegMean's alpha: LayerNorm'd inputs give rank-deficient Grams
DISPLAY = {"regmean": "RegMean", "fisher": "Fisher", "ta": "TA", "ties": "TIES", "dare_ties": "DARE-TIES", "knots_ties": "KnOTS-TIES",
           "knots_dare_ties": "KnOTS-DARE-TIES", "zero_shot": "Zero-shot",
           "fine_tuned": "Fine-tuned", "ensemble": "Ensemble"}


def _floats(text: str, name: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    raise ValueError(f"config.{name}: expected comma-separated numbers, got `{text}`") from None
  if not values:
    raise ValueError(f"config.{name} is empty")
  return values


def _names(text: str) -> list[str]:
  return [v.strip() for v in str(text).split(",") if v.strip()]


# ------------------------------------------------------------------- assets


def _mismatch(manifest: Mapping, wanted: Mapping, *, subset_tasks: bool) -> list[str]:
  """What differs between assets and a training config: `section.field: made -> wanted`."""
  diffs = []
  if manifest.get("assets_version") != assets_lib.ASSETS_VERSION:
    diffs.append(f"assets_version: {manifest.get('assets_version')!r} -> "
                 f"{assets_lib.ASSETS_VERSION!r}")
  made = manifest["config"]
  for key in assets_lib.TRAINING_KEYS:
    a, b = made.get(key), wanted.get(key)
    if key == "tasks" and subset_tasks:
      extra = [t for t in _names(b) if t not in _names(a)]
      if extra:
        diffs.append(f"tasks: {extra} not among {_names(a)}")
      continue
    if key == "data":     # only the training split decides the assets
      a, b = {"train": (a or {}).get("train")}, {"train": (b or {}).get("train")}
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"{key}.{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b))
                if a.get(f) != b.get(f)]
    elif a != b:
      diffs.append(f"{key}: {a!r} -> {b!r}")
  return diffs


def resolve_assets(config: ml_collections.ConfigDict) -> assets_lib.Assets:
  """The shipped assets (checked against the config), or trained ones from the cache."""
  names = assets_lib.task_names(config)
  wanted = assets_lib.training_config(config)
  if not config.train:
    manifest = assets_lib.read_manifest(config.assets)
    diffs = _mismatch(manifest, wanted, subset_tasks=True)
    if diffs:
      raise ValueError(
          f"{os.path.join(config.assets, assets_lib.MANIFEST)}: these assets were made with a "
          f"different training config ({'; '.join(diffs[:4])}); use the matching config, or "
          "train=True to train assets for this one into cache_dir")
    return assets_lib.load_assets(config.assets, names)
  cache = config.cache_dir
  if os.path.isdir(cache):
    try:
      manifest = assets_lib.read_manifest(cache)
      if not _mismatch(manifest, wanted, subset_tasks=False):
        return assets_lib.load_assets(cache, names)
    except ValueError:
      pass                      # an unreadable or stale cache is rebuilt
  assets_lib.build_assets(config, cache, overwrite=True, progress=config.progress)
  return assets_lib.load_assets(cache, names)


# ---------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Evaluator:
  """One ViT whose adapted weights are swapped per model; data and heads of every task."""
  model: clip.CLIPVisionModelWithProjection
  base_dir: str
  tasks: list[str]
  splits: Mapping[str, Mapping[str, tasks_lib.Split]]     # split -> task -> data
  task_heads: Mapping[str, np.ndarray]                    # task -> [C, D]
  union_names: tuple[str, ...]
  union_maps: Mapping[str, np.ndarray]                    # task -> local -> union index
  union_head: np.ndarray                                  # [U, D]
  logit_scale: float
  batch_size: int
  base_weights: Mapping[str, np.ndarray]                  # HF key -> base tensor (adapted keys)

  @classmethod
  def create(cls, found: assets_lib.Assets, tasks: list[str], adapted_modules: Sequence[str],
             config: ml_collections.ConfigDict) -> "Evaluator":
    model = clip.from_pretrained(found.base_dir)
    size = model.config.image_size
    splits = {s: {t: tasks_lib.make_split(t, s, config.data[s], seed=config.seed, size=size)
                  for t in tasks} for s in ("val", "test")}
    label_names = {t: splits["test"][t].label_names for t in tasks}
    union_names, maps = metrics.union_labels(label_names)
    keys = [f"{m}.weight" for m in adapted_modules]
    base = {k: np.asarray(v) for k, v in clip.hf_tensors(model).items() if k in keys}
    return cls(model, found.base_dir, tasks, splits,
               {t: found.heads.matrix(n) for t, n in label_names.items()}, union_names, maps,
               found.heads.matrix(union_names), found.heads.logit_scale,
               config.eval_batch_size, base)

  # -- weights

  def _load(self, tensors: Mapping[str, object]) -> None:
    targets = clip.hf_targets(self.model)
    lora.load_hf_tensors({k: targets[k] for k in self.base_weights}, tensors, self.base_dir)

  def use_base(self) -> None:
    lora.detach_adapters(self.model)
    self._load(self.base_weights)

  def use_merge(self, result: MergeResult) -> None:
    lora.detach_adapters(self.model)
    self._load(dict(full_model.merged_model_weights(result, self.base_dir,
                                                  keys=list(self.base_weights))))

  def use_adapter(self, adapter: knots_jax.Adapter) -> None:
    self.use_base()
    lora.attach_adapter(self.model, adapter)

  # -- scores

  def embeds(self, split: str, tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """image_embeds of every task's images of `split` (one batched pass)."""
    tasks = list(self.tasks if tasks is None else tasks)
    data = [self.splits[split][t].images for t in tasks]
    out = vit.embed(self.model, np.concatenate(data), self.batch_size)
    ends = np.cumsum([len(d) for d in data])
    return dict(zip(tasks, np.split(out, ends[:-1])))

  def logits(self, embeds: np.ndarray, head: np.ndarray) -> np.ndarray:
    unit = embeds / np.maximum(np.linalg.norm(embeds, axis=-1, keepdims=True), 1e-12)
    return self.logit_scale * unit @ head.T

  def accuracies(self, embeds: Mapping[str, np.ndarray], split: str) -> dict[str, float]:
    return {t: metrics.accuracy(self.logits(e, self.task_heads[t]), self.splits[split][t].labels)
            for t, e in embeds.items()}

  def joint(self, embeds: Mapping[str, np.ndarray], ks: Sequence[int]) -> metrics.JointScores:
    """Hits@k of test images against the union of every task's label names."""
    scores = {t: self.logits(embeds[t], self.union_head) for t in self.tasks}
    labels = {t: self.union_maps[t][self.splits["test"][t].labels] for t in self.tasks}
    return metrics.joint_hits(scores, labels, ks)


def _row(acc: Mapping[str, float], finetuned: Mapping[str, float]) -> dict:
  return metrics.TaskScores.from_accuracies(acc, finetuned).to_dict()


def evaluate_fine_tuned(ev: Evaluator, adapters: knots_jax.AdapterSet, ks: Sequence[int],
                        progress: bool) -> tuple[dict, dict, dict]:
  """Fine-tuned accuracies {split: {task: acc}}, the ensemble's test row and joint scores."""
  acc: dict[str, dict[str, float]] = {"val": {}, "test": {}}
  per_model = []
  for adapter in tqdm.tqdm(adapters.adapters, desc="fine-tuned", disable=not progress):
    task = adapter.name
    ev.use_adapter(adapter)
    acc["val"].update(ev.accuracies(ev.embeds("val", [task]), "val"))
    test = ev.embeds("test")
    acc["test"][task] = ev.accuracies({task: test[task]}, "test")[task]
    per_model.append(np.concatenate([ev.logits(test[t], ev.task_heads[task]) for t in ev.tasks]))
  ev.use_base()
  for split, values in acc.items():
    zero = [t for t, a in values.items() if a <= 0]
    if zero:
      raise ValueError(f"fine-tuned accuracy is 0 on the {split} split of {zero}: normalized "
                       "accuracy is undefined; train the adapters longer or use larger splits")
  maps = [ev.union_maps[t] for t in ev.tasks]
  ends = np.cumsum([len(ev.splits["test"][t]) for t in ev.tasks])
  starts = np.concatenate([[0], ends[:-1]])
  ensemble = {t: metrics.ensemble_accuracy([l[s:e] for l in per_model], i,
                                           ev.splits["test"][t].labels, maps)
              for i, (t, s, e) in enumerate(zip(ev.tasks, starts, ends))}
  scores = metrics.ensemble_union_scores(per_model, maps, len(ev.union_names))
  joint = metrics.joint_hits(
      {t: scores[s:e] for t, s, e in zip(ev.tasks, starts, ends)},
      {t: ev.union_maps[t][ev.splits["test"][t].labels] for t in ev.tasks}, ks)
  return acc, ensemble, joint.to_dict()


def _batches(images: np.ndarray, size: int) -> list[np.ndarray]:
  return [images[i:i + size] for i in range(0, len(images), size)]


def data_merge(ev: Evaluator, adapters: knots_jax.AdapterSet, method: str,
               seed: int) -> MergeResult:
  """RegMean (input Grams of every adapted layer on each task's val images, each
  task's adapter attached) or Fisher averaging (diagonal Fisher of the adapted
  weights on FISHER_EXAMPLES val images per task, labels sampled from the
  fine-tuned model with its own head)."""
  from knots_jax.merging import fisher, regmean  # pylint: disable=import-outside-toplevel
  images = [ev.splits["val"][ad.name].images for ad in adapters.adapters]
  if method == "regmean":
    grams = regmean.task_grams(ev.model, lambda m, x: m(x), adapters,
                               [_batches(x, ev.batch_size) for x in images])
    return regmean.regmean_merge(adapters, None, grams, off_diagonal=REGMEAN_OFF_DIAGONAL)
  fishers = []
  for adapter, x in zip(adapters.adapters, images):
    head = jnp.asarray(ev.task_heads[adapter.name])

    def log_probs(m, batch, head=head):
      e = m(batch)
      e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return jax.nn.log_softmax(ev.logit_scale * e @ head.T)

    ev.use_adapter(adapter)
    fishers.append(fisher.fisher_diagonal(ev.model, log_probs, _batches(x, 16),
                                          adapters.module_names,
                                          n_examples=min(FISHER_EXAMPLES, len(x)),
                                          seed=seed))
  ev.use_base()
  return fisher.fisher_merge(adapters, None, fishers)


def evaluate_merges(ev: Evaluator, adapters: knots_jax.AdapterSet, finetuned: Mapping,
                    config: ml_collections.ConfigDict, ks: Sequence[int]) -> dict:
  """The linear search of every method on one alignment; test rows and joint scores."""
  methods = _names(config.methods)
  for m in methods:
    if m not in DATA_METHODS:
      registry.get_method(m)
  grids = dict(scalings=_floats(config.search.scalings, "search.scalings"),
               top_ks=_floats(config.search.top_ks, "search.top_ks"),
               drop_rates=_floats(config.search.drop_rates, "search.drop_rates"))
  needs_knots = any(registry.get_method(m).knots for m in methods if m not in DATA_METHODS)
  start = time.perf_counter()
  alignment = (knots_jax.align(adapters, progress=config.progress) if needs_knots
               else decompose.factor_alignment(adapters))
  align_seconds = time.perf_counter() - start

  def evaluate(result: MergeResult, split: str) -> float:
    ev.use_merge(result)
    acc = ev.accuracies(ev.embeds(split), split)
    return metrics.average_normalized_accuracy([acc[t] for t in ev.tasks],
                                               [finetuned[split][t] for t in ev.tasks])

  rows = {}
  for method in methods:
    if method in DATA_METHODS:
      start = time.perf_counter()
      result = data_merge(ev, adapters, method, config.seed)
      ev.use_merge(result)
      test = ev.embeds("test")
      rows[method] = {**_row(ev.accuracies(test, "test"), finetuned["test"]),
                      "joint": ev.joint(test, ks).to_dict(), "best": {"scaling": 1.0},
                      "val_score": evaluate(result, "val"), "merges": 1,
                      "seconds": time.perf_counter() - start}
      continue
    found = search.linear_search(alignment, method, evaluate, seed=config.seed,
                                 stop_early=config.search.stop_early, progress=config.progress,
                                 **grids)
    ev.use_merge(found.result)
    test = ev.embeds("test")
    rows[method] = {**_row(ev.accuracies(test, "test"), finetuned["test"]),
                    "joint": ev.joint(test, ks).to_dict(), "best": dict(found.best),
                    "val_score": found.val_score, "test_score": found.test_score,
                    "merges": found.merges, "seconds": found.seconds,
                    "trials": found.to_records()[:-1]}
  ev.use_base()
  return {"rows": rows, "align_seconds": align_seconds}


# ------------------------------------------------------------------- tables


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown_tables(results: Mapping) -> str:
  """The paper's tables from a results dict: accuracy, normalized accuracy, settings, Hits@k."""
  tasks = results["tasks"]
  rows = results["rows"]
  order = ["zero_shot", "fine_tuned"] + list(results["methods"]) + ["ensemble"]
  head = "| Method | " + " | ".join(tasks) + " | Average |\n|---|" + "---:|" * (len(tasks) + 1)
  out = [f"Test split, {results['test_images']} images per task; merges chosen on the val split "
         "by the linear search (alpha, then top-K / p) for the best average normalized "
         "accuracy.", "", "### Accuracy (%)", "", head]
  for r in order:
    row = rows[r]
    out.append(f"| {DISPLAY.get(r, r)} | " + " | ".join(
        _pct(row["tasks"][t]["accuracy"]) for t in tasks) + f" | {_pct(row['average']['accuracy'])} |")
  out += ["", "### Normalized accuracy (% of the fine-tuned model's)", "", head]
  for r in order:
    row = rows[r]
    out.append(f"| {DISPLAY.get(r, r)} | " + " | ".join(
        _pct(row["tasks"][t]["normalized"]) for t in tasks)
        + f" | {_pct(row['average']['normalized'])} |")
  out += ["", "### Chosen hyper-parameters", "",
          "| Method | alpha | top-K (%) | DARE p | val avg. normalized (%) | merges |",
          "|---|---:|---:|---:|---:|---:|"]
  for m in results["methods"]:
    if m in DATA_METHODS:
      continue
    b = rows[m]["best"]
    out.append(f"| {DISPLAY.get(m, m)} | {b['scaling']:g} | "
               f"{'' if b.get('top_k') is None else format(b['top_k'], 'g')} | "
               f"{'' if b.get('drop_rate') is None else format(b['drop_rate'], 'g')} | "
               f"{_pct(rows[m]['val_score'])} | {rows[m]['merges']} |")
  ks = results["hits_k"]
  joint_rows = ["zero_shot"] + list(results["methods"]) + ["ensemble"]
  out += ["", f"### Joint task: Hits@k over the union of {results['union_labels']} labels (%)",
          "", "| Method | " + " | ".join(f"Hits@{k}" for k in ks) + " |",
          "|---|" + "---:|" * len(ks)]
  for r in joint_rows:
    u = rows[r]["joint"][metrics.UNION]
    out.append(f"| {DISPLAY.get(r, r)} | " + " | ".join(_pct(u[f'hits@{k}']) for k in ks) + " |")
  k = ks[0]
  out += ["", f"### Joint task: Hits@{k} per dataset (%)", "",
          "| Method | " + " | ".join(tasks) + f" | {metrics.UNION} |",
          "|---|" + "---:|" * (len(tasks) + 1)]
  for r in joint_rows:
    j = rows[r]["joint"]
    out.append(f"| {DISPLAY.get(r, r)} | " + " | ".join(
        _pct(j[t][f"hits@{k}"]) for t in tasks + [metrics.UNION]) + " |")
  return "\n".join(out)


# --------------------------------------------------------------------- entry


def run_benchmark(config: ml_collections.ConfigDict) -> dict:
  """Runs the whole benchmark (see the module docstring); returns the results dict.

  Prints the Markdown tables and writes results.json and results.md to
  `config.workdir` (replaced atomically when `config.overwrite`).
  """
  start = time.perf_counter()
  output_dir.check_output_dir(config.workdir, config.overwrite)
  tasks = assets_lib.task_names(config)
  ks = tuple(int(k) for k in _floats(config.hits_k, "hits_k"))
  found = resolve_assets(config)
  assets_seconds = time.perf_counter() - start
  adapters = knots_jax.load_adapters([found.adapter_dirs[t] for t in tasks], names=tasks)
  ev = Evaluator.create(found, tasks, adapters.module_names, config)

  t0 = time.perf_counter()
  ev.use_base()
  zero_val, zero_test = ev.accuracies(ev.embeds("val"), "val"), ev.embeds("test")
  finetuned, ensemble, ensemble_joint = evaluate_fine_tuned(ev, adapters, ks, config.progress)
  rows = {"zero_shot": {**_row(ev.accuracies(zero_test, "test"), finetuned["test"]),
                        "joint": ev.joint(zero_test, ks).to_dict(),
                        "val": _row(zero_val, finetuned["val"])},
          "fine_tuned": _row(finetuned["test"], finetuned["test"]),
          "ensemble": {**_row(ensemble, finetuned["test"]), "joint": ensemble_joint}}
  rows["fine_tuned"]["val"] = _row(finetuned["val"], finetuned["val"])
  baselines_seconds = time.perf_counter() - t0

  merged = evaluate_merges(ev, adapters, finetuned, config, ks)
  results = {
      "benchmark": "knots_jax offline benchmark (docs/offline_benchmark.md)",
      "tasks": tasks, "methods": _names(config.methods), "hits_k": list(ks),
      "test_images": int(config.data.test), "val_images": int(config.data.val),
      "union_labels": len(ev.union_names), "union_names": list(ev.union_names),
      "rows": {**rows, **merged["rows"]},
      "assets": {"root": os.path.abspath(found.root),
                 "pretrain_log": found.manifest.get("pretrain_log"),
                 "adapters": found.manifest.get("adapters"),
                 "seconds": found.manifest.get("seconds")},
      "seconds": {"assets": assets_seconds, "baselines": baselines_seconds,
                  "align": merged["align_seconds"], "total": time.perf_counter() - start},
      "environment": assets_lib.environment(), "config": config.to_dict(),
  }
  table = markdown_tables(results)
  results["seconds"]["total"] = time.perf_counter() - start
  text = (f"# Offline benchmark\n\n{table}\n\nTotal time: {results['seconds']['total']:.0f} s "
          f"on {results['environment']['cpu_count']} CPU core(s) ({jax.default_backend()}).\n")
  print(text)
  output_dir.write_results(config.workdir, results, text, overwrite=config.overwrite)
  return results


__all__ = ["run_benchmark", "resolve_assets", "Evaluator", "markdown_tables",
           "evaluate_fine_tuned", "evaluate_merges", "RESULTS_JSON", "RESULTS_MD"]
