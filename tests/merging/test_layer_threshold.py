"""Per-module TIES thresholds (`threshold.module_kth_magnitudes`, used by
top_k_scope="layer") against float64 NumPy sorts: ties of equal magnitudes,
invalid rows, rank 0 ("keep all"), and brackets that need narrowing."""

import numpy as np
import pytest

import jax.numpy as jnp

from knots_jax.merging import combine, kernels, threshold
from knots_jax.methods import entrywise


def _reference(x: np.ndarray, valid: np.ndarray, ranks: np.ndarray) -> np.ndarray:
  """[L, n]: the ranks[l]-th smallest |x[l, t]| over valid rows, np.partition in float64."""
  L, n = x.shape[:2]
  out = np.zeros((L, n))
  for l in range(L):
    for t in range(n):
      if ranks[l] > 0:
        values = np.abs(x[l, t][valid[l]]).astype(np.float64).ravel()
        out[l, t] = np.partition(values, ranks[l] - 1)[ranks[l] - 1]
  return out


def _case(dtype, rng, shape=(4, 3, 40, 50)):
  x = rng.standard_normal(shape).astype(dtype)
  x[0] = np.round(x[0] * 4) / 4                  # many equal magnitudes (and +-0)
  x[2, 1] = -x[2, 0]                              # equal magnitudes across tasks
  valid = np.ones(shape[::2], bool)
  valid[1, ::3] = False
  valid[3] = False                                # a padded module: rank 0
  return x, valid


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap, samples", [(1 << 16, 1 << 16), (16, 64), (200, 500)])
@pytest.mark.parametrize("top_k", [30, 100, 0.5])
def test_module_thresholds_equal_numpy(dtype, cap, samples, top_k):
  x, valid = _case(dtype, np.random.default_rng(3))
  counts = valid.sum(-1) * x.shape[-1]
  ranks = np.array([entrywise.kth_rank(int(c), top_k) for c in counts])
  got = threshold.module_kth_magnitudes(jnp.asarray(x), jnp.asarray(valid), ranks, cap=cap,
                                        samples=samples)
  assert got.shape == x.shape[:2] and got.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(got), _reference(x, valid, ranks).astype(dtype))
  old = kernels.layer_thresholds(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(ranks))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(old))   # the sort kernel


def test_explicit_ranks_including_extremes():
  """Rank 1 (the smallest), the last valid value, and 0 (keep all: threshold 0)."""
  x, valid = _case(np.float64, np.random.default_rng(5))
  ranks = np.array([1, int(valid[1].sum() * x.shape[-1]), 0, 0])
  got = threshold.module_kth_magnitudes(jnp.asarray(x), jnp.asarray(valid), ranks, cap=16,
                                        samples=64)
  np.testing.assert_array_equal(np.asarray(got), _reference(x, valid, ranks))
  assert not np.any(np.asarray(got)[2:])


def test_combine_uses_the_bracket_thresholds():
  x, valid = _case(np.float64, np.random.default_rng(9))
  ranks = np.array([7, 100, 2000, 0])
  got = combine._module_thresholds(jnp.asarray(x), jnp.asarray(valid), ranks)
  np.testing.assert_array_equal(np.asarray(got), _reference(x, valid, ranks))
