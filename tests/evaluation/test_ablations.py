"""Ablation records and intervals against hand formulas; CKA against an HSIC reference; plots."""

import itertools
import json
import math

import numpy as np
import pytest

import knots_jax
from knots_jax.evaluation import ablations, cka, plots
from tests import synthetic

T_975 = {3: 3.182446305284263, 5: 2.570581835636314}   # Student t quantiles (tables)


# ------------------------------------------------------------------ subsets


def test_all_subsets_in_lexicographic_order():
  assert ablations.task_subsets(4, 2) == list(itertools.combinations(range(4), 2))
  assert ablations.task_subsets(4, 4) == [(0, 1, 2, 3)]
  assert ablations.task_subsets(4, 2, max_subsets=6) == ablations.task_subsets(4, 2)


@pytest.mark.parametrize("num_tasks, size", [(6, 3), (30, 15)])   # enumerated / rejection sampled
def test_sampled_subsets_are_distinct_valid_and_seeded(num_tasks, size):
  picked = ablations.task_subsets(num_tasks, size, max_subsets=5, seed=1)
  assert len(picked) == len(set(picked)) == 5 and picked == sorted(picked)
  assert all(len(s) == size and list(s) == sorted(set(s)) and s[-1] < num_tasks for s in picked)
  assert picked == ablations.task_subsets(num_tasks, size, max_subsets=5, seed=1)


@pytest.mark.parametrize("args, match", [((3, 4), "size"), ((0, 1), "positive"),
                                         ((3, 2, 0), "max_subsets")])
def test_subsets_reject_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    ablations.task_subsets(*args)


# ---------------------------------------------------------------- intervals


def test_t_interval_against_the_hand_formula():
  values = [1.0, 2.0, 3.0, 4.0]
  s = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)           # sample std, ddof 1
  half = T_975[3] * s / 2                                          # t_{0.975, 3} s / sqrt(4)
  got = ablations.mean_interval(values)
  assert got["mean"] == 2.5 and got["count"] == 4
  assert got["std"] == pytest.approx(s)
  assert got["half_width"] == pytest.approx(half)
  assert (got["low"], got["high"]) == pytest.approx((2.5 - half, 2.5 + half))
  ref = ablations.mean_interval(values, kind="reference")
  assert ref["half_width"] == pytest.approx(half / 1.96)
  single = ablations.mean_interval([0.7])
  assert (single["low"], single["high"], single["half_width"]) == (0.7, 0.7, 0.0)


@pytest.mark.parametrize("kwargs, match", [(dict(kind="normal"), "kind"),
                                           (dict(confidence=1.0), "confidence"),
                                           (dict(values=[]), "non-empty"),
                                           (dict(values=[1.0, np.nan]), "finite")])
def test_interval_rejects_bad_input(kwargs, match):
  kwargs.setdefault("values", [1.0, 2.0])
  with pytest.raises(ValueError, match=match):
    ablations.mean_interval(**kwargs)


# --------------------------------------------------------- number of tasks


VALUES = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}


def _mean_of(subset):
  return float(np.mean([VALUES[t] for t in subset]))


def test_number_of_tasks_records_and_curve():
  seen = []

  def evaluate(subset):
    seen.append(subset)
    return _mean_of(subset)

  records = ablations.number_of_tasks(evaluate, list(VALUES))
  assert len(seen) == 6 + 4 + 1 and seen[0] == ("a", "b") and seen[-1] == ("a", "b", "c", "d")
  assert records[0] == {"num_tasks": 2, "subset": "a+b", "metric": "score", "value": 1.5}
  summary = ablations.summarize(records)
  assert [r["num_tasks"] for r in summary] == [2, 3, 4]
  pairs = [np.mean(p) for p in itertools.combinations(VALUES.values(), 2)]   # 6 values
  half = T_975[5] * np.std(pairs, ddof=1) / math.sqrt(6)
  assert summary[0]["mean"] == pytest.approx(np.mean(pairs))
  assert summary[0]["half_width"] == pytest.approx(half)
  assert summary[0]["interval"] == "t95" and summary[0]["count"] == 6
  assert summary[2]["mean"] == pytest.approx(3.75) and summary[2]["half_width"] == 0.0


