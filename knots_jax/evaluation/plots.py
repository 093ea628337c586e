"""PNG plots of the ablations and the CKA analysis, written next to their numbers.

Each function writes `<stem>.png` and the plotted numbers as `<stem>.csv` and
`<stem>.json`, and returns their paths. Figures are drawn with matplotlib's
object API and the Agg canvas (no display, no global pyplot state), so plots
can be made from worker threads and on headless machines.

Example:
  >>> records = number_of_tasks(score, tasks)
  >>> plot_num_tasks(summarize(records), "out/num_tasks.png")
  {'png': 'out/num_tasks.png', 'csv': 'out/num_tasks.csv', 'json': 'out/num_tasks.json'}
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from knots_jax.evaluation import ablations
from knots_jax.evaluation.cka import CKAReport


def _paths(path: str) -> dict[str, str]:
  stem, ext = os.path.splitext(path)
  if ext not in ("", ".png"):
    raise ValueError(f"plots are written as PNG; got `{path}`")
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  return {"png": stem + ".png", "csv": stem + ".csv", "json": stem + ".json"}


def _save(fig: Figure, records: Sequence[Mapping], path: str, **meta) -> dict[str, str]:
  paths = _paths(path)
  fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
  ablations.write_csv(records, paths["csv"])
  ablations.write_records_json(records, paths["json"], **meta)
  return paths


def plot_num_tasks(summary: Sequence[Mapping], path: str, *, by: str = "num_tasks",
                   ylabel: str = "score", title: str | None = None) -> dict[str, str]:
  """Mean and interval band against the number of merged tasks, one line per metric.

  Args:
    summary: records from `ablations.summarize` ({by, "metric", "mean", "low", "high", ...}).
    path: the PNG path; the CSV and JSON go beside it.
  """
  if not summary:
    raise ValueError("plot_num_tasks: the summary is empty")
  for key in (by, "mean", "low", "high"):
    if key not in summary[0]:
      raise ValueError(f"summary records need `{key}` (from ablations.summarize); got "
                       f"{sorted(summary[0])}")
  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.add_subplot()
  metrics = list(dict.fromkeys(r.get("metric", "score") for r in summary))
  for metric in metrics:
    rows = sorted((r for r in summary if r.get("metric", "score") == metric), key=lambda r: r[by])
    x = np.array([r[by] for r in rows], dtype=float)
    ax.plot(x, [r["mean"] for r in rows], marker="o", label=metric)
    ax.fill_between(x, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.25)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("number of merged tasks" if by == "num_tasks" else by)
  ax.set_ylabel(ylabel)
  interval = summary[0].get("interval", "")
  ax.set_title(title or f"mean and {interval} interval")
  ax.grid(alpha=0.3)
  if len(metrics) > 1:
    ax.legend()
  return _save(fig, summary, path, kind="num_tasks")


def plot_sweep(records: Sequence[Mapping], path: str, *, x: str, y: str = "value",
               hue: str = "metric", title: str | None = None) -> dict[str, str]:
  """`y` against the swept setting `x`, one series per `hue` value.

  Numeric settings (LoRA rank, alpha) are drawn as lines; other settings
  ("columns" / "rows") as grouped bars.
  """
  if not records:
    raise ValueError("plot_sweep: no records")
  missing = [k for k in (x, y) if k not in records[0]]
  if missing:
    raise ValueError(f"records have no {missing}; keys: {sorted(records[0])}")
  series = list(dict.fromkeys(r.get(hue, y) for r in records))
  settings = list(dict.fromkeys(r[x] for r in records))
  numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                for v in settings)
  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.add_subplot()
  width = 0.8 / max(len(series), 1)
  for k, name in enumerate(series):
    rows = [r for r in records if r.get(hue, y) == name]
    if numeric:
      rows = sorted(rows, key=lambda r: r[x])
      ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=str(name))
    else:
      pos = [settings.index(r[x]) + (k - (len(series) - 1) / 2) * width for r in rows]
      ax.bar(pos, [r[y] for r in rows], width=width, label=str(name))
  if not numeric:
    ax.set_xticks(range(len(settings)), [str(s) for s in settings])
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title or f"{y} by {x}")
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  return _save(fig, records, path, kind="sweep", x=x, y=y)


def _short_module(name: str) -> str:
  """`model.layers.3.self_attn.q_proj` -> `L3.q_proj` (any prefix before `layers.<i>.`)."""
  return re.sub(r"^.*?layers\.(\d+)\.(?:self_attn\.|mlp\.)?", r"L\1.", name)


def plot_cka(report: CKAReport, path: str, *, title: str | None = None) -> dict[str, str]:
  """Task-by-task CKA (mean over modules) before and after KnOTS, and per-module bars.

  The CSV holds one row per module and task pair; the JSON also the summary.
  """
  summary = report.summary()
  n = len(report.tasks)
  side = max(4.0, 0.55 * n + 1.8)          # inches per heatmap: readable cells up to ~12 tasks
  fig = Figure(figsize=(3.4 * side, side + 0.5), layout="constrained")
  axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.4]})
  ticks = range(n)
  cell_font = 7 if n <= 6 else 6 if n <= 9 else 5
  for ax, matrix, label in ((axes[0], report.before.mean(axis=0), "before"),
                            (axes[1], report.after.mean(axis=0), f"after ({report.after_kind})")):
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(ticks, report.tasks, rotation=45, ha="right")
    ax.set_yticks(ticks, report.tasks)
    ax.set_title(f"CKA {label}\nmean off-diagonal {summary[label.split()[0]]:.3f}")
    for i in ticks:
      for j in ticks:
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=cell_font,
                color="white" if matrix[i, j] < 0.5 else "black")
  fig.colorbar(image, ax=axes[:2].tolist(), shrink=0.8)
  rows = summary["per_module"]
  pos = np.arange(len(rows))
  axes[2].bar(pos - 0.2, [r["before"] for r in rows], width=0.4, label="before")
  axes[2].bar(pos + 0.2, [r["after"] for r in rows], width=0.4, label="after")
  step = max(1, len(rows) // 32)          # at most ~32 labels
  axes[2].set_xticks(pos[::step], [_short_module(r["module"]) for r in rows][::step],
                     rotation=60, ha="right", fontsize=6)
  axes[2].set_ylim(0, 1)
  axes[2].set_ylabel("mean off-diagonal CKA")
  axes[2].legend()
  if title:
    fig.suptitle(title)
  return _save(fig, report.to_records(), path, kind="cka", summary=summary)
