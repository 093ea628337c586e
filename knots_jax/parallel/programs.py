"""The one way the package compiles per-stack programs: `jit(vmap(fn))` over the stack axis.

Every array a merge computes on is a stack `[L, ...]` of L same-shaped modules
(`parallel.sharding`). The math of one module is a pure function (in
`knots_jax.methods`, `knots_jax.alignment`); `per_stack` makes it a compiled
program over a stack, with its hyper-parameters static where they change
shapes. Inputs sharded over the mesh keep their sharding through it.

  >>> sum_stack = per_stack(lambda x, scale: scale * x.sum(0), in_axes=(0, None))
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax


def per_stack(fn: Callable, *, in_axes: int | Sequence[int | None] = 0,
              static_argnames: Sequence[str] = ()) -> Callable:
  """`jax.jit(jax.vmap(fn, in_axes))`; keyword arguments are static (`static_argnames`)."""
  def run(*arrays, **static):
    return jax.vmap(functools.partial(fn, **static), in_axes=in_axes)(*arrays)
  run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
  return jax.jit(run, static_argnames=tuple(static_argnames))
