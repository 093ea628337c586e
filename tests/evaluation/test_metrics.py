"""Metrics against hand-computed cases and brute-force float64 references."""

import itertools

import numpy as np
import pytest

from knots_jax.evaluation import metrics

# ------------------------------------------------------------------ accuracy


def test_accuracy_hand_case_and_argmax_ties_go_to_the_lowest_class():
  logits = np.array([[0.1, 0.9, 0.0],    # -> 1
                     [2.0, 2.0, 1.0],    # tie 0/1 -> 0
                     [0.0, 0.0, 3.0],    # -> 2
                     [5.0, 1.0, 5.0]])   # tie 0/2 -> 0
  assert metrics.accuracy(logits, [1, 0, 2, 2]) == pytest.approx(3 / 4)
  assert metrics.accuracy(logits, [1, 1, 2, 0]) == pytest.approx(3 / 4)


@pytest.mark.parametrize("logits, labels, match", [
    (np.zeros((3,)), [0, 0, 0], "examples, classes"),
    (np.zeros((2, 3)), [0], "one per example"),
    (np.zeros((2, 3)), [0, 3], "outside"),
    (np.zeros((2, 3)), [0, -1], "outside"),
    (np.array([[0.0, np.nan]]), [0], "NaN"),
    (np.zeros((2, 3)), [0.5, 1.0], "integer"),
    (np.zeros((0, 3)), np.zeros(0, int), "empty"),
])
def test_accuracy_rejects_bad_input(logits, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.accuracy(logits, labels)


def test_normalized_accuracy_is_the_ratio_and_the_average_is_the_mean_of_ratios():
  assert metrics.normalized_accuracy(0.6, 0.8) == pytest.approx(0.75)
  np.testing.assert_allclose(metrics.normalized_accuracy([0.5, 0.9], [1.0, 0.9]), [0.5, 1.0])
  # mean of ratios (0.5 + 1.0) / 2, not the ratio of means 1.4 / 1.9.
  assert metrics.average_normalized_accuracy([0.5, 0.9], [1.0, 0.9]) == pytest.approx(0.75)


@pytest.mark.parametrize("merged, ft, match", [
    (60.0, 80.0, "fractions"), (0.5, 0.0, "> 0"), ([0.5], [0.5, 0.6], "shape")])
def test_normalized_accuracy_rejects_bad_input(merged, ft, match):
  with pytest.raises(ValueError, match=match):
    metrics.normalized_accuracy(merged, ft)


def test_task_scores_table_and_dict():
  scores = metrics.TaskScores.from_accuracies({"cars": 0.6, "dtd": 0.45},
                                              {"cars": 0.8, "dtd": 0.5})
  assert scores.normalized == pytest.approx((0.75, 0.9))
  assert scores.average_normalized == pytest.approx(0.825)
  assert scores.average_accuracy == pytest.approx(0.525)
  d = scores.to_dict()
  assert d["tasks"]["dtd"] == pytest.approx({"accuracy": 0.45, "finetuned": 0.5, "normalized": 0.9})
  assert d["average"] == pytest.approx({"accuracy": 0.525, "finetuned": 0.65, "normalized": 0.825})
  lines = scores.to_markdown().splitlines()
  assert lines[0] == "| Task | Accuracy (%) | Fine-tuned (%) | Normalized (%) |"
  assert lines[2] == "| cars | 60.0 | 80.0 | 75.0 |"
  assert lines[-1] == "| Average | 52.5 | 65.0 | 82.5 |"
  plain = metrics.TaskScores.from_accuracies({"a": 0.25})
  assert plain.normalized is None and plain.to_dict()["average"] == {"accuracy": 0.25}
  assert plain.to_markdown().splitlines()[-1] == "| Average | 25.0 |"


def test_task_scores_rejects_mismatched_tasks():
  with pytest.raises(ValueError, match=r"missing \['b'\], extra \['c'\]"):
    metrics.TaskScores.from_accuracies({"a": 0.5, "b": 0.5}, {"a": 0.6, "c": 0.7})
  with pytest.raises(ValueError, match="repeat"):
    metrics.TaskScores(("a", "a"), (0.1, 0.2))


# --------------------------------------------------------------- union labels


def test_union_labels_removes_duplicates_after_normalization():
  names, maps = metrics.union_labels({
      "a": ["Sea_Lion", "cat"],
      "b": [" sea  lion", "DOG", "Cat", "sea-lion"]})
  assert names == ("Sea_Lion", "cat", "DOG", "sea-lion")   # hyphens are not merged
  np.testing.assert_array_equal(maps["a"], [0, 1])
  np.testing.assert_array_equal(maps["b"], [0, 2, 1, 3])


def test_union_labels_exact_matching_and_list_input():
  names, maps = metrics.union_labels([["cat", "Dog"], ["dog", "cat"]], normalize=None)
  assert names == ("cat", "Dog", "dog")
  assert isinstance(maps, list)
  np.testing.assert_array_equal(maps[1], [2, 0])
  with pytest.raises(ValueError, match="empty after normalization"):
    metrics.union_labels({"a": ["cat", " _ "]})
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.union_labels({"a": []})


# ------------------------------------------------------------------ Hits@k


def test_ranks_count_ties_against_the_model():
  scores = np.array([[0.5, 0.5, 0.1],
                     [0.5, 0.5, 0.1],
                     [1.0, 1.0, 1.0],
                     [0.2, 0.9, 0.9]])
  # label 0 ties with 1 -> rank 2; label 1 ties with 0 -> rank 2; all equal -> rank 3;
  # label 0 below two tied labels -> rank 3.
  np.testing.assert_array_equal(metrics.ranks(scores, [0, 1, 2, 0]), [2, 2, 3, 3])
  hits = metrics.hits_at_k(scores, [0, 1, 2, 0], ks=(1, 2, 3))
  assert hits == {1: 0.0, 2: 0.5, 3: 1.0}
  # a constant score never counts as a hit below the number of labels
  assert metrics.hits_at_k(np.ones((4, 5)), [0, 1, 2, 4]) == {1: 0.0, 3: 0.0, 5: 1.0}


def test_ranks_against_a_brute_force_reference():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(60, 7)).astype(np.float64)   # many ties
  labels = rng.integers(0, 7, size=60)
  expected = [1 + sum(1 for j in range(7) if j != y and s[j] >= s[y])
              for s, y in zip(scores, labels)]
  np.testing.assert_array_equal(metrics.ranks(scores, labels), expected)
  hits = metrics.hits_at_k(scores, labels, ks=(1, 3, 5))
  for k in (1, 3, 5):
    assert hits[k] == pytest.approx(np.mean(np.asarray(expected) <= k))


