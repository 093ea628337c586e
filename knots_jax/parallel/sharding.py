"""Meshes, partition specs and multi-host start for sharded merges.

Every array the merge computes on is a stack `[L, ...]` of L same-shaped modules
(factors `b` [L, n, out, r], `a` [L, n, r, in], aligned `rep` [L, n, K, in],
`u` [L, out, K], `valid` [L, K], merged [L, K, in] / [L, out, in]). The work per
module is independent until the whole-model statistics of TIES, so the one rule
is: axis 0 (the stack axis, `L`) is sharded over the mesh axis `STACK`; every
other axis is replicated. A stack whose length does not divide the number of
devices is zero-padded to the next multiple (`padded_length`): padded modules
have zero factors, hence zero singular values, so the alignment marks all their
components invalid and the merge never counts them (and DARE draws its mask for
the true length). Results are cut back to L and replicated (`unpad`).

On one host with several GPUs:

  >>> from knots_jax import merge, sharding
  >>> result = merge(adapters, "knots_ties", mesh=sharding.make_mesh())

On several hosts, run the same program on every host (same adapters), with
`initialize()` before anything else touches JAX:

  >>> sharding.initialize()   # or initialize("10.0.0.1:1234", num_processes=2, process_id=i)
  >>> result = merge(adapters, "knots_ties", mesh=sharding.make_mesh())

The mesh axis name and every PartitionSpec live in this module only.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

STACK = "stack"   # the one mesh axis: modules of a stack are spread over it


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `stack` over `devices` (default: every device of every process).

  The axis is `AxisType.Auto`, not the Explicit type `jax.make_mesh` gives by
  default in this JAX: under Explicit axes, gathers and reshapes of sharded
  arrays (the sampled bracket of `kth`, `x.reshape(-1)[idx]`; indexing in the
  kernels) need an `out_sharding=` at every call. With Auto axes the inputs
  carry their shardings and XLA (GSPMD / Shardy) propagates them through the
  unchanged jitted kernels, inserting the cross-device reductions itself.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (STACK,), axis_types=(AxisType.Auto,), devices=devices)


def stack_spec(ndim: int) -> PartitionSpec:
  """`P("stack", None, ...)`: axis 0 sharded, the other `ndim - 1` axes replicated."""
  if ndim < 1:
    raise ValueError(f"a stacked array has at least one axis (the stack axis), got ndim={ndim}")
  return PartitionSpec(STACK, *([None] * (ndim - 1)))


def padded_length(length: int, mesh: Mesh) -> int:
  """The stack length rounded up to a multiple of the mesh size."""
  size = mesh.shape[STACK]
  return -(-length // size) * size


def stack_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a stacked array of `shape` [L, ...] (L must already be padded).

  Computed from the shape only, before anything is allocated.
  """
  if shape[0] % mesh.shape[STACK]:
    raise ValueError(f"stack length {shape[0]} is not a multiple of the mesh size "
                     f"{mesh.shape[STACK]}; pad it first (padded_length)")
  return NamedSharding(mesh, stack_spec(len(shape)))


def replicated_spec() -> PartitionSpec:
  """`P()`: every device holds the whole array."""
  return PartitionSpec()


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (small results, thresholds)."""
  return NamedSharding(mesh, replicated_spec())


def weight_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Rows (axis 0) over the mesh when they divide its size, else replicated."""
  if len(shape) >= 1 and shape[0] % mesh.shape[STACK] == 0:
    return NamedSharding(mesh, PartitionSpec(STACK, *([None] * (len(shape) - 1))))
  return replicated(mesh)


