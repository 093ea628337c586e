"""The eight image classification tasks of the offline benchmark: no download, seeded.

Each task draws S x S RGB images (default 32) for given labels; `make_split`
picks balanced labels and draws a split deterministically from
(seed, task name, split name), so the training script and the benchmark see the
same validation and test images without storing them.

| task        | labels                                                         |
|-------------|----------------------------------------------------------------|
| digits      | "0" ... "9": scikit-learn's 8x8 handwritten digits (bundled)    |
| shapes      | circle, square, triangle, cross, ring, diamond                 |
| textures    | checkerboard, polka dots, speckles, mesh, wavy lines, bricks   |
| orientation | "0 degrees" ... "150 degrees": sine gratings, every 30 degrees |
| counting    | "one dot" ... "six dots"                                       |
| colours     | red, orange, yellow, green, cyan, blue, purple, pink           |
| positions   | a small object in one cell of a 3x3 grid ("top left", ...)     |
| stripes     | stripe width, from "very wide stripes" to "very narrow stripes"|

No label name occurs in two tasks (the joint-task union has 56 labels). The
paper's MNIST and SVHN share "0" ... "9", but there a shared name means one
text embedding; here a head is a visual prototype (heads.py), and a name
shared by unrelated images (handwritten "3", three dots) gets a vector between
two clusters that biases both tasks, which was measured and rejected
(docs/offline_benchmark.md).

Digits: the 1797 images are shuffled once (fixed seed) and cut into disjoint
pools, 60% train, 15% val, 25% test; a split samples from its pool (with
replacement when it asks for more) and renders each sample with its own
scale, offset, colours and noise. Procedural tasks draw fresh parameters for
every image, so their splits are disjoint with probability 1.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Callable

import numpy as np

from knots_jax.experiments.offline import render
from knots_jax.experiments.offline.render import col

SPLITS = ("train", "val", "test")
NOISE = 0.06      # largest per-image sigma of the pixel noise (images in [0, 1])


@dataclasses.dataclass(frozen=True)
class Task:
  """A classification task: label names and a renderer.

  `draw(rng, labels [n], size, split) -> images [n, S, S, 3]` in [0, 1].
  """
  name: str
  labels: tuple[str, ...]
  draw: Callable[[np.random.Generator, np.ndarray, int, str], np.ndarray]
  about: str

  @property
  def num_classes(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of one task, ready for the model."""
  task: str
  split: str
  images: np.ndarray          # [n, 3, S, S] float32 in [-1, 1] (the model's input)
  labels: np.ndarray          # [n] int32, indices into label_names
  label_names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


# ------------------------------------------------------------------ renderers


def _centres(rng, n, size, lo, hi):
  """Random centres (cy, cx) [n] in [lo, hi] * size."""
  return rng.uniform(lo, hi, n) * size, rng.uniform(lo, hi, n) * size


SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _shape_distance(kind: np.ndarray, dy, dx, radius):
  """Signed distance (positive inside, px) of each image's shape; dy, dx in its own frame."""
  r = np.hypot(dy, dx)
  R = col(radius)
  # Outward normals of an equilateral triangle with its apex up (y points down).
  tri = np.max(np.stack([np.sin(a) * dy + np.cos(a) * dx
                         for a in np.deg2rad([90.0, 210.0, 330.0])]), axis=0)
  arm = R / 3.0
  plus = np.minimum(np.maximum(np.abs(dx) - R, np.abs(dy) - arm),
                    np.maximum(np.abs(dy) - R, np.abs(dx) - arm))
  table = np.stack([
      R - r,                                      # circle
      0.85 * R - np.maximum(np.abs(dy), np.abs(dx)),   # square
      0.55 * R - tri,                             # triangle (inradius 0.55 R)
      -plus,                                      # cross
      0.22 * R - np.abs(r - 0.72 * R),            # ring
      (1.15 * R - (np.abs(dy) + np.abs(dx))) / np.sqrt(2.0),   # diamond
  ])
  return table[kind, np.arange(len(kind))]


def draw_shapes(rng, labels, size, split):
  del split
  n = len(labels)
  cy, cx = _centres(rng, n, size, 0.35, 0.65)
  radius = rng.uniform(0.2, 0.3, n) * size
  angle = np.deg2rad(rng.uniform(-12.0, 12.0, n))
  y, x = render.grid(size)
  dy, dx = render.rotate(y - col(cy), x - col(cx), angle)
  mask = render.soft(_shape_distance(labels, dy, dx, radius))
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


TEXTURES = ("checkerboard", "polka dots", "speckles", "mesh", "wavy lines", "bricks")