def test_joint_hits_per_dataset_and_pooled_union():
  scores = {"a": np.array([[3.0, 1.0, 0.0, 0.0]]),                 # label 0: rank 1
            "b": np.array([[0.0, 2.0, 1.0, 0.5],                   # label 3: rank 3
                           [0.0, 2.0, 2.0, 0.5],                   # label 2: rank 2 (tie)
                           [9.0, 1.0, 2.0, 3.0]])}                 # label 1: rank 4
  labels = {"a": [0], "b": [3, 2, 1]}
  joint = metrics.joint_hits(scores, labels, ks=(1, 3))
  assert joint.per_task["a"] == {1: 1.0, 3: 1.0}
  assert joint.per_task["b"] == pytest.approx({1: 0.0, 3: 2 / 3})
  # pooled over the 4 examples (1 + 0 hits@1, 1 + 2 hits@3), not the mean of datasets
  assert joint.union == pytest.approx({1: 0.25, 3: 0.75})
  d = joint.to_dict()
  assert d["Union"] == pytest.approx({"hits@1": 0.25, "hits@3": 0.75, "examples": 4})
  assert joint.to_markdown().splitlines()[-1] == "| Union | 25.0 | 75.0 |"


def test_joint_hits_with_union_labels_end_to_end():
  names, maps = metrics.union_labels({"pets": ["cat", "dog"], "zoo": ["Dog", "lion"]})
  assert names == ("cat", "dog", "lion")
  zoo_local = np.array([0, 1])                   # Dog, lion
  zoo_scores = np.array([[0.1, 0.8, 0.1],        # predicts dog: hit (Dog == dog)
                         [0.1, 0.8, 0.1]])       # lion: below dog, tied with cat -> rank 3
  joint = metrics.joint_hits({"zoo": zoo_scores}, {"zoo": maps["zoo"][zoo_local]}, ks=(1, 2, 3))
  assert joint.per_task["zoo"] == {1: 0.5, 2: 0.5, 3: 1.0}


