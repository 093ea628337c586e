"""The paper's Llama-3-8B NLI evaluation on real data: six tasks, per-task heads, every merge.

`run_paper_nli(config)` (configs/llama3_8b_nli_eval.py) evaluates as the KnOTS
reference does (`eval_scripts/nli_pertask_linearsearch.py`, `utils.evaluate_logits`):

* every adapter is a PEFT `SEQ_CLS` LoRA of a `LlamaForSequenceClassification`,
  its classification head `score.weight` [3, hidden] saved in `modules_to_save`
  (`Adapter.extra`); the three head rows are one shared label space
  (entailment, neutral, contradiction / not-entailment);
* a pair is tokenized as the tokenizer pairs two texts,
  `tokenizer(premise, hypothesis)`, right padded (pad = eos when the tokenizer
  has none, as the reference), and classified at the last token;
* a two-class task reads only its own head rows (`head_rows`): the reference
  sets the other row's logit to -inf (`mask_class`);
* a merge is the merged backbone with each task's own head put back (the
  heads are not merged); the linear search maximizes the average normalized
  accuracy on the val split (knots_jax.evaluation.search);
* the fine-tuned baseline is the base with one adapter attached and its head.

Beyond the reference (which reports per-task accuracy only for NLI):
the ensemble (the most confident fine-tuned model, per example) and the
joint task (Hits@k over the union of label names; union label u is scored by
the head row of the first task that has a label named u, in task order).

Data per task (`config.datasets.<task>`): JSON lines `<path>/<split>.jsonl`
(format `jsonl`, one {premise, hypothesis, label} object per line; label an
index into `label_names` or one of those names), or `datasets.save_to_disk`
(format `hf`, needs `pip install datasets`). Labels outside
0..len(label_names)-1 (SNLI's -1) are dropped, as the reference filters them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from typing import Iterable, Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import knots_jax
from knots_jax.alignment import decompose
from knots_jax.evaluation import metrics, search
from knots_jax.experiments import paper, real_data
from knots_jax.export import full_model
from knots_jax.io import output_dir
from knots_jax.io import sharded_read
from knots_jax.methods import registry
from knots_jax.models import llama, lora
from knots_jax.models import weights as weights_lib

PLACEHOLDER = paper.PLACEHOLDER
NLI_TASKS = ("snli", "mnli", "sick", "qnli", "rte", "scitail")
NLI_METHODS = "ta,ties,dare_ties,knots_ties,knots_dare_ties"
HEAD_KEY = "score.weight"
FORMATS = ("jsonl", "hf")
RESULTS_JSON, RESULTS_MD = output_dir.RESULTS_JSON, output_dir.RESULTS_MD
# (label names in dataset label order, the head row of each): the reference's datasets.
_THREE = ("entailment,neutral,contradiction", "0,1,2")
TASK_LABELS = {"snli": _THREE, "mnli": _THREE, "sick": _THREE,
               "qnli": ("entailment,not_entailment", "0,2"),      # reference mask_class 1
               "rte": ("entailment,not_entailment", "0,2"),       # reference mask_class 1
               "scitail": ("entailment,neutral", "0,1")}          # reference mask_class 2


# ------------------------------------------------------------------- config


def _dataset(root: str, task: str) -> dict:
  names, rows = TASK_LABELS.get(task, _THREE)
  return dict(path=os.path.join(root, "datasets", task),  # <path>/<split>.jsonl or save_to_disk dir
              format="jsonl",             # `jsonl` or `hf` (datasets.save_to_disk)
              val_split="validation",     # the search's split; slices work: `validation[:500]`
              test_split="test",          # the reported split
              premise_key="premise", hypothesis_key="hypothesis", label_key="label",
              label_names=names,          # the dataset's labels, in label-id order
              head_rows=rows)             # the head row scoring each label (others masked)


def nli_config(root: str = PLACEHOLDER) -> ml_collections.ConfigDict:
  """The paper's Llama-3-8B NLI setting under `root` (layout: docs/paper_settings.md)."""
  c = ml_collections.ConfigDict()
  c.setting = "nli"                 # `knots-jax evaluate` dispatches on this
  c.model = "Meta-Llama-3-8B"       # default paths and workdir
  c.root = root                     # only used to derive the defaults below
  c.model_dir = os.path.join(root, "models", c.model)              # HF Llama dir + tokenizer
  c.adapters_root = os.path.join(root, "adapters", c.model)        # PEFT dirs <root>/<task>
  c.tasks = ",".join(NLI_TASKS)
  c.datasets = {t: _dataset(root, t) for t in NLI_TASKS}
  c.max_examples = dict(val=500, test=2000)   # pairs per task (0: all)
  c.max_length = 512                # tokens per pair (truncated beyond)
  c.seed = 0                        # capped subsets and DARE's masks
  c.methods = NLI_METHODS
  c.search = dict(scalings="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                  top_ks="10,20,30,40,50,60,70,80,90,100",
                  drop_rates="0.99,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1",
                  stop_early=False)
  c.hits_k = "1,3"                  # the union has 4 labels
  c.eval_batch_size = 16            # pairs per forward pass
  c.dtype = "bfloat16"              # parameter dtype (`float32` for exact comparisons)
  c.workdir = os.path.join("outputs", "paper_llama3_8b_nli")
  c.overwrite = True
  c.progress = True
  return c


