"""A float64 NumPy reference of the merging methods, written from DESIGN.md §3.

It follows the KnOTS reference implementation step by step, on a whole model
flattened into one vector per task (sorted module names), with no code shared
with the package: dense SVD per layer, components with singular value > tol,
`diag(s) V_i^T` per task, TIES with `kthvalue`-style thresholds over the whole
model, sign election with zeros to the majority, scaling before the disjoint
mean, DARE with keep masks passed in.
"""

from __future__ import annotations

import numpy as np


def flatten(per_module: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
  """{module: [n, ...]} -> [n, d] in sorted module order, plus the layout."""
  names = sorted(per_module)
  layout = [(m, per_module[m].shape[1:]) for m in names]
  flat = np.concatenate([per_module[m].reshape(per_module[m].shape[0], -1) for m in names], axis=1)
  return flat, layout


def unflatten(vector: np.ndarray, layout) -> dict[str, np.ndarray]:
  out, start = {}, 0
  for m, shape in layout:
    size = int(np.prod(shape))
    out[m] = vector[start:start + size].reshape(shape)
    start += size
  return out


def topk_values_mask(x: np.ndarray, top_k: float) -> np.ndarray:
  """Per row of x [n, d]: keep |x| >= the (d - int(d K))-th smallest |x|."""
  k_frac = top_k / 100 if top_k > 1 else top_k
  n, d = x.shape
  if k_frac >= 1:
    return np.ones_like(x, bool)
  k = d - int(d * k_frac)
  kth = np.sort(np.abs(x), axis=1)[:, k - 1:k]
  return np.abs(x) >= kth


def resolve_sign(x: np.ndarray) -> np.ndarray:
  sign = np.sign(x.sum(axis=0))
  majority = np.sign(sign.sum())
  sign[sign == 0] = majority
  return sign


def disjoint_merge(x: np.ndarray, sign: np.ndarray) -> np.ndarray:
  keep = np.where(sign[None] > 0, x > 0, x < 0)
  selected = x * keep
  count = (selected != 0).sum(axis=0)
  return selected.sum(axis=0) / np.maximum(count, 1)


def ties_merge(flat: np.ndarray, top_k: float, scaling: float) -> np.ndarray:
  pruned = flat * topk_values_mask(flat, top_k)
  sign = resolve_sign(pruned)
  return disjoint_merge(scaling * pruned, sign)


def dare(flat: np.ndarray, keep: np.ndarray, p: float) -> np.ndarray:
  return np.where(keep, flat / (1 - p), 0.0)


def knots_decompose(deltas: dict[str, np.ndarray], tol: float = 1e-5):
  """Per module: U [out, k] and per-task diag(s) V_i^T [n, k, in] (column-wise)."""
  us, reps = {}, {}
  for m, d in deltas.items():
    n, out, inp = d.shape
    cat = np.concatenate(list(d), axis=1)
    u, s, vt = np.linalg.svd(cat, full_matrices=False)
    keep = s > tol
    u, s, vt = u[:, keep], s[keep], vt[keep]
    us[m] = u
    reps[m] = np.stack([s[:, None] * vt[:, i * inp:(i + 1) * inp] for i in range(n)])
  return us, reps


def merge(
    deltas: dict[str, np.ndarray],
    method: str,
    *,
    scaling: float = 1.0,
    top_k: float = 30,
    drop_rate: float = 0.9,
    keep_masks: dict[str, np.ndarray] | None = None,
    tol: float = 1e-5,
) -> dict[str, np.ndarray]:
  """Merged dense update per module; deltas: {module: [n, out, in]} float64.

  keep_masks: DARE keep masks per module, shaped like the merged values
  ([n, out, in] for baselines, [n, k, in] for KnOTS).
  """
  knots = method.startswith("knots_")
  base = method.removeprefix("knots_")
  if knots:
    us, values = knots_decompose(deltas, tol)
  else:
    values = deltas
  flat, layout = flatten(values)
  n = flat.shape[0]
  if base in ("dare", "dare_ties"):
    masks, _ = flatten(keep_masks)
    flat = dare(flat, masks, drop_rate)
  if base in ("ta", "dare"):
    merged = scaling * flat.sum(axis=0)
  elif base == "mean":
    merged = scaling * flat.sum(axis=0) / n
  elif base in ("ties", "dare_ties"):
    merged = ties_merge(flat, top_k, scaling)
  else:
    raise ValueError(method)
  per_module = unflatten(merged, [(m, shape) for m, shape in layout])
  if knots:
    return {m: us[m] @ per_module[m] for m in per_module}
  return per_module
