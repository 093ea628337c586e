"""The pretraining mixture: random procedural images with generic attributes to predict.

The base ViT is pretrained on these, never on the eight tasks' data (tasks.py),
so that it starts with generic visual features (colour, position, orientation,
spatial frequency, object form, stroke shapes) the way CLIP starts from web
images. Every image has a smooth two-colour sine background; on it, half of
the images carry one to three random objects (ellipses, lobed blobs, thick
line segments, painted in order), the other half one glyph of a fixed random
"alphabet" (three strokes between points of a 3 x 3 lattice, randomly placed,
scaled, slanted and coloured). The glyphs exist so that the features resolve
stroke shapes, not only coarse colour and layout; they are not digits.

| target      | classes | images  | what                                              |
|-------------|---------|---------|---------------------------------------------------|
| bg_angle    | 4       | all     | orientation of the background sine, 45-degree bins|
| bg_cycles   | 3       | all     | its frequency: 1, 2 or 3.5 cycles per image        |
| count       | 3       | objects | number of objects                                  |
| kind        | 3       | objects | form of the top object: ellipse, blob, line        |
| hue         | 6       | objects | hue of the top object, 60-degree bins              |
| quadrant    | 4       | all     | quadrant of the top object's / the glyph's centre  |
| glyph       | 32      | glyphs  | which glyph of the alphabet                        |

A target that does not apply to an image is -1 (ignored by the loss).
"""

from __future__ import annotations

import itertools

import numpy as np

from knots_jax.experiments.offline import render
from knots_jax.experiments.offline.render import col
from knots_jax.experiments.offline.tasks import to_pixels

TARGETS: dict[str, int] = {"bg_angle": 4, "bg_cycles": 3, "count": 3, "kind": 3, "hue": 6,
                           "quadrant": 4, "glyph": 32}
IGNORE = -1
_BG_CYCLES = np.array([1.0, 2.0, 3.5])
_MAX_OBJECTS = 3
_STROKES = 3
_ALPHABET_SEED = 20250101


def alphabet(size: int = TARGETS["glyph"], seed: int = _ALPHABET_SEED) -> np.ndarray:
  """[size, strokes, 2 ends, (y, x)]: distinct glyphs of 3 strokes on a 3 x 3 lattice in [-1, 1]."""
  points = np.array([(y, x) for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)])
  segments = list(itertools.combinations(range(9), 2))
  rng = np.random.default_rng(seed)
  glyphs: list[tuple] = []
  while len(glyphs) < size:
    pick = tuple(sorted(rng.choice(len(segments), _STROKES, replace=False)))
    if pick not in glyphs:
      glyphs.append(pick)
  return np.array([[points[list(segments[s])] for s in g] for g in glyphs], np.float32)


def _segment_distance(py, px, ends):
  """Distance [n, S, S] from pixels to the nearest of each image's segments ends [n, k, 2, 2]."""
  ay, ax = ends[:, :, 0, 0][:, :, None, None], ends[:, :, 0, 1][:, :, None, None]
  by, bx = ends[:, :, 1, 0][:, :, None, None], ends[:, :, 1, 1][:, :, None, None]
  py, px = py[:, None], px[:, None]
  vy, vx = by - ay, bx - ax
  t = np.clip(((py - ay) * vy + (px - ax) * vx) / np.maximum(vy * vy + vx * vx, 1e-9), 0, 1)
  return np.hypot(py - ay - t * vy, px - ax - t * vx).min(axis=1)


def _glyphs(rng, n, size, y, x):
  """Masks [n, S, S], glyph ids [n] and centres (cy, cx) [n] of one random glyph per image."""
  shapes = alphabet()
  ids = rng.integers(0, len(shapes), n)
  scale = rng.uniform(0.2, 0.32, n) * size                         # half-width of the lattice
  cy, cx = rng.uniform(0.35, 0.65, n) * size, rng.uniform(0.35, 0.65, n) * size
  angle, shear = rng.uniform(-0.3, 0.3, n), rng.uniform(-0.25, 0.25, n)
  ends = shapes[ids]                                                # [n, 3, 2, 2]
  ey, ex = ends[..., 0], ends[..., 1] + shear[:, None, None] * ends[..., 0]
  c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  ends = np.stack([c * ey + s * ex, -s * ey + c * ex], -1) * scale[:, None, None, None]
  ends = ends + np.stack([cy, cx], -1)[:, None, None, :]
  width = col(rng.uniform(0.07, 0.11, n) * scale)
  return render.soft(width - _segment_distance(y, x, ends)), ids, cy, cx