PRESETS = paper.PRESETS   # `quick`: small example caps and short search grids


def apply_arg(c: ml_collections.ConfigDict, arg: str | None, source: str) -> ml_collections.ConfigDict:
  """`root=DIR` (rebuilds the default paths), presets and `key=value` items (paper.apply_arg)."""
  rest = []
  for item in (arg or "").split(","):
    key, sep, value = item.partition("=")
    if sep and key.strip() == "root":
      c = nli_config(value.strip())
    elif item.strip():
      rest.append(item)
  return paper.apply_arg(c, ",".join(rest), source, PRESETS)


def _list(text: str) -> list[str]:
  return [s.strip() for s in str(text).split(",") if s.strip()]


def adapter_dir(config: ml_collections.ConfigDict, task: str) -> str:
  return os.path.join(config.adapters_root, task)


def check_config(config: ml_collections.ConfigDict) -> list[str]:
  """The tasks; ValueError listing paths still at the placeholder, then missing ones."""
  tasks = paper.task_names(config)
  paths = {"model_dir": config.model_dir, "adapters_root": config.adapters_root}
  paths.update({f"datasets.{t}.path": config.datasets[t].path for t in tasks})
  files = {"model_dir": os.path.join(config.model_dir, "config.json")}
  files.update({f"adapter of `{t}`": adapter_dir(config, t) for t in tasks})
  files.update({f"datasets.{t}.path": config.datasets[t].path for t in tasks})
  paper.check_paths(paths, files, "configs/llama3_8b_nli_eval.py")
  return tasks


# --------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Pairs:
  """One split of one NLI task: texts, labels (dataset ids) and label names."""
  task: str
  split: str
  premises: tuple[str, ...]
  hypotheses: tuple[str, ...]
  labels: np.ndarray
  label_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


def _label_id(value, names: Sequence[str], where: str) -> int:
  if isinstance(value, str):
    if value not in names:
      raise ValueError(f"{where}: label `{value}` is not one of label_names {list(names)}")
    return names.index(value)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{where}: label must be an integer or a label name, got {value!r}")
  return int(value)


def _jsonl_rows(path: str, keys: Sequence[str]) -> list[tuple]:
  if not os.path.isfile(path):
    folder = os.path.dirname(path)
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise ValueError(f"no JSON-lines file `{path}`; `{folder}` holds {found}")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON: {e}") from e
      missing = [k for k in keys if k not in obj]
      if missing:
        raise ValueError(f"{path}:{n}: no field(s) {missing}; fields: {sorted(obj)} "
                         "(set premise_key / hypothesis_key / label_key)")
      rows.append(tuple(obj[k] for k in keys))
  return rows


