"""The exact whole-model k-th magnitude against np.sort."""

import jax.numpy as jnp
import numpy as np
import pytest

from knots_jax.merging import threshold


def _reference(xs, valids, ranks):
  out = []
  for t, rank in enumerate(ranks):
    values = np.concatenate([np.abs(x[:, t])[v].ravel() for x, v in zip(xs, valids)])
    out.append(np.sort(values)[rank - 1] if rank else 0)
  return np.array(out)


def _stacks(rng, dtype, ties=False):
  xs = [rng.normal(size=(3, 4, 10, 50)).astype(dtype), rng.normal(size=(2, 4, 6, 30)).astype(dtype)]
  if ties:  # many equal magnitudes, with both signs, around the middle
    xs[0][:, :, :5] = np.sign(xs[0][:, :, :5]) * dtype(0.5)
  valids = [rng.random((3, 10)) > 0.2, rng.random((2, 6)) > 0.3]
  return xs, valids


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cap", [8, 1 << 16])
def test_kth_matches_sort(dtype, ties, cap):
  rng = np.random.default_rng(1)
  xs, valids = _stacks(rng, dtype, ties)
  count = sum(int(v.sum()) * x.shape[3] for x, v in zip(xs, valids))
  ranks = [1, count // 2, count, 0]
  got = threshold.kth_smallest_magnitude([jnp.asarray(x) for x in xs], [jnp.asarray(v) for v in valids],
                                   ranks, cap=cap)
  np.testing.assert_array_equal(got, _reference(xs, valids, ranks).astype(dtype))


def test_kth_sampled_bracket_and_its_fallback(monkeypatch):
  """Many values (the sampled bracket is used); then a wrong bracket must still give the exact value."""
  rng = np.random.default_rng(2)
  xs = [rng.standard_t(3, size=(4, 3, 16, 700)).astype(np.float32)]
  valids = [np.ones((4, 16), bool)]
  count = 4 * 16 * 700
  ranks = [count - int(count * 0.3), 17, count - 3]
  expected = _reference(xs, valids, ranks)
  args = ([jnp.asarray(xs[0])], [jnp.asarray(valids[0])], ranks)
  np.testing.assert_array_equal(threshold.kth_smallest_magnitude(*args, cap=512), expected)

  def whole_range(*unused, **unused_kw):  # in bracket but far too many values: interpolate
    return np.zeros(3, np.int32), np.full(3, np.float32(np.inf).view(np.int32))
  monkeypatch.setattr(threshold, "_initial_bracket", whole_range)
  np.testing.assert_array_equal(threshold.kth_smallest_magnitude(*args, cap=512), expected)

  def wrong_bracket(*unused, **unused_kw):
    lo = np.full(3, np.float32(5.0).view(np.int32))
    return lo, lo + 10
  monkeypatch.setattr(threshold, "_initial_bracket", wrong_bracket)
  np.testing.assert_array_equal(threshold.kth_smallest_magnitude(*args, cap=512), expected)


def test_regular_sample_bracket(monkeypatch):
  """With a sample of every s-th value (s > 1, coprime with the row length) the bracket
  holds the exact k-th value, and the result is exact."""
  assert threshold.sample_stride(10**6, 2048, 1000) == 1001   # 1000 shares a factor with 2048
  assert threshold.sample_stride(10**6, 3 * 7, 1000) == 1000
  assert threshold.sample_stride(10, 64, 1000) == 1
  rng = np.random.default_rng(3)
  xs = [rng.standard_t(3, size=(4, 3, 16, 256)).astype(np.float32),
        rng.normal(size=(2, 3, 8, 96)).astype(np.float32)]
  valids = [rng.random((4, 16)) > 0.1, np.ones((2, 8), bool)]
  count = sum(int(v.sum()) * x.shape[3] for x, v in zip(xs, valids))
  ranks = [int(count * 0.7), 5, count - 2]
  expected = _reference(xs, valids, ranks)
  monkeypatch.setattr(threshold, "_SAMPLES", 2000)
  assert threshold.sample_stride(count, 256) > 1
  args = ([jnp.asarray(x) for x in xs], [jnp.asarray(v) for v in valids])
  lo, hi = threshold._initial_bracket(*args, ranks[:1], count, threshold._max_key(np.float32), np.int32)
  assert 0 < lo[0] <= expected[0].view(np.int32) <= hi[0] < threshold._max_key(np.float32)
  np.testing.assert_array_equal(threshold.kth_smallest_magnitude(*args, ranks, cap=512), expected)


def test_kth_rejects_rank_out_of_range():
  x = jnp.ones((1, 1, 2, 3))
  with pytest.raises(ValueError, match="outside"):
    threshold.kth_smallest_magnitude([x], [jnp.ones((1, 2), bool)], [7])
