"""The paper's image datasets from disk, as the benchmark's in-memory splits.

Two layouts are read (`DatasetSpec.format`):

* `hf`: a Hugging Face `datasets` dataset written with `save_to_disk` (a
  `DatasetDict` with one entry per split); images from `image_key`, integer
  labels from `label_key`, class names from that column's `ClassLabel`
  feature. Needs `pip install datasets` (imported only here, lazily).
* `folder`: an image folder `<path>/<split>/<class name>/*.png|jpg|jpeg`;
  classes are the sub-folders in sorted order, named by the folder name.

A split name may carry a slice, `train[-500:]` or `validation[:1000]`, e.g.
for a validation split held out at the end of the training split.

Images get CLIP's preprocessing (as `transformers.CLIPImageProcessor`):
RGB, shortest side resized to `image_size` (bicubic), centre crop, scaled to
[0, 1], normalized with CLIP's mean and std, laid out [C, H, W] float32.

The benchmark's `Evaluator` holds every split in memory as float32 (0.6 MB
per 224 x 224 image), so `max_examples` caps a split: a seeded subset of
that many examples, the same for the same seed (0: all of them).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image

from knots_jax.experiments.offline.tasks import Split

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("hf", "folder")
_SLICE = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*$")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where one task's data lie and how to read them."""
  task: str
  path: str
  format: str = "hf"              # `hf` (save_to_disk) or `folder`
  image_key: str = "image"        # hf: the image column
  label_key: str = "label"        # hf: the integer label column (a ClassLabel)

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"task `{self.task}`: unknown dataset format `{self.format}`; valid "
                       f"formats: {', '.join(FORMATS)}")


# ------------------------------------------------------------- preprocessing


def preprocess(image: Image.Image, image_size: int) -> np.ndarray:
  """CLIP's preprocessing of one image: [3, S, S] float32, normalized."""
  image = image.convert("RGB")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(image_size * long / short)
  size = (image_size, new_long) if w <= h else (new_long, image_size)
  image = image.resize(size, resample=Image.BICUBIC)
  w, h = image.size
  top, left = (h - image_size) // 2, (w - image_size) // 2
  pixels = np.asarray(image, np.float32)[top:top + image_size, left:left + image_size] / 255.0
  pixels = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
  return np.ascontiguousarray(pixels.transpose(2, 0, 1), np.float32)


def preprocess_batch(images: Sequence[Image.Image], image_size: int) -> np.ndarray:
  """[n, 3, S, S] float32 (see `preprocess`)."""
  if not len(images):
    return np.zeros((0, 3, image_size, image_size), np.float32)
  return np.stack([preprocess(im, image_size) for im in images])


# ------------------------------------------------------------------- splits


def parse_split(split: str) -> tuple[str, slice]:
  """`train[-500:]` -> ("train", slice(-500, None)); `test` -> ("test", slice(None))."""
  match = _SLICE.match(str(split))
  if not match:
    raise ValueError(f"bad split `{split}`; expected a name, optionally sliced: `train`, "
                     "`train[-500:]`, `validation[:1000]`")
  name, lo, hi = match.groups()
  return name, slice(int(lo) if lo else None, int(hi) if hi else None)


def subset(n: int, max_examples: int, seed: int, task: str, split: str) -> np.ndarray:
  """Indices of a seeded subset of `max_examples` of n (sorted; all of them if 0 or >= n)."""
  if max_examples < 0:
    raise ValueError(f"task `{task}`, split `{split}`: max_examples must be >= 0 (0: all), "
                     f"got {max_examples}")
  if not max_examples or max_examples >= n:
    return np.arange(n)
  key = [int(seed)] + [ord(c) for c in f"{task}/{split}"]
  return np.sort(np.random.default_rng(key).choice(n, max_examples, replace=False))