def _hf_rows(path: str, name: str, keys: Sequence[str], task: str) -> list[tuple]:
  if not os.path.isdir(path):
    raise ValueError(f"task `{task}`: dataset directory `{path}` does not exist")
  data = real_data._import_datasets().load_from_disk(path)  # pylint: disable=protected-access
  if name not in data:
    raise ValueError(f"task `{task}`: `{path}` has no split `{name}`; splits: {sorted(data)}")
  ds = data[name]
  missing = [k for k in keys if k not in ds.column_names]
  if missing:
    raise ValueError(f"task `{task}`: split `{name}` of `{path}` has no column(s) {missing}; "
                     f"columns: {ds.column_names}")
  return list(zip(*(ds[k] for k in keys)))


def load_pairs(task: str, d: ml_collections.ConfigDict, split: str, *, max_examples: int = 0,
               seed: int = 0) -> Pairs:
  """One split (`name` or `name[a:b]`) of one task, capped to a seeded subset."""
  if d.format not in FORMATS:
    raise ValueError(f"task `{task}`: unknown format `{d.format}`; valid: {', '.join(FORMATS)}")
  names = tuple(_list(d.label_names))
  name, part = real_data.parse_split(split)
  keys = (d.premise_key, d.hypothesis_key, d.label_key)
  rows = (_jsonl_rows(os.path.join(d.path, name + ".jsonl"), keys) if d.format == "jsonl"
          else _hf_rows(d.path, name, keys, task))[part]
  where = f"task `{task}`, split `{split}` of `{d.path}`"
  labels = np.asarray([_label_id(r[2], names, where) for r in rows], np.int64)
  keep = np.flatnonzero((labels >= 0) & (labels < len(names)))      # SNLI's -1: dropped
  keep = keep[real_data.subset(len(keep), max_examples, seed, task, split)]
  if not len(keep):
    raise ValueError(f"{where}: no examples with a label in 0..{len(names) - 1}")
  return Pairs(task, split, tuple(str(rows[i][0]) for i in keep),
               tuple(str(rows[i][1]) for i in keep), labels[keep], names)


def load_tokenizer(model_dir: str):
  """The base model's tokenizer (local files only); pad = eos when it has none."""
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"{model_dir}: cannot load the tokenizer (tokenizer.json / "
                     f"tokenizer_config.json; save it with tokenizer.save_pretrained): {e}") from e
  if tok.pad_token_id is None:
    if tok.eos_token_id is None:
      raise ValueError(f"{model_dir}: the tokenizer has neither a pad nor an eos token")
    tok.pad_token = tok.eos_token
  return tok


def tokenize(tokenizer, pairs: Pairs, max_length: int) -> list[list[int]]:
  """Token ids of `tokenizer(premise, hypothesis)` per pair, truncated to `max_length`."""
  out = tokenizer(list(pairs.premises), list(pairs.hypotheses), truncation=True,
                  max_length=max_length)
  return [list(ids) for ids in out["input_ids"]]


def batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int,
            bucket: int = 32) -> Iterable[tuple[np.ndarray, np.ndarray, int]]:
  """(input_ids, attention_mask, rows) right padded to [batch_size, multiple of `bucket`]."""
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    t = -(-max(len(r) for r in chunk) // bucket) * bucket
    x = np.full((batch_size, t), pad_id, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for i, row in enumerate(chunk):
      x[i, :len(row)], mask[i, :len(row)] = row, 1
    yield x, mask, len(chunk)


# ------------------------------------------------------------------ heads


@dataclasses.dataclass(frozen=True)
class Heads:
  """Every task's head rows stacked [R, hidden], where each task's block lies, and the union."""
  matrix: np.ndarray
  blocks: Mapping[str, slice]             # task -> its rows (one per dataset label)
  union_rows: np.ndarray                  # [U] row scoring each union label
  union_names: tuple[str, ...]
  maps: Mapping[str, np.ndarray]          # task -> [C_t] union index of each label


def make_heads(config: ml_collections.ConfigDict, tasks: Sequence[str],
               adapters: knots_jax.AdapterSet) -> Heads:
  """Each task's `score.weight` rows of its labels (`head_rows`), stacked in task order."""
  rows, blocks, names = [], {}, {}
  for t, adapter in zip(tasks, adapters.adapters):
    d = config.datasets[t]
    if HEAD_KEY not in adapter.extra:
      raise ValueError(f"{adapter_dir(config, t)}: no `{HEAD_KEY}` in modules_to_save (extra "
                       f"tensors: {sorted(adapter.extra)}); NLI adapters are PEFT SEQ_CLS "
                       "LoRAs with their classification head")
    head = np.asarray(adapter.extra[HEAD_KEY], np.float32)
    picks = [int(r) for r in _list(d.head_rows)]
    names[t] = tuple(_list(d.label_names))
    if len(picks) != len(names[t]) or any(not 0 <= r < head.shape[0] for r in picks):
      raise ValueError(f"datasets.{t}: head_rows {picks} must give one row of the "
                       f"{head.shape[0]}-row head per label {list(names[t])}")
    blocks[t] = slice(len(rows), len(rows) + len(picks))
    rows.extend(head[r] for r in picks)
  union_names, maps = metrics.union_labels(names)
  first: dict[int, int] = {}
  for t in tasks:
    for local, u in enumerate(maps[t]):
      first.setdefault(int(u), blocks[t].start + local)
  return Heads(np.stack(rows), blocks, np.asarray([first[u] for u in range(len(union_names))]),
               union_names, maps)


def classifier(model_dir: str, heads: Heads, pad_id: int, dtype, weights):
  """`LlamaForSequenceClassification` of `weights` (the backbone) with the stacked heads."""
  config = dataclasses.replace(llama.read_config(model_dir), num_labels=heads.matrix.shape[0],
                               labels=None, pad_token_id=pad_id)
  head = {HEAD_KEY: heads.matrix}
  if weights is None:
    weights = sharded_read.read_backbone(model_dir).items()
  return weights_lib.load_pretrained(
      lambda: llama.LlamaForSequenceClassification(config, dtype=dtype, rngs=nnx.Rngs(0)),
      llama.hf_targets, model_dir, dtype=dtype, weights=itertools.chain(weights, head.items()))


# ---------------------------------------------------------------- evaluate


class NliEvaluator:
  """Tokenized splits and heads; logits of a model over every split and task."""

  def __init__(self, config: ml_collections.ConfigDict, tasks: list[str],
               adapters: knots_jax.AdapterSet):
    self.config, self.tasks, self.adapters = config, tasks, adapters
    self.dtype = jnp.dtype(config.dtype)
    tok = load_tokenizer(config.model_dir)
    self.pad_id = int(tok.pad_token_id)
    self.heads = make_heads(config, tasks, adapters)
    self.pairs = {s: {t: load_pairs(t, config.datasets[t], config.datasets[t][f"{s}_split"],
                                    max_examples=int(config.max_examples[s]), seed=config.seed)
                      for t in tasks} for s in ("val", "test")}
    for t in tasks:
      if self.pairs["val"][t].label_names != tuple(_list(config.datasets[t].label_names)):
        raise ValueError(f"task `{t}`: label names differ")
    self.ids = {s: {t: tokenize(tok, p, int(config.max_length)) for t, p in ps.items()}
                for s, ps in self.pairs.items()}

  def model(self, weights=None):
    return classifier(self.config.model_dir, self.heads, self.pad_id, self.dtype, weights)

  def logits(self, model, split: str) -> dict[str, np.ndarray]:
    """{task: [n_t, R] logits of every stacked head row} for one split."""
    f = llama.make_forward(model)
    out = {}
    for t in self.tasks:
      parts = [np.asarray(f(x, m), np.float32)[:n] for x, m, n in
               batches(self.ids[split][t], int(self.config.eval_batch_size), self.pad_id)]
      out[t] = np.concatenate(parts)
    return out

  def accuracies(self, logits: Mapping[str, np.ndarray], split: str) -> dict[str, float]:
    """Each task read at its own head rows (the reference's masked classes)."""
    return {t: metrics.accuracy(logits[t][:, self.heads.blocks[t]], self.pairs[split][t].labels)
            for t in self.tasks}

  def joint(self, logits: Mapping[str, np.ndarray], split: str, ks) -> metrics.JointScores:
    scores = {t: logits[t][:, self.heads.union_rows] for t in self.tasks}
    labels = {t: self.heads.maps[t][self.pairs[split][t].labels] for t in self.tasks}
    return metrics.joint_hits(scores, labels, ks)


def fine_tuned(ev: NliEvaluator, ks) -> tuple[dict, dict, dict]:
  """Accuracies of each adapter on its task (val, test); the ensemble's test row and joint."""
  model = ev.model()
  acc: dict[str, dict[str, float]] = {"val": {}, "test": {}}
  per_model = []          # per fine-tuned model i: {task: [n_t, C_i]} on test
  for i, (t, adapter) in enumerate(zip(ev.tasks, ev.adapters.adapters)):
    lora.attach_adapter(model, adapter)
    for split in ("val", "test"):
      logits = ev.logits(model, split)
      acc[split][t] = ev.accuracies(logits, split)[t]
      if split == "test":
        per_model.append({u: logits[u][:, ev.heads.blocks[t]] for u in ev.tasks})
  lora.detach_adapters(model)
  maps = [ev.heads.maps[t] for t in ev.tasks]
  ensemble, scores, labels = {}, {}, {}
  for j, u in enumerate(ev.tasks):
    logits_u = [per_model[i][u] for i in range(len(ev.tasks))]
    y = ev.pairs["test"][u].labels
    ensemble[u] = metrics.ensemble_accuracy(logits_u, j, y, maps)
    scores[u] = metrics.ensemble_union_scores(logits_u, maps, len(ev.heads.union_names))
    labels[u] = ev.heads.maps[u][y]
  return acc, ensemble, metrics.joint_hits(scores, labels, ks).to_dict()


def _row(acc: Mapping[str, float], finetuned: Mapping[str, float]) -> dict:
  return metrics.TaskScores.from_accuracies(acc, finetuned).to_dict()


def evaluate_merges(ev: NliEvaluator, finetuned: Mapping, ks) -> dict:
  """The linear search of every method (val: mean normalized accuracy), then test."""
  c = ev.config
  methods = _list(c.methods)
  for m in methods:
    registry.get_method(m)
  grids = {k: tuple(float(v) for v in _list(c.search[k]))
           for k in ("scalings", "top_ks", "drop_rates")}
  t0 = time.perf_counter()
  alignment = (knots_jax.align(ev.adapters, progress=c.progress)
               if any(registry.get_method(m).knots for m in methods)
               else decompose.factor_alignment(ev.adapters))
  rows, align_seconds = {}, time.perf_counter() - t0
  cache: dict = {}

  def evaluate(result, split: str) -> float:
    model = ev.model(full_model.merged_model_weights(result, c.model_dir))
    cache["logits"] = ev.logits(model, split)
    acc = ev.accuracies(cache["logits"], split)
    return metrics.average_normalized_accuracy([acc[t] for t in ev.tasks],
                                               [finetuned[split][t] for t in ev.tasks])

  for method in methods:
    found = search.linear_search(alignment, method, evaluate, seed=c.seed,
                                 stop_early=c.search.stop_early, progress=c.progress,
                                 modules_to_save="drop", **grids)
    test = cache["logits"]          # the last call was the chosen merge on "test"
    rows[method] = {**_row(ev.accuracies(test, "test"), finetuned["test"]),
                    "joint": ev.joint(test, "test", ks).to_dict(), "best": dict(found.best),
                    "val_score": found.val_score, "test_score": found.test_score,
                    "merges": found.merges, "seconds": found.seconds,
                    "trials": found.to_records()[:-1]}
  return {"rows": rows, "align_seconds": align_seconds}


def markdown(results: Mapping) -> str:
  """Per-task accuracy, normalized accuracy and joint Hits@k tables of every row."""
  parts = []
  for name, row in results["rows"].items():
    tasks = row["tasks"]
    scores = metrics.TaskScores(tuple(tasks), tuple(tasks[t]["accuracy"] for t in tasks),
                                tuple(tasks[t]["finetuned"] for t in tasks))
    head = f"## {name}" + (f" (best: {row['best']})" if "best" in row else "")
    parts.append(f"{head}\n\n{scores.to_markdown()}")
    if "joint" in row:
      ks = results["hits_k"]
      lines = ["| Dataset | " + " | ".join(f"Hits@{k} (%)" for k in ks) + " |",
               "|---|" + "---|" * len(ks)]
      lines += [f"| {d} | " + " | ".join(f"{100 * v[f'hits@{k}']:.1f}" for k in ks) + " |"
                for d, v in row["joint"].items()]
      parts.append("Joint task:\n\n" + "\n".join(lines))
  return "\n\n".join(parts)


def run_paper_nli(config: ml_collections.ConfigDict) -> dict:
  """Runs the NLI setting of `config`; prints and writes results.json / results.md to workdir."""
  start = time.perf_counter()
  tasks = check_config(config)
  output_dir.check_output_dir(config.workdir, config.overwrite)
  ks = tuple(int(k) for k in _list(config.hits_k))
  adapters = knots_jax.load_adapters([adapter_dir(config, t) for t in tasks], names=tasks)
  ev = NliEvaluator(config, tasks, adapters)
  data_seconds = time.perf_counter() - start
  t0 = time.perf_counter()
  ft, ensemble, ensemble_joint = fine_tuned(ev, ks)
  rows = {"fine_tuned": {**_row(ft["test"], ft["test"]), "val": _row(ft["val"], ft["val"])},
          "ensemble": {**_row(ensemble, ft["test"]), "joint": ensemble_joint}}
  baselines_seconds = time.perf_counter() - t0
  merged = evaluate_merges(ev, ft, ks)
  results = {
      "benchmark": "knots_jax: the KnOTS paper's Llama-3-8B NLI setting (docs/paper_settings.md)",
      "tasks": tasks, "methods": _list(config.methods), "hits_k": list(ks),
      "pairs": {s: {t: len(p) for t, p in ev.pairs[s].items()} for s in ev.pairs},
      "union_names": list(ev.heads.union_names),
      "rows": {**rows, **merged["rows"]},
      "seconds": {"data": data_seconds, "baselines": baselines_seconds,
                  "align": merged["align_seconds"], "total": time.perf_counter() - start},
      "config": config.to_dict(),
  }
  text = (f"# KnOTS paper setting: {os.path.basename(os.path.normpath(config.model_dir))} NLI"
          f"\n\n{markdown(results)}\n\nTotal time: {time.perf_counter() - start:.0f} s.\n")
  print(text)
  output_dir.write_results(config.workdir, results, text, overwrite=config.overwrite)
  return results


__all__ = ["FORMATS", "Heads", "NLI_METHODS", "NLI_TASKS", "NliEvaluator", "PRESETS", "Pairs",
           "TASK_LABELS", "adapter_dir", "apply_arg", "batches", "check_config", "classifier",
           "evaluate_merges", "fine_tuned", "load_pairs", "load_tokenizer", "make_heads",
           "markdown", "nli_config", "run_paper_nli", "tokenize"]
