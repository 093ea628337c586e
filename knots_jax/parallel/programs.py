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
import os
import warnings
from typing import Callable, Sequence

import jax


def per_stack(fn: Callable, *, in_axes: int | Sequence[int | None] = 0,
              static_argnames: Sequence[str] = ()) -> Callable:
  """`jax.jit(jax.vmap(fn, in_axes))`; keyword arguments are static (`static_argnames`)."""
  def run(*arrays, **static):
    return jax.vmap(functools.partial(fn, **static), in_axes=in_axes)(*arrays)
  run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
  return jax.jit(run, static_argnames=tuple(static_argnames))


CACHE_ENV = "KNOTS_JAX_COMPILE_CACHE"   # a directory, or "off"
_OFF = ("off", "none", "0", "false")


def default_cache_dir() -> str:
  """The per-user directory of compiled programs: $XDG_CACHE_HOME/knots_jax/jax
  (~/.cache/knots_jax/jax)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "knots_jax", "jax")


def enable_compile_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, so that a second process on the machine
  loads the merge's programs instead of compiling them again; returns its directory.

  `path` (or $KNOTS_JAX_COMPILE_CACHE, else `default_cache_dir()`); "off" disables it. A
  cache directory the caller already gave JAX is left as it is. JAX writes each entry
  atomically, so concurrent processes may share the directory.
  """
  current = jax.config.jax_compilation_cache_dir
  if current and path is None:
    return current
  value = path if path is not None else os.environ.get(CACHE_ENV, "")
  if value.strip().lower() in _OFF:
    return None
  value = os.path.abspath(os.path.expanduser(value or default_cache_dir()))
  try:
    os.makedirs(value, exist_ok=True)
  except OSError as e:   # a read-only home: run without a cache rather than fail
    warnings.warn(f"compile cache `{value}` cannot be created ({e}); compiling without it",
                  RuntimeWarning, stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", value)
  # The merge's programs compile in 0.05-1 s each: cache them all (JAX's default is >= 1 s).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return value
