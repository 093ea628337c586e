"""`align`: the joint decomposition of every stack of an `AdapterSet`, computed once.

`merge` applies a method to it; a sweep calls `merge` many times on one
`Alignment`:

  >>> adapters = load_adapters(["a/", "b/", "c/"])
  >>> alignment = align(adapters)
  >>> for top_k in (10, 20, 30):
  ...   result = merge(alignment, "knots_ties", scaling=0.6, top_k=top_k)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.adapters.stacks import FactorStack, stack_adapters
from knots_jax.alignment import knots_svd
from knots_jax.methods.options import MergeConfig
from knots_jax.parallel import programs, sharding


@dataclasses.dataclass(frozen=True)
class Alignment:
  """The adapters, their factor stacks and (once computed) their joint decompositions."""
  adapters: AdapterSet
  factors: tuple[FactorStack, ...]
  aligned: tuple[knots_svd.AlignedStack, ...]
  settings: Mapping[str, object]
  seconds: float = 0.0
  mesh: jax.sharding.Mesh | None = None   # stacks placed with sharding.place_stack (padded)


def compute_dtype(name: str):
  """The jnp dtype of `name` for a merge's computation; float64 only with x64 enabled."""
  dtype = jnp.dtype(name)
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("dtype float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1 "
                     "or jax.config.update('jax_enable_x64', True) first)")
  return dtype


def align(
    adapters: AdapterSet,
    *,
    path: str = "factors",
    concat: str = "columns",
    tol: float = knots_svd.DEFAULT_TOL,
    dtype: str = "float32",
    progress: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> Alignment:
  """Joint decomposition of every stack of same-shaped modules.

  Args:
    adapters: from `load_adapters`.
    path: "factors" (QR + the SVD of a small matrix, from the LoRA factors;
      "core" is its old name) or "dense" (SVD of the concatenated dense
      updates; the reference).
    concat: "columns" ([dW_1, ..., dW_n], the paper) or "rows" (ablation).
    tol: components with singular value <= tol are dropped, as in the reference.
    dtype: "float32" or "float64" (needs jax x64).
    progress: show a progress bar over modules.
    mesh: from `sharding.make_mesh()`: the stacks are placed sharded over the
      stack axis (zero-padded to a multiple of the mesh size) before the
      jitted kernels; see docs/sharding.md.
  The options are checked as `MergeConfig` checks them (ValueError naming the option).
  """
  options = MergeConfig(method="knots_ta", path=path, concat=concat, tol=tol, dtype=dtype)
  programs.enable_compile_cache()
  dt = compute_dtype(options.dtype)
  start = time.perf_counter()
  factors = tuple(stack_adapters(adapters, dtype=_host_dtype(dt)))
  aligned = []
  total = sum(len(f.modules) for f in factors)
  with sharding.progress_bar(desc="align", total=total, unit="module",
                             disable=not progress) as bar:
    for f in factors:
      bar.set_postfix_str(f.name)
      b, a = f.b, f.a
      if mesh is not None:
        b, a = sharding.place_stack(b, mesh, dt), sharding.place_stack(a, mesh, dt)
      aligned.append(knots_svd.align_stack(
          f.modules, b, a, path=options.path, rows=options.concat == "rows", tol=options.tol,
          dtype=dt))
      jax.block_until_ready(aligned[-1].rep)
      bar.update(len(f.modules))
  settings = dict(path=options.path, concat=options.concat, tol=options.tol, dtype=str(dt))
  return Alignment(adapters, factors, tuple(aligned), settings, time.perf_counter() - start,
                   mesh=mesh)


def _host_dtype(dt) -> np.dtype:
  """The host dtype of the factor stacks: float64 for a float64 merge (PEFT's scale is
  folded into B in it), else float32."""
  return np.dtype(np.float64 if dt == jnp.float64 else np.float32)


def factor_alignment(adapters: AdapterSet, dtype: str = "float32") -> Alignment:
  """Factor stacks only, for the methods that do not use KnOTS."""
  return Alignment(adapters, tuple(stack_adapters(adapters, dtype=_host_dtype(jnp.dtype(dtype)))),
                   (), {})
