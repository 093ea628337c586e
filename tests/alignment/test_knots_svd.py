"""The joint decomposition: core path, dense path, and NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from knots_jax.adapters.stacks import stack_adapters
from knots_jax.alignment import knots_svd
from tests import synthetic


@pytest.fixture(scope="module")
def stacks():
  return stack_adapters(synthetic.adapter_set(ranks=(2, 3, 4)))


def _reconstruct(stack):
  rec = np.einsum("lok,lnki->lnoi", np.asarray(stack.u), np.asarray(stack.rep))
  return np.swapaxes(rec, -1, -2) if stack.transposed else rec


@pytest.mark.parametrize("path", ["core", "dense"])
@pytest.mark.parametrize("rows", [False, True])
def test_decomposition_reconstructs_every_task_update(stacks, path, rows):
  for f in stacks:
    st = knots_svd.align_stack(f.modules, f.b, f.a, path=path, rows=rows, dtype=jnp.float64)
    np.testing.assert_allclose(_reconstruct(st), f.deltas(), atol=1e-10)
    # u has orthonormal columns.
    u = np.asarray(st.u)
    np.testing.assert_allclose(np.swapaxes(u, 1, 2) @ u, np.broadcast_to(np.eye(u.shape[-1]), (u.shape[0], u.shape[-1], u.shape[-1])), atol=1e-10)


def test_core_singular_values_equal_numpy_svd(stacks):
  for f in stacks:
    st = knots_svd.align_stack(f.modules, f.b, f.a, dtype=jnp.float64)
    for l in range(len(f.modules)):
      cat = np.concatenate(list(f.deltas()[l].astype(np.float64)), axis=1)
      s = np.linalg.svd(cat, compute_uv=False)
      k = int(st.num_valid[l])
      assert k == int(np.sum(s > 1e-5)) == min(2 + 3 + 4, cat.shape[0])  # padding adds no rank
      np.testing.assert_allclose(np.asarray(st.s[l, :k]), s[:k], rtol=1e-10)
      # Invalid components carry no values.
      assert np.all(np.asarray(st.rep[l, :, k:]) == 0)


def test_core_and_dense_representations_agree_up_to_sign(stacks):
  for f in stacks:
    core = knots_svd.align_stack(f.modules, f.b, f.a, path="core", dtype=jnp.float64)
    dense = knots_svd.align_stack(f.modules, f.b, f.a, path="dense", dtype=jnp.float64)
    assert core.rep.shape == dense.rep.shape
    k = int(core.num_valid.min())
    sign = np.sign(np.sum(np.asarray(core.u[..., :k]) * np.asarray(dense.u[..., :k]), axis=1))
    np.testing.assert_allclose(np.asarray(core.rep[:, :, :k]) * sign[:, None, :, None],
                               np.asarray(dense.rep[:, :, :k]), atol=1e-9)


def test_tolerance_drops_small_components():
  rng = np.random.default_rng(0)
  b = rng.normal(size=(1, 2, 8, 2))
  a = rng.normal(size=(1, 2, 2, 6))
  b[0, 1] *= 1e-8  # the second task's update is tiny: its components fall under tol
  st = knots_svd.align_stack(("m",), b, a, dtype=jnp.float64, tol=1e-5)
  assert int(st.num_valid[0]) == 2
  st = knots_svd.align_stack(("m",), b, a, dtype=jnp.float64, tol=0.0)
  assert int(st.num_valid[0]) == 4


def test_float32_core_path_is_accurate(stacks):
  for f in stacks:
    st = knots_svd.align_stack(f.modules, f.b, f.a, dtype=jnp.float32)
    assert st.rep.dtype == jnp.float32
    np.testing.assert_allclose(_reconstruct(st), f.deltas(), rtol=0, atol=2e-5 * np.abs(f.deltas()).max())
