"""The paper's real settings: configs, the real-data loader and `run_paper_vision` end to end.

References are independent: transformers' CLIP image processor (PIL) for the
preprocessing, transformers / PEFT in PyTorch for the zero-shot and
fine-tuned accuracies of the end-to-end run (tiny random CLIP, 32 x 32).
"""

import importlib.util
import os
import sys
import types

import numpy as np
import peft
import pytest
import torch
import transformers
from PIL import Image

from knots_jax.experiments import paper, real_data
from knots_jax.experiments.offline import heads as heads_lib
from tests import peft_factory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=16)
CLASSES = ("0", "1", "2")


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_folder(root, split, n_per_class, seed, size=(40, 48), shift=0):
  rng = np.random.default_rng(seed)
  for c, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i in range(n_per_class):
      pixels = rng.integers(0, 160, (size[1], size[0], 3), dtype=np.uint8)
      pixels[..., (c + shift) % 3] += 95                  # the class: one brighter channel
      Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))


# ------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,model", [("vit_b32_8tasks", "clip-vit-base-patch32"),
                                        ("vit_l14_8tasks", "clip-vit-large-patch14")])
def test_vision_configs_build_and_place_paths_under_root(name, model):
  module = _config_module(name)
  c = module.get_config("root=/data/k,quick,datasets.mnist.format=folder,max_examples.test=7")
  assert paper.task_names(c) == list(paper.VIT_TASKS)
  assert c.model_dir == f"/data/k/models/{model}"
  assert paper.adapter_dir(c, "dtd") == f"/data/k/adapters/{model}/dtd"
  assert paper.heads_path(c, "svhn") == f"/data/k/heads/{model}/svhn.safetensors"
  assert c.datasets.mnist.format == "folder" and c.datasets.mnist.path == "/data/k/datasets/mnist"
  assert c.max_examples.test == 7 and c.search.scalings == "0.5,1.0"
  assert c.methods.split(",") == ["ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties"]
  assert len(module.get_config().search.top_ks.split(",")) == 10    # the paper's grid
  with pytest.raises(ValueError, match=f"configs/{name}.py: unknown preset `fast`"):
    module.get_config("fast")
  with pytest.raises(ValueError, match="unknown field `datasets.mnist.colour`"):
    module.get_config("datasets.mnist.colour=1")


def test_placeholder_and_missing_paths_are_named():
  module = _config_module("vit_b32_8tasks")
  with pytest.raises(ValueError, match=r"paths not set: model_dir, adapters_root, heads_dir, "
                                       r"datasets.cars.path.*<set root>"):
    paper.run_paper_vision(module.get_config())
  c = module.get_config("root=/nonexistent/knots,tasks=mnist")
  with pytest.raises(ValueError, match=r"missing on disk.*\n  model_dir: /nonexistent/knots/"
                                       r"models/clip-vit-base-patch32/config.json"):
    paper.check_config(c)


def test_llama_nli_merge_config_still_builds():
  c = _config_module("llama3_8b_nli").get_config("root=/ckpt")
  assert c.adapters.split(",")[0] == "/ckpt/snli" and c.method == "knots_ties"


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("size", [(40, 48), (57, 31), (45, 32), (32, 32)])
def test_preprocess_matches_transformers_clip_processor(size):
  rng = np.random.default_rng(size[0])
  image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
  processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
  want = processor(images=[image], return_tensors="np")["pixel_values"]
  ours = real_data.preprocess_batch([image], 24)
  assert ours.shape == want.shape == (1, 3, 24, 24)
  np.testing.assert_allclose(ours, want, atol=1e-5)


def test_folder_splits_slices_caps_and_names(tmp_path):
  _write_folder(str(tmp_path), "train", 4, seed=0)
  spec = real_data.DatasetSpec("digits", str(tmp_path), "folder")
  assert real_data.class_names(spec, "train") == CLASSES
  full = real_data.load_split(spec, "train", 16)
  assert full.images.shape == (12, 3, 16, 16) and full.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  tail = real_data.load_split(spec, "train[-5:]", 16)
  np.testing.assert_array_equal(tail.images, full.images[-5:])
  capped = real_data.load_split(spec, "train", 16, max_examples=5, seed=3)
  again = real_data.load_split(spec, "train", 16, max_examples=5, seed=3)
  assert len(capped) == 5 and np.array_equal(capped.images, again.images)
  rows = [int(np.flatnonzero((full.images == im).all(axis=(1, 2, 3)))[0]) for im in capped.images]
  assert full.labels[rows].tolist() == capped.labels.tolist()
  with pytest.raises(ValueError, match="no split folder .*test"):
    real_data.load_split(spec, "test", 16)
  with pytest.raises(ValueError, match="bad split"):
    real_data.parse_split("train[1:x]")


class _FakeClassLabel:
  def __init__(self, names):
    self.names = names


class _FakeDataset:
  def __init__(self, images, labels, names):
    self.images, self.labels, self.names = images, labels, names
    self.column_names = ["img", "label"]
    self.features = {"img": None, "label": _FakeClassLabel(names)}

  def __len__(self):
    return len(self.labels)

  def select(self, index):
    return _FakeDataset([self.images[i] for i in index], [self.labels[i] for i in index],
                        self.names)

  def __getitem__(self, key):
    return self.images if key == "img" else self.labels