def draw_textures(rng, labels, size, split):
  del split
  n = len(labels)
  y, x = render.grid(size)
  period = col(rng.uniform(5.0, 8.0, n))
  y = y + col(rng.uniform(0, 8, n))
  x = x + col(rng.uniform(0, 8, n))
  half = period / 2
  checker = ((np.floor(y / half) + np.floor(x / half)) % 2).astype(np.float32)
  fy, fx = np.mod(y, period) - half, np.mod(x, period) - half
  dots = render.soft(0.32 * period - np.hypot(fy, fx))
  cells = rng.random((n, size // 2 + 5, size // 2 + 5)) < 0.5      # 2 px speckles
  iy = np.clip((y // 2).astype(int), 0, cells.shape[1] - 1)
  ix = np.clip((x // 2).astype(int), 0, cells.shape[2] - 1)
  speckles = cells[np.arange(n)[:, None, None], iy, ix].astype(np.float32)
  mesh = render.soft(0.8 - np.minimum(np.abs(fy), np.abs(fx)))
  wave = np.sin(2 * np.pi * (y / period + 0.25 * np.sin(2 * np.pi * x / (2.5 * period))))
  wavy = render.soft(1.2 * wave, 0.6)
  row = np.floor(y / half)
  bx = np.mod(x + (row % 2) * period / 2, period)
  mortar = np.minimum(np.abs(np.mod(y, half) - 0.5), np.minimum(bx, period - bx))
  bricks = render.soft(mortar - 0.6)
  table = np.stack([checker, dots, speckles, mesh, wavy, bricks])
  mask = table[labels, np.arange(n)]
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


ORIENTATIONS = tuple(f"{a} degrees" for a in range(0, 180, 30))


def draw_orientation(rng, labels, size, split):
  del split
  n = len(labels)
  theta = np.deg2rad(30.0 * labels + rng.uniform(-6.0, 6.0, n))
  period = rng.uniform(5.0, 10.0, n)
  phase = rng.uniform(0, 2 * np.pi, n)
  y, x = render.grid(size)
  # Bars run along the angle theta (0 degrees: horizontal bars), so the sine varies across it.
  across = -np.sin(col(theta)) * x + np.cos(col(theta)) * y
  mask = 0.5 + 0.5 * np.sin(2 * np.pi * across / col(period) + col(phase))
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask.astype(np.float32), fg, bg), NOISE)


COUNTS = ("one dot", "two dots", "three dots", "four dots", "five dots", "six dots")


def draw_counting(rng, labels, size, split):
  del split
  n, cells = len(labels), 4
  step = size / cells
  order = np.argsort(rng.random((n, cells * cells)), axis=1)       # random cells, no repeats
  slot = order[:, :len(COUNTS)]                                     # [n, 6]
  # Radius <= 0.3 cell and jitter <= 0.15 cell: dots never touch (gap >= 0.1 cell + edges).
  cy = (slot // cells + 0.5 + rng.uniform(-0.15, 0.15, slot.shape)) * step
  cx = (slot % cells + 0.5 + rng.uniform(-0.15, 0.15, slot.shape)) * step
  used = np.arange(len(COUNTS))[None] < (labels + 1)[:, None]       # label k: k + 1 dots
  radius = rng.uniform(0.22, 0.3, n) * step
  y, x = render.grid(size)
  dist = np.hypot(y[..., None] - cy[:, None, None], x[..., None] - cx[:, None, None])
  dist = np.where(used[:, None, None, :], dist, np.inf).min(-1)
  mask = render.soft(col(radius) - dist)
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUES = np.array([0.0, 30.0, 58.0, 120.0, 182.0, 232.0, 278.0, 325.0])


def draw_colours(rng, labels, size, split):
  del split
  n = len(labels)
  hue = _HUES[labels] + rng.uniform(-8.0, 8.0, n)
  sat = rng.uniform(0.65, 1.0, n)
  sat = np.where(labels == COLOURS.index("pink"), sat * 0.6, sat)    # pink: pale magenta
  fg = render.hsv_to_rgb(hue, sat, rng.uniform(0.7, 1.0, n))
  bg = np.repeat(rng.uniform(0.1, 0.9, (n, 1)), 3, axis=1).astype(np.float32)   # grey
  cy, cx = _centres(rng, n, size, 0.35, 0.65)
  ay, ax = rng.uniform(0.18, 0.32, n) * size, rng.uniform(0.18, 0.32, n) * size
  y, x = render.grid(size)
  r = np.hypot((y - col(cy)) / col(ay), (x - col(cx)) / col(ax))
  mask = render.soft((1.0 - r) * col(np.minimum(ay, ax)))
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


POSITIONS = ("top left", "top centre", "top right", "middle left", "centre", "middle right",
             "bottom left", "bottom centre", "bottom right")


def draw_positions(rng, labels, size, split):
  del split
  n = len(labels)
  step = size / 3
  cy = (labels // 3 + 0.5 + rng.uniform(-0.22, 0.22, n)) * step
  cx = (labels % 3 + 0.5 + rng.uniform(-0.22, 0.22, n)) * step
  radius = rng.uniform(0.09, 0.13, n) * size
  kind = rng.integers(0, len(SHAPES), n)
  y, x = render.grid(size)
  mask = render.soft(_shape_distance(kind, y - col(cy), x - col(cx), radius))
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


STRIPES = ("very wide stripes", "wide stripes", "medium stripes", "narrow stripes",
           "very narrow stripes")
_CYCLES = np.array([1.5, 2.5, 4.0, 6.0, 8.5])     # stripe pairs across the image


def draw_stripes(rng, labels, size, split):
  del split
  n = len(labels)
  period = size / (_CYCLES[labels] * rng.uniform(0.93, 1.07, n))
  theta = rng.uniform(0, np.pi, n)
  y, x = render.grid(size)
  across = -np.sin(col(theta)) * x + np.cos(col(theta)) * y
  wave = np.sin(2 * np.pi * across / col(period) + col(rng.uniform(0, 2 * np.pi, n)))
  mask = render.soft(wave * col(period) / (2 * np.pi), 1.0)        # square wave, 1 px edges
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(mask, fg, bg), NOISE)


DIGITS = tuple(str(d) for d in range(10))
_DIGIT_POOLS = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}
_DIGIT_SHUFFLE_SEED = 1797


@functools.lru_cache(maxsize=1)
def _digit_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (images [m, 8, 8] in [0, 1], labels [m])}: disjoint parts of sklearn's digits."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the `digits` task needs scikit-learn (its 8x8 digits are bundled with "
                      "it, no download): pip install scikit-learn") from e
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)
  order = np.random.default_rng(_DIGIT_SHUFFLE_SEED).permutation(len(images))
  pools = {}
  for split, (lo, hi) in _DIGIT_POOLS.items():
    idx = order[int(lo * len(order)):int(hi * len(order))]
    pools[split] = (images[idx], data.target[idx].astype(np.int32))
  return pools


def draw_digits(rng, labels, size, split):
  images, targets = _digit_pools()[split]
  n = len(labels)
  pick = np.empty(n, int)
  for d in np.unique(labels):
    where = np.flatnonzero(targets == d)
    pick[labels == d] = rng.choice(where, int(np.sum(labels == d)),
                                   replace=int(np.sum(labels == d)) > len(where))
  side = rng.integers(int(0.6 * size), int(0.85 * size) + 1, n)
  mask = np.zeros((n, size, size), np.float32)
  for s in np.unique(side):                         # a few distinct sizes: one resize each
    sel = np.flatnonzero(side == s)
    top = rng.integers(0, size - s + 1, len(sel))
    left = rng.integers(0, size - s + 1, len(sel))
    mask[sel] = render.paste(render.resize(images[pick[sel]], int(s)), size, top, left)
  fg, bg = render.contrasting_colours(rng, n)
  return render.add_noise(rng, render.compose(np.clip(mask, 0, 1), fg, bg), NOISE)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", DIGITS, draw_digits, "scikit-learn's handwritten digits, rescaled and coloured"),
    Task("shapes", SHAPES, draw_shapes, "one filled shape"),
    Task("textures", TEXTURES, draw_textures, "a repeating two-colour texture"),
    Task("orientation", ORIENTATIONS, draw_orientation, "a sine grating's orientation"),
    Task("counting", COUNTS, draw_counting, "how many dots"),
    Task("colours", COLOURS, draw_colours, "the hue of an ellipse on grey"),
    Task("positions", POSITIONS, draw_positions, "where a small shape is, on a 3x3 grid"),
    Task("stripes", STRIPES, draw_stripes, "the width of square-wave stripes"),
)}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task `{name}`; valid tasks: {', '.join(TASKS)}")
  return TASKS[name]


