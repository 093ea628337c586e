"""The offline benchmark: datasets, heads, the pipeline end to end, the shipped assets.

Independent references: the images are checked by measuring them (connected
components, centroids, hues) instead of trusting the renderer; the pipeline's
zero-shot and fine-tuned accuracies are recomputed with transformers + PEFT
(torch) from the files it wrote; heads against a NumPy formula.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from scipy import ndimage

import knots_jax
from knots_jax.evaluation import metrics
from knots_jax.experiments.offline import assets as assets_lib
from knots_jax.experiments.offline import benchmark, heads, render, tasks, vit

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SHIPPED = os.path.join(ROOT, "assets", "offline")


def load_config(arg=""):
  path = os.path.join(ROOT, "configs", "offline_benchmark.py")
  spec = importlib.util.spec_from_file_location("offline_benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ------------------------------------------------------------------ datasets


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_splits_are_deterministic_balanced_and_in_range(name):
  a = tasks.make_split(name, "val", 40, seed=3, size=32)
  b = tasks.make_split(name, "val", 40, seed=3, size=32)
  other_seed = tasks.make_split(name, "val", 40, seed=4, size=32)
  other_split = tasks.make_split(name, "test", 40, seed=3, size=32)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.images, other_seed.images)
  assert not np.array_equal(a.images, other_split.images)
  c = len(a.label_names)
  assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == np.float32
  assert a.labels.dtype == np.int32 and a.labels.min() >= 0 and a.labels.max() < c
  counts = np.bincount(a.labels, minlength=c)
  assert counts.max() - counts.min() <= 1                    # balanced
  assert np.isfinite(a.images).all() and a.images.min() >= -1 and a.images.max() <= 1
  assert a.images.std() > 0.1                                 # not blank


def test_label_names_are_distinct_across_tasks():
  names, maps = metrics.union_labels({t: task.labels for t, task in tasks.TASKS.items()})
  assert len(names) == sum(len(task.labels) for task in tasks.TASKS.values()) == 56


def test_digit_pools_are_disjoint_and_cover_the_dataset():
  from sklearn.datasets import load_digits
  pools = tasks._digit_pools()
  assert sum(len(p[0]) for p in pools.values()) == len(load_digits().images)
  # The same underlying image never appears in two pools (compare raw bytes).
  seen = {}
  for split, (images, _) in pools.items():
    for img in images:
      seen.setdefault(img.tobytes(), set()).add(split)
  assert sum(len(s) > 1 for s in seen.values()) <= 2          # sklearn's digits repeat a few


def _foreground(images01):
  """Masks of pixels whose brightness differs from the image's median by > 0.2."""
  brightness = images01.mean(-1)
  return np.abs(brightness - np.median(brightness, axis=(1, 2), keepdims=True)) > 0.2


def test_counting_images_show_label_plus_one_dots():
  rng = np.random.default_rng(0)
  labels = np.arange(60) % 6
  masks = _foreground(tasks.draw_counting(rng, labels, 32, "test"))
  counted = np.array([ndimage.label(m)[1] for m in masks])
  assert np.mean(counted == labels + 1) >= 0.95