@pytest.mark.parametrize("scores, labels, match", [
    ({"a": np.zeros((1, 3))}, {"b": [0]}, "different tasks"),
    ({"a": np.zeros((1, 3)), "b": np.zeros((1, 4))}, {"a": [0], "b": [0]}, "same union"),
    ({"Union": np.zeros((1, 3))}, {"Union": [0]}, "Union"),
])
def test_joint_hits_rejects_bad_input(scores, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.joint_hits(scores, labels)


def test_hits_rejects_bad_k():
  with pytest.raises(ValueError, match="positive integers"):
    metrics.hits_at_k(np.zeros((1, 2)), [0], ks=(0,))


# ------------------------------------------------------------------ ensemble


def _log(p):
  return np.log(np.asarray(p, dtype=np.float64))   # softmax(log p) == p when sum(p) == 1


def test_ensemble_picks_the_most_confident_model():
  model0 = _log([[0.7, 0.3], [0.55, 0.45], [0.6, 0.4]])
  model1 = _log([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
  model, local, conf = metrics.ensemble_predictions([model0, model1])
  np.testing.assert_array_equal(model, [0, 1, 0])     # 0.7 > 0.5; 0.7 > 0.55; tie 0.6 -> model 0
  np.testing.assert_array_equal(local, [0, 2, 0])
  np.testing.assert_allclose(conf, [0.7, 0.7, 0.6])


def test_ensemble_union_scores_and_accuracy_with_duplicate_names():
  names, maps = metrics.union_labels([["cat", "dog"], ["dog", "lion", "bird"]])
  assert names == ("cat", "dog", "lion", "bird")
  model0 = _log([[0.7, 0.3], [0.45, 0.55], [0.5, 0.5]])
  model1 = _log([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
  scores = metrics.ensemble_union_scores([model0, model1], maps)
  # union label u: the max over models of the probability of a class that maps to u
  np.testing.assert_allclose(scores, [[0.7, 0.3, 0.5, 0.3],
                                      [0.45, 0.9, 0.05, 0.05],
                                      [0.5, 0.5, 0.1, 0.8]])
  model, local, _ = metrics.ensemble_predictions([model0, model1])
  predicted = [maps[m][c] for m, c in zip(model, local)]
  np.testing.assert_array_equal(np.argmax(scores, axis=1), predicted)
  # three task-0 examples labelled cat, dog, dog: example 2 is predicted "dog" by model 1
  labels = [0, 1, 1]
  assert metrics.ensemble_accuracy([model0, model1], 0, labels) == pytest.approx(1 / 3)
  assert metrics.ensemble_accuracy([model0, model1], 0, labels, maps) == pytest.approx(2 / 3)
  hits = metrics.joint_hits({"t0": scores}, {"t0": maps[0][labels]}, ks=(1, 2))
  assert hits.per_task["t0"] == pytest.approx({1: 2 / 3, 2: 2 / 3})


def test_ensemble_rejects_bad_input():
  with pytest.raises(ValueError, match="same examples"):
    metrics.ensemble_predictions([np.zeros((2, 2)), np.zeros((3, 2))])
  with pytest.raises(ValueError, match="one label map per model"):
    metrics.ensemble_union_scores([np.zeros((2, 2))], [[0, 1], [2, 3]])
  with pytest.raises(ValueError, match="classes"):
    metrics.ensemble_union_scores([np.zeros((2, 2))], [[0, 1, 2]])
  with pytest.raises(ValueError, match="finite"):
    metrics.ensemble_predictions([np.array([[np.inf, 0.0]])])


def test_softmax_of_large_logits_is_stable():
  model, local, conf = metrics.ensemble_predictions([np.array([[1000.0, 0.0]]),
                                                     np.array([[0.0, 0.0, 0.0]])])
  assert (model[0], local[0]) == (0, 0) and conf[0] == pytest.approx(1.0)


def test_every_permutation_of_a_tie_gives_the_same_rank():
  base = np.array([0.3, 0.3, 0.3, 0.1])
  for perm in itertools.permutations(range(4)):
    s = base[list(perm)][None, :]
    label = list(perm).index(0)
    assert metrics.ranks(s, [label])[0] == 3
