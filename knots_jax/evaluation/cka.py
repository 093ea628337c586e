"""Linear CKA, and the paper's alignment analysis of task updates (Fig. 2).

Linear centered kernel alignment (Kornblith et al. 2019, "Similarity of Neural
Network Representations Revisited", arXiv:1905.00414) of activations
X [n, d1] and Y [n, d2] of the same n inputs:

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),  K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2,  H = I - 1 1^T / n,

which for centered columns equals ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
It is 1 for X = Y and invariant to orthogonal transforms and isotropic scaling
of either side.

KnOTS (Stoica et al. 2025, Sec. 3-4, Fig. 2) measures how aligned the task
updates of a layer are with the CKA of their outputs on the same inputs x:
before alignment `x dW_i^T` per task i. After KnOTS, `dW_i = U diag(s) V_i^T`
with U shared; the output is `(x V_i) diag(s) U^T`. Since U has orthonormal
columns and diag(s) is shared too, the CKA of `x V_i diag(s)` (or of
`x V_i diag(s) U^T`) between tasks is exactly the CKA before alignment: the
decomposition alone changes nothing. What differs after KnOTS is the per-task
part that is merged, `V_i^T`: `task_update_cka` compares `x V_i` (the
activations of each task in the shared, whitened basis, the singular values
removed) by default, and gives the `x V_i diag(s)` variant (`after="sv"`) to
show the identity.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from knots_jax.alignment import decompose

ArrayLike = np.ndarray | Sequence[Sequence[float]]
AFTER = ("v", "sv")


def _centered(x: ArrayLike, name: str, n: int | None = None) -> np.ndarray:
  """Column-centered float64 [n, d], scaled to unit Frobenius norm (CKA does not change)."""
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
    raise ValueError(f"{name} must be [examples >= 2, features >= 1], got shape {a.shape}")
  if n is not None and a.shape[0] != n:
    raise ValueError(f"{name} has {a.shape[0]} examples but the others have {n}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} has NaN or inf values")
  peak = float(np.abs(a).max())
  if peak > 0:
    a = a / peak             # no overflow in the norms below, whatever the scale
  centered = a - a.mean(axis=0, keepdims=True)
  norm = np.linalg.norm(centered)
  if norm == 0 or norm <= 1e-12 * np.linalg.norm(a):
    raise ValueError(f"{name} is constant over the examples (zero variance): CKA is undefined")
  return centered / norm


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
  """Linear CKA of activations x [n, d1] and y [n, d2] of the same n inputs, in [0, 1].

  Computed in float64 on column-centered, norm-scaled copies; with d << n from
  the d x d cross-covariances, else from the n x n Gram matrices.

  Raises:
    ValueError: shapes disagree, fewer than 2 examples, NaN, or a constant input.
  """
  a = _centered(x, "x")
  b = _centered(y, "y", a.shape[0])
  return _cka_centered(a, b)


def _cka_centered(a: np.ndarray, b: np.ndarray) -> float:
  if a.shape[0] <= max(a.shape[1], b.shape[1]):
    ka, kb = a @ a.T, b @ b.T
    value = np.sum(ka * kb) / (np.linalg.norm(ka) * np.linalg.norm(kb))
  else:
    value = (np.linalg.norm(b.T @ a) ** 2
             / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))
  return float(np.clip(value, 0.0, 1.0))


def pairwise_cka(activations: Sequence[ArrayLike], names: Sequence[str] | None = None) -> np.ndarray:
  """Symmetric [T, T] matrix of `linear_cka` between every pair of activations (1 on the diagonal)."""
  if len(activations) < 1:
    raise ValueError("pairwise_cka: no activations")
  names = list(names) if names is not None else [f"activations[{i}]" for i in range(len(activations))]
  first = np.asarray(activations[0])
  centered = [_centered(x, names[i], first.shape[0] if first.ndim == 2 else None)
              for i, x in enumerate(activations)]
  t = len(centered)
  out = np.eye(t)
  for i in range(t):
    for j in range(i + 1, t):
      out[i, j] = out[j, i] = _cka_centered(centered[i], centered[j])
  return out


def mean_off_diagonal(matrix: np.ndarray) -> float:
  """Mean of the entries off the diagonal of a square [T, T] matrix (T >= 2)."""
  m = np.asarray(matrix, dtype=np.float64)
  if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
    raise ValueError(f"need a square matrix of at least 2 x 2, got shape {m.shape}")
  return float(m[~np.eye(m.shape[0], dtype=bool)].mean())


@dataclasses.dataclass(frozen=True)
class CKAReport:
  """Pairwise CKA between the tasks' update outputs, per module, before and after KnOTS."""
  modules: tuple[str, ...]
  tasks: tuple[str, ...]
  before: np.ndarray      # [modules, T, T]
  after: np.ndarray       # [modules, T, T]
  after_kind: str = "v"

  def summary(self) -> dict:
    """Mean off-diagonal CKA per module and over modules, before vs after."""
    per_module = [{"module": m, "before": mean_off_diagonal(b), "after": mean_off_diagonal(a)}
                  for m, b, a in zip(self.modules, self.before, self.after)]
    return {"after_kind": self.after_kind,
            "before": float(np.mean([r["before"] for r in per_module])),
            "after": float(np.mean([r["after"] for r in per_module])),
            "per_module": per_module}

  def to_records(self) -> list[dict]:
    """One row per module and unordered task pair: {module, task_a, task_b, before, after}."""
    rows = []
    for m, b, a in zip(self.modules, self.before, self.after):
      for i in range(len(self.tasks)):
        for j in range(i + 1, len(self.tasks)):
          rows.append({"module": m, "task_a": self.tasks[i], "task_b": self.tasks[j],
                       "before": float(b[i, j]), "after": float(a[i, j])})
    return rows


