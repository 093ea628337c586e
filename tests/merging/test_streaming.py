"""The dense baselines (ties, dare_ties, dare without KnOTS) stream their stacks.

`_merge_dense` gives `combine` lazy stacks (callables making b @ a, and DARE's
mask, per pass) instead of every stack's dense updates at once; the results
must be bit-identical to the materialised computation, and the peak memory
about one stack's dense updates (plus the merged output), not all of them.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import knots_jax
from knots_jax.alignment import decompose
from knots_jax.merging import combine
from knots_jax.methods.options import MergeConfig
from knots_jax.merging.lazy import LazyStack
from knots_jax.merging import threshold as threshold_lib
from tests import synthetic

# > 2^16 values per task, so the whole-model threshold takes the sampled bracket.
SHAPES = {**{f"model.layers.{l}.self_attn.q_proj": (128, 200) for l in range(2)},
          **{f"model.layers.{l}.self_attn.k_proj": (64, 200) for l in range(2)}}


def _materialised(alignment, method, dt, **hyper):
  """The previous computation: every stack's dense updates made first, then `combine`."""
  reps = [jnp.matmul(jnp.asarray(f.b, dt), jnp.asarray(f.a, dt)) for f in alignment.factors]
  valids = [jnp.ones((r.shape[0], r.shape[2]), bool) for r in reps]
  config = MergeConfig(method=method, dtype=str(dt), **hyper)
  merged, info = combine.combine(reps, valids, [f.modules for f in alignment.factors], config)
  return [np.asarray(m) for m in merged], info


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scope", ["model", "layer"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare"])
def test_streaming_equals_materialised(method, scope, dtype):
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=5, shapes=SHAPES)
  alignment = decompose.factor_alignment(adapters)
  hyper = dict(scaling=0.7, top_k=25, drop_rate=0.5, seed=11, top_k_scope=scope)
  result = knots_jax.merge(alignment, method, dtype=dtype, **hyper)
  expected, info = _materialised(alignment, method, jnp.dtype(dtype), **hyper)
  assert len(result.stacks) == len(expected) == 2
  for s, e in zip(result.stacks, expected):
    assert s.delta.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(s.delta), e)
  if method != "dare" and scope == "model":
    assert result.stats["threshold"] == info["threshold"]
    assert result.stats["kth_rank"] == info["kth_rank"]


def test_kth_lazy_equals_arrays():
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(3, 4, 80, 400)).astype(np.float32)),
        jnp.asarray(rng.normal(size=(2, 4, 20, 500)).astype(np.float32))]
  valids = [jnp.asarray(rng.random((3, 80)) > 0.2), jnp.asarray(rng.random((2, 20)) > 0.3)]
  count = sum(int(np.sum(v)) * x.shape[3] for x, v in zip(xs, valids))
  assert count > 1 << 16   # the sampled bracket is taken
  ranks = [1, count // 7, count // 2, count]
  calls = []

  def lazy(x):
    def make():
      calls.append(1)
      return x
    return LazyStack(make)

  expected = threshold_lib.kth_smallest_magnitude(xs, valids, ranks)
  got = threshold_lib.kth_smallest_magnitude([lazy(x) for x in xs], valids, ranks)
  np.testing.assert_array_equal(got, expected)
  assert calls  # made on the fly


_MEMORY_WORKER = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import jax
import knots_jax
from tests import synthetic

kinds, layers, n, dim, rank = 16, 1, 8, 1024, 8
shapes = {f"model.layers.{l}.mlp.proj{k}": (dim, dim) for k in range(kinds) for l in range(layers)}
dense_total = len(shapes) * n * dim * dim * 4          # all n float32 task updates
big = synthetic.adapter_set(ranks=(rank,) * n, seed=0, shapes=shapes)
# Warm-up on small modules (> 2^16 values per task, so the threshold samples as
# well): the one-time costs (runtime, compiler, the fixed-size sample of the
# threshold search) are in the baseline, the increase is what grows with the model.
cold = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
small = synthetic.adapter_set(ranks=(rank,) * n, seed=1, shapes={k: (128, 128) for k in shapes})
jax.block_until_ready([s.delta for s in knots_jax.merge(small, "ties", top_k=20).stacks])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
result = knots_jax.merge(big, "ties", top_k=20)
jax.block_until_ready([s.delta for s in result.stacks])
print(json.dumps({"cold": cold, "base": base, "peak": peak(), "increase": peak() - base,
                  "dense_total": dense_total, "output": dense_total // n,
                  "stacks": len(result.stacks)}))
"""


def test_streaming_peak_memory():
  """Peak RSS of a TIES merge whose dense updates total 512 MiB (16 stacks of
  [1, 8, 1024, 1024]): the streaming merge holds about one stack (32 MiB) and the
  merged output (64 MiB); the materialised one held all 512 MiB (measured: an
  increase of ~1.1-1.3x of it)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _MEMORY_WORKER, root], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  stats = json.loads(out.stdout.strip().splitlines()[-1])
  ratio = stats["increase"] / stats["dense_total"]
  print(f"peak RSS increase {stats['increase'] / 2**20:.0f} MiB for dense updates of "
        f"{stats['dense_total'] / 2**20:.0f} MiB ({ratio:.2f}); merged output "
        f"{stats['output'] / 2**20:.0f} MiB; from before the warm-up: "
        f"{(stats['peak'] - stats['cold']) / 2**20:.0f} MiB")
  assert stats["stacks"] == 16
  assert ratio < 0.4, stats