def test_positions_images_put_the_object_in_the_labelled_cell():
  rng = np.random.default_rng(1)
  labels = np.arange(90) % 9
  masks = _foreground(tasks.draw_positions(rng, labels, 32, "test"))
  cells = []
  for m in masks:
    cy, cx = ndimage.center_of_mass(m)
    cells.append(int(cy // (32 / 3)) * 3 + int(cx // (32 / 3)))
  assert np.mean(np.array(cells) == labels) >= 0.95


def test_colours_images_have_the_labelled_hue():
  import colorsys
  rng = np.random.default_rng(2)
  labels = np.arange(80) % 8
  images = ndimage.uniform_filter(tasks.draw_colours(rng, labels, 32, "test"), size=(1, 3, 3, 1))
  hues = []
  for img in images:                    # the ellipse: pixels far from the (grey) median colour
    far = np.linalg.norm(img - np.median(img, axis=(0, 1)), axis=-1) > 0.15
    hues.append(colorsys.rgb_to_hsv(*img[far].mean(0))[0] * 360)
  hues = np.array(hues)
  target = tasks._HUES[labels]
  diff = np.abs((hues - target + 180) % 360 - 180)
  assert np.mean(diff < 20) >= 0.95


def test_resize_matches_a_direct_bilinear_formula():
  x = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
  m = render.resize_matrix(4, 8)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  # Output pixel 3 of 8 sits at input coordinate (3.5 * 4/8 - 0.5) = 1.25.
  np.testing.assert_allclose(m[3], [0, 0.75, 0.25, 0], atol=1e-6)
  out = render.resize(x, 8)
  np.testing.assert_allclose(out[1, 3, 3], m[3] @ x[1] @ m[3], rtol=1e-5)


def test_unknown_task_and_split_are_named():
  with pytest.raises(ValueError, match="unknown task `cars`.*digits"):
    tasks.make_split("cars", "val", 4, seed=0)
  with pytest.raises(ValueError, match="unknown split `dev`"):
    tasks.make_split("shapes", "dev", 4, seed=0)


# --------------------------------------------------------------------- heads


def test_prototype_heads_follow_the_formula_and_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  emb = {"a": rng.normal(size=(12, 5)), "b": rng.normal(size=(6, 5))}
  lab = {"a": np.arange(12) % 3, "b": np.arange(6) % 2}
  names = {"a": ["x", "y", "z"], "b": ["u", "v"]}
  got = heads.prototype_heads(emb, lab, names, logit_scale=7.0)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  means = np.stack([unit(unit(emb[t])[lab[t] == c].sum(0))
                    for t in "ab" for c in range(len(names[t]))])
  expected = unit(means - means.mean(0))
  np.testing.assert_allclose(got.matrix(["x", "y", "z", "u", "v"]), expected, atol=1e-5)
  x = rng.normal(size=(4, 5))
  np.testing.assert_allclose(got.logits(x, ["v", "x"]), 7.0 * unit(x) @ expected[[4, 0]].T,
                             atol=1e-5)
  path = str(tmp_path / "heads.safetensors")
  heads.save_heads(got, path)
  back = heads.load_heads(path)
  assert back.names == got.names and back.logit_scale == 7.0
  np.testing.assert_array_equal(back.embeddings, got.embeddings)
  (tmp_path / "bad.safetensors").write_bytes(b"not a file")
  with pytest.raises(ValueError, match="bad.safetensors: not a class-heads file"):
    heads.load_heads(str(tmp_path / "bad.safetensors"))


# ------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("offline")
  config = load_config("quick")
  config.cache_dir = str(root / "cache")
  config.workdir = str(root / "work")
  config.progress = False
  return config, benchmark.run_benchmark(config)


def test_pipeline_writes_the_table(quick_run):
  config, results = quick_run
  methods = ["ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties"]
  assert results["methods"] == methods
  with open(os.path.join(config.workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk["rows"].keys() == results["rows"].keys()
  text = open(os.path.join(config.workdir, "results.md")).read()
  for name in ["Zero-shot", "Fine-tuned", "TA", "TIES", "DARE-TIES", "KnOTS-TIES",
               "KnOTS-DARE-TIES", "Ensemble", "Hits@1", "Hits@5"]:
    assert f"| {name} |" in text or name in text
  tasks_ = results["tasks"]
  for m in methods + ["zero_shot", "ensemble"]:
    row = results["rows"][m]
    union = row["joint"][metrics.UNION]
    assert union["hits@1"] <= union["hits@3"] <= union["hits@5"]
    assert union["examples"] == len(tasks_) * config.data.test
  for m in methods:
    row = results["rows"][m]
    # The search's own test score is the mean of the per-task ratios reported here.
    mean = np.mean([row["tasks"][t]["normalized"] for t in tasks_])
    assert row["test_score"] == pytest.approx(mean, abs=1e-9)
    assert row["average"]["normalized"] == pytest.approx(mean, abs=1e-9)
  assert results["union_labels"] == sum(len(tasks.TASKS[t].labels) for t in tasks_)


def test_fine_tuned_normalized_accuracy_is_one(quick_run):
  _, results = quick_run
  row = results["rows"]["fine_tuned"]
  assert all(v["normalized"] == 1.0 for v in row["tasks"].values())
  assert row["average"]["normalized"] == 1.0


def test_accuracies_match_transformers_and_peft(quick_run):
  """Zero-shot and fine-tuned test accuracies recomputed in torch from the written files."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  config, results = quick_run
  found = assets_lib.load_assets(config.cache_dir)
  task = results["tasks"][0]
  split = tasks.make_split(task, "test", config.data.test, seed=config.seed,
                           size=config.model.image_size)
  base = transformers.CLIPVisionModelWithProjection.from_pretrained(found.base_dir).eval()
  model = peft.PeftModel.from_pretrained(base, found.adapter_dirs[task]).eval()
  head = found.heads.matrix(split.label_names)

  def accuracy(embeds):
    return float(np.mean(np.argmax(found.heads.logits(embeds, split.label_names), 1)
                         == split.labels))

  with torch.no_grad():
    pixels = torch.from_numpy(split.images)
    tuned = model(pixel_values=pixels).image_embeds.numpy()
    with model.disable_adapter():
      zero = model(pixel_values=pixels).image_embeds.numpy()
  assert head.shape[0] == len(split.label_names)
  n = len(split)
  assert abs(accuracy(tuned) - results["rows"]["fine_tuned"]["tasks"][task]["accuracy"]) <= 1 / n
  assert abs(accuracy(zero) - results["rows"]["zero_shot"]["tasks"][task]["accuracy"]) <= 1 / n


def test_written_adapters_are_rank_16_on_attention(quick_run):
  config, results = quick_run
  found = assets_lib.load_assets(config.cache_dir)
  adapters = knots_jax.load_adapters([found.adapter_dirs[t] for t in results["tasks"]])
  layers = config.model.num_layers
  assert len(adapters.module_names) == 4 * layers
  assert {m.rsplit(".", 1)[-1] for m in adapters.module_names} == set(vit.TARGET_MODULES)
  for ad in adapters.adapters:
    assert {f.rank for f in ad.modules.values()} == {16}
    assert {f.scale for f in ad.modules.values()} == {1.0}


def test_second_run_reuses_the_cache_and_repeats_the_numbers(quick_run, tmp_path):
  config, results = quick_run
  manifest_before = os.path.getmtime(os.path.join(config.cache_dir, assets_lib.MANIFEST))
  again = config.copy_and_resolve_references()
  again.workdir = str(tmp_path / "again")
  second = benchmark.run_benchmark(again)
  assert os.path.getmtime(os.path.join(config.cache_dir, assets_lib.MANIFEST)) == manifest_before
  for m in results["rows"]:
    assert second["rows"][m]["tasks"] == results["rows"][m]["tasks"]
    assert second["rows"][m].get("joint") == results["rows"][m].get("joint")


def test_data_based_merges_of_one_task_give_back_its_fine_tuned_model(quick_run, tmp_path):
  """RegMean and Fisher averaging of a single adapter are that adapter (merged
  into the weights instead of attached): the same test accuracy, up to the
  rounding of the two computations."""
  config, _ = quick_run
  one = config.copy_and_resolve_references()
  one.tasks = "colours"
  one.methods = "regmean,fisher"
  one.workdir = str(tmp_path / "one")
  results = benchmark.run_benchmark(one)
  tuned = results["rows"]["fine_tuned"]["tasks"]["colours"]["accuracy"]
  for m in ("regmean", "fisher"):
    assert results["rows"][m]["tasks"]["colours"]["accuracy"] == pytest.approx(
        tuned, abs=1.5 / one.data.test), m
  assert "| RegMean |" in open(os.path.join(one.workdir, "results.md")).read()


def test_bad_config_and_assets_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown preset `fast`"):
    load_config("fast")
  with pytest.raises(ValueError, match="unknown field `lora.rnak`"):
    load_config("lora.rnak=4")
  config = load_config("")
  config.assets = str(tmp_path)
  with pytest.raises(ValueError, match="manifest.json: missing"):
    benchmark.resolve_assets(config)
  with open(os.path.join(SHIPPED, assets_lib.MANIFEST)) as f:
    old = {**json.load(f), "assets_version": 0}      # assets made by older code
  (tmp_path / assets_lib.MANIFEST).write_text(json.dumps(old))
  with pytest.raises(ValueError, match=r"different training config \(assets_version: 0 -> 1"):
    benchmark.resolve_assets(config)
  config = load_config("lora.rank=8")
  config.assets = SHIPPED
  with pytest.raises(ValueError, match=r"manifest.json: these assets were made with a different "
                                       r"training config \(lora.rank: 16 -> 8"):
    benchmark.resolve_assets(config)


# ------------------------------------------------------------ shipped assets


def test_shipped_assets_load_and_adapters_beat_chance():
  config = load_config("")
  found = benchmark.resolve_assets(config)          # the default config matches the files
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
  assert total < 8e6
  names = assets_lib.task_names(config)
  assert list(found.manifest["tasks"]) == names and len(names) == 8
  adapters = knots_jax.load_adapters([found.adapter_dirs[t] for t in names], names=names)
  ev = benchmark.Evaluator.create(found, names, adapters.module_names,
                                  load_config("data.val=2,data.test=60"))
  for adapter in adapters.adapters:
    ev.use_adapter(adapter)
    acc = ev.accuracies(ev.embeds("test", [adapter.name]), "test")[adapter.name]
    chance = 1 / len(tasks.TASKS[adapter.name].labels)
    assert acc > chance + 0.25, (adapter.name, acc)