def batch_spec(mesh: Mesh, ndim: int) -> PartitionSpec:
  """`P((every axis of mesh), None, ...)`: a batch leaf's axis 0 over the whole mesh.

  Data batches (forward passes that record Grams or Fishers) split their
  examples over every device, whatever the axes are named (the `stack` mesh
  of `make_mesh` or a user's own mesh); the other `ndim - 1` axes are replicated.
  """
  if ndim < 1:
    raise ValueError(f"a batch leaf has at least one axis (the batch axis), got ndim={ndim}")
  return PartitionSpec(tuple(mesh.axis_names), *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch leaf with `ndim` axes: `batch_spec` on `mesh`.

  Axis 0 must be a multiple of `mesh.size` (padding rows would count as inputs).
  """
  return NamedSharding(mesh, batch_spec(mesh, ndim))


def is_on_mesh(x: object, mesh: Mesh) -> bool:
  """Whether `x` is a jax.Array already laid out by a NamedSharding over `mesh`."""
  return isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) \
      and x.sharding.mesh == mesh


def place_stack(x: np.ndarray | jax.Array, mesh: Mesh, dtype=None, fill=0) -> jax.Array:
  """A host stack [L, ...] as a global array [padded_length(L), ...] sharded over `stack`.

  Built with `jax.make_array_from_callback`, so every process supplies only the
  shards of its own devices from its own (identical) host copy: this works on
  one process and across processes, where `device_put` of host data to a
  global sharding does not. Padding rows are `fill`.
  """
  x = np.asarray(x, dtype)
  length = padded_length(x.shape[0], mesh)
  if length != x.shape[0]:
    pad = np.full((length - x.shape[0],) + x.shape[1:], fill, x.dtype)
    x = np.concatenate([x, pad], axis=0)
  return jax.make_array_from_callback(x.shape, stack_sharding(mesh, x.shape), lambda idx: x[idx])


def place_replicated(x, mesh: Mesh) -> jax.Array:
  """A small host array, replicated on every device of the mesh (all processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])


def unpad(x: jax.Array, length: int, mesh: Mesh) -> jax.Array:
  """The first `length` rows of a padded stack, replicated on every device.

  Merged results are as large as one merged adapter; replicating them lets
  every process read them (`np.asarray`) and write files.
  """
  return _unpad(x, length, replicated(mesh))


def _unpad(x, length, sharding):
  return _unpad_fn(length, sharding)(x)


@functools.lru_cache(maxsize=256)
def _unpad_fn(length: int, sharding: NamedSharding):
  """One jitted cut per (length, sharding): a fresh lambda each call would recompile."""
  return jax.jit(lambda y: y[:length], out_shardings=sharding)


def to_host(x) -> np.ndarray:
  """`np.asarray(x)`, also for a global array with shards on other processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def like(ref, x) -> jax.Array:
  """`jnp.asarray(x)`; replicated over `ref`'s mesh when `ref` spans several processes.

  For the small host values (thresholds, bracket ends) the kernels take next
  to a sharded stack: a process-local array cannot enter a program whose other
  inputs have shards on other processes.
  """
  if isinstance(ref, jax.Array) and not ref.is_fully_addressable:
    return place_replicated(np.asarray(x), ref.sharding.mesh)
  return jnp.asarray(x)


def host_label() -> str:
  """`host i/n` on several processes (i from 0), else the empty string."""
  count = jax.process_count()
  return f"host {jax.process_index()}/{count}" if count > 1 else ""


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None,
                 unit: str = "it", disable: bool = False, unit_scale: bool = False) -> tqdm.tqdm:
  """A tqdm bar; on several processes its label starts with `host i/n` and its line is i.

  Every process of a multi-host run shows its own bar: the host prefix says
  whose it is, and `position=process_index` keeps the bars of processes that
  share a terminal (local test runs) on separate lines.
  """
  label = host_label()
  return tqdm.tqdm(iterable, desc=f"{label} {desc}" if label else desc, total=total, unit=unit,
                   unit_scale=unit_scale, unit_divisor=1024 if unit == "B" else 1000,
                   disable=disable, position=jax.process_index() if label else None,
                   leave=True)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, **kwargs) -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`); a no-op on one process.

  With no arguments, JAX detects the cluster (SLURM, Cloud TPU, Open MPI, ...)
  or reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; when
  nothing says there is more than one process, nothing is started. Call it
  before any other JAX call.
  """
  if num_processes == 1:
    return
  if coordinator_address is None and num_processes is None and process_id is None:
    import os

    from jax._src import clusters  # detection only; no side effects
    env = any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"))
    detected = any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types)
    if not env and not detected:
      return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)


__all__ = ["STACK", "make_mesh", "stack_spec", "stack_sharding", "padded_length", "replicated",
           "replicated_spec",
           "weight_sharding", "batch_spec", "batch_sharding", "is_on_mesh", "place_stack",
           "place_replicated", "unpad", "to_host", "like", "initialize", "host_label",
           "progress_bar"]