def test_hf_format_reads_columns_and_class_names(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(4)]
  data = {"test": _FakeDataset(images, [2, 0, 1, 2], ["cat", "dog", "sea_lion"])}
  fake = types.SimpleNamespace(load_from_disk=lambda path: data)
  monkeypatch.setitem(sys.modules, "datasets", fake)
  spec = real_data.DatasetSpec("pets", str(tmp_path), "hf", image_key="img")
  split = real_data.load_split(spec, "test[1:]", 16)
  assert split.label_names == ("cat", "dog", "sea_lion") and split.labels.tolist() == [0, 1, 2]
  np.testing.assert_allclose(split.images, real_data.preprocess_batch(images[1:], 16))
  with pytest.raises(ValueError, match=r"no split `validation`; its splits: \['test'\]"):
    real_data.load_split(spec, "validation", 16)
  with pytest.raises(ValueError, match=r"no column\(s\) \['image'\]"):
    real_data.load_split(real_data.DatasetSpec("pets", str(tmp_path)), "test", 16)
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    real_data.load_split(spec, "test", 16)


def test_text_head_averages_unit_prompt_embeddings():
  spec = importlib.util.spec_from_file_location(
      "make_clip_heads", os.path.join(ROOT, "scripts", "make_clip_heads.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  table = {"a x": [3.0, 0.0], "b x": [0.0, 1.0], "a y": [1.0, 1.0], "b y": [0.0, -2.0]}
  head = module.text_head(lambda texts: np.array([table[t] for t in texts]), ["x", "y"],
                          ["a {}", "b {}"])
  s = np.sqrt(0.5)
  want = np.array([[0.5, 0.5], [s / 2, (s - 1) / 2]])
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(head, want, atol=1e-6)


# ----------------------------------------------------------------- end to end


def _torch_embeds(model, split_dir):
  """image_embeds by transformers (+ PEFT) of a folder split preprocessed by transformers."""
  processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  files, labels = [], []
  for c, name in enumerate(CLASSES):
    for f in sorted(os.listdir(os.path.join(split_dir, name))):
      files.append(os.path.join(split_dir, name, f))
      labels.append(c)
  pixels = processor(images=[Image.open(f) for f in files], return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    return model(pixel_values=pixels).image_embeds.numpy(), np.array(labels)


def _torch_accuracy(model, split_dir, head, scale):
  embeds, labels = _torch_embeds(model, split_dir)
  logits = scale * heads_lib.normalize(embeds) @ head.T
  return float(np.mean(logits.argmax(1) == labels))


def _prototypes(model, split_dir):
  """Centred class means of the unit embeddings: heads on which the base model is not at chance."""
  embeds, labels = _torch_embeds(model, split_dir)
  unit = heads_lib.normalize(embeds)
  means = heads_lib.normalize(np.stack([unit[labels == c].mean(0) for c in range(len(CLASSES))]))
  return heads_lib.normalize(means - means.mean(0))


def test_run_paper_vision_end_to_end_matches_transformers(tmp_path):
  root = tmp_path / "k"
  model_name = "clip-vit-base-patch32"
  base = str(root / "models" / model_name)
  torch.manual_seed(0)
  transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION)
                                             ).save_pretrained(base)
  tasks = ("mnist", "svhn")
  hf = transformers.CLIPVisionModelWithProjection.from_pretrained(base).eval()
  heads = {}
  for i, t in enumerate(tasks):
    peft_factory.make_clip_adapter(base, str(root / "adapters" / model_name / t),
                                   seed=10 + i, r=4 - i, alpha=2 * (4 - i))
    data = str(root / "datasets" / t)
    _write_folder(data, "val", 3, seed=20 + i, shift=i)
    _write_folder(data, "test", 4, seed=30 + i, shift=i)
    emb = _prototypes(hf, os.path.join(data, "val"))
    heads[t] = emb
    os.makedirs(root / "heads" / model_name, exist_ok=True)
    heads_lib.save_heads(heads_lib.ClassHeads(CLASSES, emb, 50.0),
                         str(root / "heads" / model_name / f"{t}.safetensors"))
  module = _config_module("vit_b32_8tasks")
  config = module.get_config(
      f"root={root},quick,tasks=mnist,svhn,methods=ta,knots_ties,hits_k=1,eval_batch_size=16,"
      f"datasets.mnist.format=folder,datasets.svhn.format=folder,datasets.mnist.val_split=val,"
      f"datasets.svhn.val_split=val,workdir={tmp_path / 'out'},progress=false")
  assert config.tasks == "mnist,svhn" and config.methods == "ta,knots_ties"
  results = paper.run_paper_vision(config)

  rows = results["rows"]
  assert set(rows) == {"zero_shot", "fine_tuned", "ensemble", "ta", "knots_ties"}
  assert results["images"] == {"val": {"mnist": 9, "svhn": 9}, "test": {"mnist": 12, "svhn": 12}}
  assert results["union_labels"] == 3            # "0", "1", "2" shared by both tasks
  for t in tasks:
    test_dir = str(root / "datasets" / t / "test")
    want = _torch_accuracy(hf, test_dir, heads[t], 50.0)
    assert rows["zero_shot"]["tasks"][t]["accuracy"] == pytest.approx(want)
    tuned = peft.PeftModel.from_pretrained(
        transformers.CLIPVisionModelWithProjection.from_pretrained(base),
        str(root / "adapters" / model_name / t)).eval()
    want = _torch_accuracy(tuned, test_dir, heads[t], 50.0)
    assert rows["fine_tuned"]["tasks"][t]["accuracy"] == pytest.approx(want)
  for m in ("ta", "knots_ties"):
    assert rows[m]["best"]["scaling"] in (0.5, 1.0)
  assert os.path.isfile(tmp_path / "out" / "results.json")
  assert "KnOTS-TIES" in open(tmp_path / "out" / "results.md").read()
