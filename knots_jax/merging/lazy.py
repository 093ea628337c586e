"""Stacks that are made on demand: the dense baselines never hold every task update.

A `LazyStack` is a stack of per-task values `[L, n, R, C]` given by how to make
it (e.g. `b @ a` from the factors). Every pass over the model (threshold,
majority sign, merge) makes it, uses it and drops it, so memory holds about
one stack at a time; the price is recomputing it in every pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax


@dataclasses.dataclass(frozen=True)
class LazyStack:
  """A stack made by `make()` each time it is needed."""
  make: Callable[[], jax.Array]

  def shape(self) -> jax.ShapeDtypeStruct:
    """Shape and dtype without computing it (`jax.eval_shape`)."""
    return jax.eval_shape(self.make)


Stack = Union[jax.Array, LazyStack]


def materialize(x: Stack) -> jax.Array:
  """The array of a stack, made now if it is lazy."""
  return x.make() if isinstance(x, LazyStack) else x


def shape_of(x: Stack):
  """Shape and dtype of a stack (an array, or a lazy stack's `eval_shape`)."""
  return x.shape() if isinstance(x, LazyStack) else x


def is_lazy(x: Stack) -> bool:
  return isinstance(x, LazyStack)
