"""Drawing primitives for the synthetic images: vectorized over a batch, NumPy only.

Every function takes per-image parameters as arrays of shape [n] (or [n, 3] for
colours) and returns a batch: masks [n, S, S] in [0, 1], images [n, S, S, 3] in
[0, 1]. Coordinates are in pixels of an S x S image, y pointing down; edges are
anti-aliased over about one pixel (`soft`), so that small shapes survive the
low resolution. Randomness comes only from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import numpy as np


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (y, x), each [1, S, S], in pixels."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  return y[None], x[None]


def col(v: np.ndarray) -> np.ndarray:
  """A per-image parameter [n] broadcast against [n, S, S]."""
  return np.asarray(v, np.float32)[:, None, None]


def soft(signed_distance: np.ndarray, width: float = 1.0) -> np.ndarray:
  """Coverage of a shape from its signed distance (positive inside), smoothed over `width` px."""
  return np.clip(0.5 + signed_distance / width, 0.0, 1.0).astype(np.float32)


def rotate(dy: np.ndarray, dx: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Offsets rotated by -angle (radians, [n]): the frame of a shape rotated by +angle."""
  c, s = np.cos(col(angle)), np.sin(col(angle))
  return c * dy - s * dx, s * dy + c * dx


def compose(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
  """Paints `fg` [n, 3] over `bg` ([n, 3] or an image [n, S, S, 3]) where `mask` [n, S, S]."""
  if bg.ndim == 2:
    bg = np.broadcast_to(bg[:, None, None, :], mask.shape + (3,))
  m = mask[..., None]
  return (bg * (1.0 - m) + fg[:, None, None, :] * m).astype(np.float32)


def contrasting_colours(rng: np.random.Generator, n: int,
                        gap: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
  """Foreground and background colours [n, 3] whose mean brightness differs by >= `gap`.

  One of the two is drawn from the dark band [0, (1 - gap) / 2], the other from
  the light band above it; which one is dark is random.
  """
  band = (1.0 - gap) / 2.0
  dark = rng.uniform(0.0, band, (n, 3))
  light = rng.uniform(1.0 - band, 1.0, (n, 3))
  fg_dark = rng.random(n) < 0.5
  fg = np.where(fg_dark[:, None], dark, light)
  bg = np.where(fg_dark[:, None], light, dark)
  return fg.astype(np.float32), bg.astype(np.float32)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """HSV (hue in degrees, saturation and value in [0, 1]), each [n], to RGB [n, 3]."""
  h = np.mod(h, 360.0) / 60.0
  c = v * s
  x = c * (1.0 - np.abs(np.mod(h, 2.0) - 1.0))
  zero = np.zeros_like(c)
  sector = np.floor(h).astype(int) % 6
  table = np.stack([np.stack(t, -1) for t in (
      (c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x))], 0)
  rgb = table[sector, np.arange(len(h))]
  return (rgb + (v - c)[:, None]).astype(np.float32)


def add_noise(rng: np.random.Generator, images: np.ndarray, max_sigma: float) -> np.ndarray:
  """Gaussian pixel noise with a per-image sigma in [0, max_sigma], clipped to [0, 1]."""
  sigma = rng.uniform(0.0, max_sigma, len(images)).astype(np.float32)
  noise = rng.standard_normal(images.shape, dtype=np.float32) * sigma[:, None, None, None]
  return np.clip(images + noise, 0.0, 1.0)


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """The [n_out, n_in] matrix of 1-D linear interpolation (pixel centres aligned)."""
  pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  pos = np.clip(pos, 0.0, n_in - 1.0)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  out = np.zeros((n_out, n_in), np.float32)
  out[np.arange(n_out), lo] += 1.0 - frac
  out[np.arange(n_out), hi] += frac
  return out


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of square grey images [n, h, h] to [n, size, size]."""
  m = resize_matrix(images.shape[-1], size)
  return np.einsum("oi,nij,pj->nop", m, images.astype(np.float32), m)


def paste(images: np.ndarray, size: int, top: np.ndarray, left: np.ndarray) -> np.ndarray:
  """Pastes grey images [n, h, h] into zero canvases [n, size, size] at (top, left) [n]."""
  n, h = images.shape[0], images.shape[-1]
  canvas = np.zeros((n, size, size), np.float32)
  rows = top[:, None] + np.arange(h)[None]            # [n, h]
  cols = left[:, None] + np.arange(h)[None]
  canvas[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
  return canvas