def update_activations(x: ArrayLike, b: np.ndarray, a: np.ndarray) -> list[np.ndarray]:
  """`x dW_i^T = (x A_i^T) B_i^T` per task, from factors b [T, out, r], a [T, r, in]."""
  x = np.asarray(x, dtype=np.float64)
  return [(x @ a[i].astype(np.float64).T) @ b[i].astype(np.float64).T for i in range(b.shape[0])]


def aligned_activations(x: ArrayLike, s: np.ndarray, rep: np.ndarray, valid: np.ndarray,
                        after: str = "v") -> list[np.ndarray]:
  """Per task `x V_i` ("v") or `x V_i diag(s)` ("sv") over the kept components.

  `rep` [T, K, in] is KnOTS's `diag(s) V_i^T` (zero where not `valid`).
  """
  if after not in AFTER:
    raise ValueError(f"after must be one of {AFTER}, got `{after}`")
  keep = np.asarray(valid, bool)
  if not keep.any():
    raise ValueError("the alignment kept no components (every singular value <= tol)")
  rep = np.asarray(rep, np.float64)[:, keep]          # [T, k, in]
  if after == "v":
    rep = rep / np.asarray(s, np.float64)[keep][None, :, None]
  x = np.asarray(x, dtype=np.float64)
  return [x @ rep[i].T for i in range(rep.shape[0])]


def task_update_cka(
    alignment: decompose.Alignment,
    inputs: Mapping[str, ArrayLike],
    *,
    after: str = "v",
) -> CKAReport:
  """Pairwise CKA of the task updates' outputs per module, before and after alignment.

  Args:
    alignment: from `knots_jax.align(adapters)` with concat="columns".
    inputs: {module: x [n, in]}, the inputs the module sees (e.g. captured from
      the base model on a batch of data); the same n examples for every task.
    after: "v" (`x V_i`, default) or "sv" (`x V_i diag(s)`, equal to before).

  Returns:
    A `CKAReport` over the modules of `inputs`, in their sorted order.
  """
  if not alignment.aligned:
    raise ValueError("the alignment has no decomposition (made for a non-KnOTS method); "
                     "use knots_jax.align(adapters)")
  if not inputs:
    raise ValueError("inputs is empty: give {module: x [n, in]} for at least one module")
  where = {}
  for f, s in zip(alignment.factors, alignment.aligned):
    for l, m in enumerate(f.modules):
      where[m] = (f, s, l)
  unknown = sorted(set(inputs) - set(where))
  if unknown:
    raise ValueError(f"modules not in the alignment: {unknown[:5]}; it has {sorted(where)[:5]} ...")
  tasks = tuple(alignment.adapters.names)
  if len(tasks) < 2:
    raise ValueError("CKA between tasks needs at least 2 adapters")
  modules = tuple(sorted(inputs))
  before, after_m = [], []
  for m in modules:
    f, s, l = where[m]
    if s.transposed:
      raise ValueError("task_update_cka needs a column-wise alignment (concat='columns'): "
                       "with rows the shared basis acts on the inputs")
    x = np.asarray(inputs[m], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != f.a.shape[-1]:
      raise ValueError(f"inputs[{m!r}] must be [n, {f.a.shape[-1]}], got shape {x.shape}")
    names = [f"{m}: task {t}" for t in tasks]
    before.append(pairwise_cka(update_activations(x, f.b[l], f.a[l]), names))
    after_m.append(pairwise_cka(aligned_activations(
        x, np.asarray(s.s[l]), np.asarray(s.rep[l]), np.asarray(s.valid[l]), after), names))
  return CKAReport(modules, tasks, np.stack(before), np.stack(after_m), after)
