"""The notebooks run top to bottom (IPython shell/magic lines are skipped)."""

import json
import os
import re

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


def _python_source(cell_source: str) -> str:
  # `!cmd` and `%magic` lines are IPython-only; they only run on Colab here.
  return re.sub(r"^(\s*)[!%].*$", r"\1pass", cell_source, flags=re.M)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, monkeypatch):
  monkeypatch.chdir(NOTEBOOKS)
  with open(name) as f:
    notebook = json.load(f)
  namespace: dict = {"__name__": "__notebook__"}
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      exec(compile(_python_source("".join(cell["source"])), name, "exec"), namespace)
  if name == "quickstart.ipynb":  # what the notebook shows is what the library computes
    ranks = [f.rank for ad in namespace["adapters"].adapters for f in list(ad.modules.values())[:1]]
    assert namespace["report"]["rank"] == len(ranks) * max(ranks)
    assert 0 < namespace["small"]["max_rel_error"] < 1