def test_number_of_tasks_with_named_scores_and_sampling():
  records = ablations.number_of_tasks(
      lambda s: {"mean": _mean_of(s), "size": len(s)}, list(VALUES), sizes=[2, 3],
      max_subsets=2, seed=4)
  assert {r["metric"] for r in records} == {"mean", "size"}
  assert sum(1 for r in records if r["metric"] == "mean") == 4
  again = ablations.number_of_tasks(
      lambda s: {"mean": _mean_of(s), "size": len(s)}, list(VALUES), sizes=[2, 3],
      max_subsets=2, seed=4)
  assert again == records
  summary = ablations.summarize(records)
  size_rows = [r for r in summary if r["metric"] == "size"]
  assert [(r["num_tasks"], r["mean"], r["half_width"]) for r in size_rows] == [(2, 2, 0), (3, 3, 0)]


def test_number_of_tasks_rejects_bad_callbacks_and_names():
  with pytest.raises(ValueError, match="not finite"):
    ablations.number_of_tasks(lambda s: float("nan"), ["a", "b"])
  with pytest.raises(ValueError, match="not a number"):
    ablations.number_of_tasks(lambda s: {"x": "high"}, ["a", "b"])
  with pytest.raises(ValueError, match="distinct"):
    ablations.number_of_tasks(_mean_of, ["a", "a"])
  with pytest.raises(ValueError, match=r"\+"):
    ablations.number_of_tasks(_mean_of, ["a+b", "c"])


def test_select_adapters():
  adapters = synthetic.adapter_set(ranks=(2, 3, 4))
  picked = ablations.select_adapters(adapters, ["task2", "task0"])
  assert picked.names == ["task2", "task0"]
  with pytest.raises(ValueError, match="task9"):
    ablations.select_adapters(adapters, ["task9"])


# ------------------------------------------------------------------- sweeps


def test_rank_sweep_records():
  records = ablations.sweep({4: 0.5, 16: 0.75}, lambda v: {"acc": v, "twice": 2 * v}, name="rank")
  assert records == [{"rank": 4, "metric": "acc", "value": 0.5},
                     {"rank": 4, "metric": "twice", "value": 1.0},
                     {"rank": 16, "metric": "acc", "value": 0.75},
                     {"rank": 16, "metric": "twice", "value": 1.5}]
  with pytest.raises(ValueError, match="no settings"):
    ablations.sweep({}, lambda v: 0.0)


def test_concat_sweep_knots_ta_equals_ta_both_ways():
  """KnOTS-TA is TA whatever the concatenation: a known identity through the sweep."""
  adapters = synthetic.adapter_set(ranks=(2, 3))
  alignments = ablations.alignments_by_concat(adapters, dtype="float64")
  assert [a.settings["concat"] for a in alignments.values()] == ["columns", "rows"]
  deltas = synthetic.dense_deltas(adapters)

  def error(alignment):
    merged = knots_jax.merge(alignment, "knots_ta", scaling=0.5)
    return max(float(np.abs(merged.delta(m) - 0.5 * deltas[m].sum(0)).max()) for m in deltas)

  records = ablations.sweep(alignments, error, name="concat")
  assert [r["concat"] for r in records] == ["columns", "rows"]
  assert all(r["value"] < 1e-5 for r in records)
  with pytest.raises(ValueError, match="concats="):
    ablations.alignments_by_concat(adapters, concat="rows")


# ------------------------------------------------------------------ writers