def _folder_listing(spec: DatasetSpec, name: str) -> tuple[list[str], list[int], tuple[str, ...]]:
  root = os.path.join(spec.path, name)
  if not os.path.isdir(root):
    found = sorted(d for d in os.listdir(spec.path)) if os.path.isdir(spec.path) else []
    raise ValueError(f"task `{spec.task}`: no split folder `{root}` (image folder layout "
                     f"<path>/<split>/<class>/*.png|jpg); `{spec.path}` holds {found}")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f"task `{spec.task}`: `{root}` has no class folders")
  files, labels = [], []
  for c, cls in enumerate(classes):
    for f in sorted(os.listdir(os.path.join(root, cls))):
      if f.lower().endswith(IMAGE_SUFFIXES):
        files.append(os.path.join(root, cls, f))
        labels.append(c)
  if not files:
    raise ValueError(f"task `{spec.task}`: no {'/'.join(IMAGE_SUFFIXES)} images under `{root}`")
  return files, labels, tuple(cls.replace("_", " ") for cls in classes)


def _import_datasets():
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading a Hugging Face dataset saved with `save_to_disk` (format `hf`) "
                      "needs the `datasets` package: pip install datasets (or use the image "
                      "folder format, format=folder)") from e
  return datasets


def _hf_split(spec: DatasetSpec, name: str):
  if not os.path.isdir(spec.path):
    raise ValueError(f"task `{spec.task}`: dataset directory `{spec.path}` does not exist")
  data = _import_datasets().load_from_disk(spec.path)
  if name not in data:
    raise ValueError(f"task `{spec.task}`: `{spec.path}` has no split `{name}`; its splits: "
                     f"{sorted(data.keys())}")
  ds = data[name]
  missing = [k for k in (spec.image_key, spec.label_key) if k not in ds.column_names]
  if missing:
    raise ValueError(f"task `{spec.task}`: split `{name}` of `{spec.path}` has no column(s) "
                     f"{missing}; its columns: {ds.column_names} (set image_key / label_key)")
  feature = ds.features[spec.label_key]
  names = getattr(feature, "names", None)
  if not names:
    raise ValueError(f"task `{spec.task}`: column `{spec.label_key}` of `{spec.path}` is not a "
                     "ClassLabel with class names")
  return ds, tuple(str(n) for n in names)


def class_names(spec: DatasetSpec, split: str) -> tuple[str, ...]:
  """The task's class names, in label order (dataset features or folder names)."""
  name, _ = parse_split(split)
  if spec.format == "folder":
    return _folder_listing(spec, name)[2]
  return _hf_split(spec, name)[1]


def load_split(spec: DatasetSpec, split: str, image_size: int, *, max_examples: int = 0,
               seed: int = 0) -> Split:
  """One split of one task, preprocessed for a CLIP of `image_size` (see the module doc)."""
  name, part = parse_split(split)
  if spec.format == "folder":
    files, labels, names = _folder_listing(spec, name)
    index = np.arange(len(files))[part]
    index = index[subset(len(index), max_examples, seed, spec.task, split)]
    images = []
    for i in index:
      try:
        with Image.open(files[i]) as im:
          images.append(preprocess(im, image_size))
      except OSError as e:
        raise ValueError(f"task `{spec.task}`: cannot read image `{files[i]}`: {e}") from e
    pixels = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.float32)
    label_array = np.asarray(labels, np.int32)[index]
  else:
    ds, names = _hf_split(spec, name)
    index = np.arange(len(ds))[part]
    index = index[subset(len(index), max_examples, seed, spec.task, split)]
    rows = ds.select(index.tolist())
    pixels = preprocess_batch(rows[spec.image_key], image_size)
    label_array = np.asarray(rows[spec.label_key], np.int32)
  if not len(label_array):
    raise ValueError(f"task `{spec.task}`: split `{split}` of `{spec.path}` is empty")
  bad = (label_array < 0) | (label_array >= len(names))
  if bad.any():
    raise ValueError(f"task `{spec.task}`: split `{split}` has labels outside 0..{len(names) - 1}")
  return Split(spec.task, split, pixels, label_array, names)


__all__ = ["CLIP_MEAN", "CLIP_STD", "DatasetSpec", "FORMATS", "class_names", "load_split",
           "parse_split", "preprocess", "preprocess_batch", "subset"]