def _object_mask(rng, kind, size, y, x):
  """Masks [n, S, S] of one random object per image and its centre (cy, cx) [n]."""
  n = len(kind)
  cy, cx = rng.uniform(0.15, 0.85, n) * size, rng.uniform(0.15, 0.85, n) * size
  radius = rng.uniform(0.1, 0.22, n) * size
  angle = rng.uniform(0, np.pi, n)
  dy, dx = render.rotate(y - col(cy), x - col(cx), angle)
  aspect, r = col(rng.uniform(0.5, 1.0, n)), col(radius)
  ellipse = (1.0 - np.hypot(dy / (aspect * r), dx / r)) * r * aspect
  lobes = col(rng.integers(2, 6, n))
  phi = np.arctan2(dy, dx)
  blob = r * (1.0 + 0.35 * np.cos(lobes * phi)) - np.hypot(dy, dx)
  line = np.minimum(0.12 * r + 0.8 - np.abs(dy), 1.3 * r - np.abs(dx))
  table = np.stack([ellipse, blob, line])
  return render.soft(table[kind, np.arange(n)]), cy, cx


def _background(rng, n, size, y, x):
  angle = rng.uniform(0, np.pi, n)
  cycles = rng.integers(0, len(_BG_CYCLES), n)
  across = -np.sin(col(angle)) * x + np.cos(col(angle)) * y
  wave = 0.5 + 0.5 * np.sin(2 * np.pi * across * col(_BG_CYCLES[cycles]) / size
                            + col(rng.uniform(0, 2 * np.pi, n)))
  c0 = rng.uniform(0, 1, (n, 3))
  c1 = np.clip(c0 + rng.uniform(-0.3, 0.3, (n, 3)), 0, 1)        # a low-contrast background
  images = render.compose(wave.astype(np.float32), c1.astype(np.float32), c0.astype(np.float32))
  angle_bin = np.floor(np.mod(np.rad2deg(angle) + 22.5, 180.0) / 45.0) % 4
  return images, angle_bin, cycles


def make_scenes(rng: np.random.Generator, n: int, size: int = 32
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """`n` images [n, 3, S, S] in [-1, 1] and {target: labels [n] int32, -1 = not applicable}."""
  y, x = render.grid(size)
  images, bg_angle, bg_cycles = _background(rng, n, size, y, x)
  has_glyph = rng.random(n) < 0.5
  count = rng.integers(1, _MAX_OBJECTS + 1, n)
  top_kind = top_hue = top_cy = top_cx = None
  for i in range(_MAX_OBJECTS):
    kind = rng.integers(0, 3, n)
    hue = rng.uniform(0, 360, n)
    colour = render.hsv_to_rgb(hue, rng.uniform(0.6, 1.0, n), rng.uniform(0.5, 1.0, n))
    mask, cy, cx = _object_mask(rng, kind, size, y, x)
    painted = (i < count) & ~has_glyph
    images = np.where(painted[:, None, None, None], render.compose(mask, colour, images), images)
    top = (i == count - 1) | (top_kind is None)
    top_kind = np.where(top, kind, top_kind)
    top_hue = np.where(top, hue, top_hue)
    top_cy, top_cx = np.where(top, cy, top_cy), np.where(top, cx, top_cx)
  mask, glyph, gy, gx = _glyphs(rng, n, size, y, x)
  colour = render.hsv_to_rgb(rng.uniform(0, 360, n), rng.uniform(0.0, 1.0, n),
                             rng.choice([0.05, 1.0], n))               # near black or bright
  images = np.where(has_glyph[:, None, None, None], render.compose(mask, colour, images), images)
  cy, cx = np.where(has_glyph, gy, top_cy), np.where(has_glyph, gx, top_cx)
  images = render.add_noise(rng, images, 0.05)
  targets = {
      "bg_angle": bg_angle,
      "bg_cycles": bg_cycles,
      "count": np.where(has_glyph, IGNORE, count - 1),
      "kind": np.where(has_glyph, IGNORE, top_kind),
      "hue": np.where(has_glyph, IGNORE, np.floor(top_hue / 60.0) % 6),
      "quadrant": (cy >= size / 2) * 2 + (cx >= size / 2),
      "glyph": np.where(has_glyph, glyph, IGNORE),
  }
  return to_pixels(images), {k: np.asarray(v, np.int32) for k, v in targets.items()}


__all__ = ["TARGETS", "IGNORE", "alphabet", "make_scenes"]