# --------------------------------------------------------------------- splits


def split_rng(seed: int, name: str, split: str) -> np.random.Generator:
  """The generator of one (seed, task, split): independent of every other split."""
  if split not in SPLITS:
    raise ValueError(f"unknown split `{split}`; valid splits: {', '.join(SPLITS)}")
  return np.random.default_rng([int(seed), zlib.crc32(name.encode()), SPLITS.index(split)])


def to_pixels(images: np.ndarray) -> np.ndarray:
  """[n, S, S, 3] in [0, 1] -> the model's input [n, 3, S, S] in [-1, 1], float32."""
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2) * 2.0 - 1.0, dtype=np.float32)


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
  """n labels, every class equally often (up to one), in random order."""
  return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def make_split(name: str, split: str, n: int, *, seed: int, size: int = 32) -> Split:
  """`n` images of task `name` for `split`, the same for the same (seed, size)."""
  task = get_task(name)
  if n < 1:
    raise ValueError(f"task `{name}`, split `{split}`: n must be positive, got {n}")
  if size < 8:
    raise ValueError(f"image size must be at least 8 pixels, got {size}")
  rng = split_rng(seed, name, split)
  labels = balanced_labels(rng, n, task.num_classes)
  images = task.draw(rng, labels, size, split)
  return Split(name, split, to_pixels(images), labels, task.labels)


__all__ = ["Task", "Split", "TASKS", "SPLITS", "get_task", "make_split", "split_rng",
           "to_pixels", "balanced_labels"]
