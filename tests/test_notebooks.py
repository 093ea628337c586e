"""The notebooks run top to bottom (IPython shell/magic lines are skipped)."""

import json
import os
import re

import numpy as np
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def _python_source(cell_source: str) -> str:
  # `!cmd` and `%magic` lines are IPython-only; they only run on Colab here.
  return re.sub(r"^(\s*)[!%].*$", r"\1pass", cell_source, flags=re.M)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, monkeypatch, tmp_path):
  monkeypatch.chdir(NOTEBOOKS)
  # ablations.ipynb: the SMALL setting (3 tasks, short grids), outputs in a temporary folder.
  monkeypatch.setenv("KNOTS_ABLATIONS_SMALL", "1")
  monkeypatch.setenv("KNOTS_ABLATIONS_OUT", str(tmp_path / "ablations"))
  with open(name) as f:
    notebook = json.load(f)
  namespace: dict = {"__name__": "__notebook__"}
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      exec(compile(_python_source("".join(cell["source"])), name, "exec"), namespace)
  if name == "quickstart.ipynb":  # what the notebook shows is what the library computes
    ranks = [f.rank for ad in namespace["adapters"].adapters for f in list(ad.modules.values())[:1]]
    assert namespace["report"]["rank"] == sum(ranks)   # the adapters' ranks add up, exactly
    assert 0 < namespace["small"]["max_rel_error"] < 1
  if name == "ablations.ipynb":
    _check_ablations(namespace, tmp_path / "ablations")


def _check_ablations(ns: dict, out) -> None:
  from knots_jax.evaluation import ablations
  assert ns["SMALL"] and ns["OUT"] == str(out)
  tasks = ns["TASKS"]
  assert len(tasks) == 3
  for stem in ("num_tasks", "concat", "cka", "lmc"):
    for ext in ("png", "csv", "json"):
      path = out / f"{stem}.{ext}"
      assert path.is_file() and path.stat().st_size > 0, path
    with open(out / f"{stem}.png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (out / "num_tasks_records.csv").is_file()
  # 1. number of tasks: 2 of the 3 pairs (max_subsets=2) and the full set, 4 metrics each
  records = ablations.read_csv(str(out / "num_tasks_records.csv"))
  assert sorted({r["num_tasks"] for r in records}) == [2.0, 3.0]
  assert len(records) == (2 + 1) * 4
  assert all(0 <= r["value"] <= 2 for r in records)
  summary = {(r["num_tasks"], r["metric"]): r for r in ns["summary"]}
  assert summary[(3, "KnOTS-TIES")]["half_width"] == 0     # one subset of all 3 tasks
  # 2. concatenation: both alignments searched, val and test scores
  concat = ns["concat_records"]
  assert [(r["concat"], r["metric"]) for r in concat] == [
      ("columns", "val"), ("columns", "test"), ("rows", "val"), ("rows", "test")]
  # 3. CKA: a task with itself is 1; x V diag(s) has exactly the CKA before alignment
  report = ns["cka_report"]
  assert report.before.shape == (len(ns["adapters"].module_names), 3, 3)
  np.testing.assert_allclose(np.diagonal(report.before, axis1=1, axis2=2), 1.0, atol=1e-9)
  np.testing.assert_allclose(np.diagonal(report.after, axis1=1, axis2=2), 1.0, atol=1e-9)
  assert ns["sv_gap"] < 1e-6
  assert np.all((report.before >= 0) & (report.before <= 1))
  # 4. LMC: one score per t, the barrier as lmc_barrier defines it
  ts, scores = ns["TS"], ns["lmc_scores"]
  assert len(scores) == len(ts) and ns["barrier"] >= 0
  line = [(1 - t) * scores[0] + t * scores[-1] for t in ts]
  assert ns["barrier"] == pytest.approx(max(l - s for l, s in zip(line, scores)))
  with open(out / "summary.json") as f:
    saved = json.load(f)
  assert saved["tasks"] == tasks and saved["lmc"]["barrier"] == pytest.approx(ns["barrier"])