def test_csv_and_json_round_trip(tmp_path):
  records = [{"rank": 4, "metric": "acc", "value": 0.5},
             {"rank": 8, "metric": "acc", "value": float("nan"), "note": "diverged"}]
  path = ablations.write_csv(records, str(tmp_path / "sub" / "sweep.csv"))
  back = ablations.read_csv(path)
  assert back[0] == {"rank": 4.0, "metric": "acc", "value": 0.5, "note": None}
  assert back[1]["note"] == "diverged" and back[1]["value"] is None   # NaN: an empty cell
  path = ablations.write_records_json(records, str(tmp_path / "sweep.json"), experiment="rank")
  data = json.load(open(path))
  assert data["experiment"] == "rank" and data["records"][1]["value"] is None
  assert data["records"][0] == records[0]


# ---------------------------------------------------------------------- CKA


def _hsic(k, l):
  n = k.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def reference_cka(x, y):
  """Float64 CKA straight from the HSIC definition (Kornblith et al. 2019, eq. 3)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  k, l = x @ x.T, y @ y.T
  return _hsic(k, l) / math.sqrt(_hsic(k, k) * _hsic(l, l))


@pytest.mark.parametrize("n, d1, d2", [(40, 5, 7), (12, 30, 20)])   # features / Gram branch
def test_linear_cka_against_the_hsic_reference(n, d1, d2):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d1)) + 3.0
  y = x[:, :min(d1, d2)] @ rng.normal(size=(min(d1, d2), d2)) + 0.5 * rng.normal(size=(n, d2))
  assert cka.linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-10)
  z = rng.normal(size=(n, d2))
  assert cka.linear_cka(x, z) == pytest.approx(reference_cka(x, z), rel=1e-10)


def test_linear_cka_identity_and_invariances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 8))
  y = rng.normal(size=(50, 6)) + x[:, :6]
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
  assert cka.linear_cka(x, 7.5 * x @ q) == pytest.approx(1.0, abs=1e-12)
  base = cka.linear_cka(x, y)
  assert cka.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-12)
  assert cka.linear_cka(1e-30 * x, 1e30 * y) == pytest.approx(base, rel=1e-12)
  assert cka.linear_cka(x + 100.0, y) == pytest.approx(base, rel=1e-9)    # centering
  assert cka.linear_cka(y, x) == pytest.approx(base, rel=1e-12)


def test_linear_cka_rejects_bad_input():
  x = np.random.default_rng(0).normal(size=(10, 3))
  with pytest.raises(ValueError, match="zero variance"):
    cka.linear_cka(x, np.ones((10, 2)))
  with pytest.raises(ValueError, match="examples"):
    cka.linear_cka(x, x[:9])
  with pytest.raises(ValueError, match="NaN"):
    cka.linear_cka(x, np.where(x > 1, np.nan, x))
  with pytest.raises(ValueError, match="examples >= 2"):
    cka.linear_cka(x[:1], x[:1])


def test_pairwise_cka_and_mean_off_diagonal():
  rng = np.random.default_rng(1)
  acts = [rng.normal(size=(20, d)) for d in (3, 4, 5)]
  m = cka.pairwise_cka(acts)
  for i, j in itertools.product(range(3), repeat=2):
    expected = 1.0 if i == j else reference_cka(acts[i], acts[j])
    assert m[i, j] == pytest.approx(expected, rel=1e-10)
  assert cka.mean_off_diagonal(m) == pytest.approx((m[0, 1] + m[0, 2] + m[1, 2]) / 3)


@pytest.fixture(scope="module")
def cka_case():
  adapters = synthetic.adapter_set(ranks=(2, 3, 2), seed=5)
  alignment = knots_jax.align(adapters, dtype="float64")
  rng = np.random.default_rng(2)
  modules = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
  inputs = {m: rng.normal(size=(32, 10)) for m in modules}
  return adapters, alignment, inputs


def test_task_update_cka_before_and_after(cka_case):
  adapters, alignment, inputs = cka_case
  deltas = synthetic.dense_deltas(adapters)
  report = cka.task_update_cka(alignment, inputs)
  assert report.modules == tuple(sorted(inputs)) and report.tasks == ("task0", "task1", "task2")
  for l, m in enumerate(report.modules):
    x, dw = inputs[m], deltas[m]
    # before: outputs of the dense task updates (the stacks hold scale * B in float32)
    before = [x @ dw[i].T for i in range(3)]
    # after: x V_i from an independent dense float64 SVD of [dW_1, dW_2, dW_3]
    _, s, vt = np.linalg.svd(np.concatenate(list(dw), axis=1), full_matrices=False)
    vt = vt[s > 1e-5]
    after = [x @ vt[:, i * 10:(i + 1) * 10].T for i in range(3)]
    for i, j in itertools.combinations(range(3), 2):
      assert report.before[l, i, j] == pytest.approx(reference_cka(before[i], before[j]), rel=1e-6)
      assert report.after[l, i, j] == pytest.approx(reference_cka(after[i], after[j]), rel=1e-6)
  summary = report.summary()
  assert summary["before"] == pytest.approx(np.mean(
      [cka.mean_off_diagonal(b) for b in report.before]))
  assert len(report.to_records()) == 2 * 3


def test_sigma_v_outputs_have_exactly_the_cka_before_alignment(cka_case):
  _, alignment, inputs = cka_case
  report = cka.task_update_cka(alignment, inputs, after="sv")
  np.testing.assert_allclose(report.after, report.before, rtol=1e-8, atol=1e-10)


def test_task_update_cka_rejects_bad_input(cka_case):
  adapters, alignment, inputs = cka_case
  with pytest.raises(ValueError, match="not in the alignment"):
    cka.task_update_cka(alignment, {"nope": np.zeros((4, 10))})
  with pytest.raises(ValueError, match=r"\[n, 10\]"):
    cka.task_update_cka(alignment, {m: x[:, :5] for m, x in inputs.items()})
  with pytest.raises(ValueError, match="after"):
    cka.task_update_cka(alignment, inputs, after="u")
  rows = knots_jax.align(adapters, concat="rows")
  with pytest.raises(ValueError, match="column-wise"):
    cka.task_update_cka(rows, inputs)


# -------------------------------------------------------------------- plots


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  import os
  return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


def test_plots_write_pngs_next_to_their_numbers(tmp_path, cka_case):
  summary = ablations.summarize(ablations.number_of_tasks(_mean_of, list(VALUES)))
  paths = plots.plot_num_tasks(summary, str(tmp_path / "num_tasks.png"))
  assert _is_png(paths["png"])
  assert ablations.read_csv(paths["csv"])[0]["mean"] == pytest.approx(summary[0]["mean"])
  assert json.load(open(paths["json"]))["records"][1]["num_tasks"] == 3

  numeric = ablations.sweep({4: 0.5, 8: 0.6, 16: 0.7}, lambda v: v, name="rank")
  assert _is_png(plots.plot_sweep(numeric, str(tmp_path / "rank"), x="rank")["png"])
  categorical = ablations.sweep({"columns": 0.8, "rows": 0.7}, lambda v: {"a": v, "b": v / 2},
                                name="concat")
  assert _is_png(plots.plot_sweep(categorical, str(tmp_path / "concat.png"), x="concat")["png"])

  _, alignment, inputs = cka_case
  report = cka.task_update_cka(alignment, inputs)
  paths = plots.plot_cka(report, str(tmp_path / "cka.png"))
  assert _is_png(paths["png"])
  data = json.load(open(paths["json"]))
  assert data["summary"]["after"] == pytest.approx(report.summary()["after"])
  assert len(data["records"]) == 6

  with pytest.raises(ValueError, match="PNG"):
    plots.plot_sweep(numeric, str(tmp_path / "rank.pdf"), x="rank")
  with pytest.raises(ValueError, match="no \\['lr'\\]"):
    plots.plot_sweep(numeric, str(tmp_path / "x.png"), x="lr")
