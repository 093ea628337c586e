"""Hugging Face safetensors tensors read into jax Arrays, on one device or sharded over a mesh.

On a mesh each device's block of a weight is read from disk on its own, by the
process that owns the device (`read_one`); the headers and the file of every
key come from `hf_checkpoint`.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from knots_jax.io.hf_checkpoint import header, open_safetensors
from knots_jax.parallel.sharding import weight_sharding


def _read_slice(path: str, key: str, index, dtype) -> np.ndarray:
  """Only the block `index` (a tuple of slices) of one tensor, from disk."""
  with open_safetensors(path) as f:
    s = f.get_slice(key)
    block = s[index] if len(index) else f.get_tensor(key)
  return np.asarray(block, dtype)


def _index_key(index) -> tuple:
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)


def read_one(path, key, shape, stored, mesh, dtype) -> jax.Array:
  """One tensor; on a mesh each distinct block is read once per process.

  `make_array_from_callback` asks for the block of every local device; devices
  that hold the same block (all of them, for a replicated tensor) get the one
  copy read first instead of reading it from disk again.
  """
  dtype = np.dtype(stored if dtype is None else dtype)
  if mesh is None:
    return jnp.asarray(_read_slice(path, key, (slice(None),) * len(shape), dtype))
  blocks: dict[tuple, np.ndarray] = {}

  def block(index):
    k = _index_key(index)
    if k not in blocks:
      blocks[k] = _read_slice(path, key, index, dtype)
    return blocks[k]

  return jax.make_array_from_callback(shape, weight_sharding(mesh, shape), block)


def read_backbone(model_dir: str, keys: Iterable[str] | None = None, mesh: Mesh | None = None,
                  dtype=None) -> dict[str, jax.Array]:
  """Reads a HF safetensors checkpoint (all tensors, or `keys`) into jax Arrays.

  Args:
    model_dir: a directory with `model.safetensors` or `model.safetensors.index.json`.
    keys: the tensors to read (default: all, in checkpoint order).
    mesh: a `sharding.make_mesh()` mesh. Each weight is sharded over its rows when
      they divide the mesh size, else replicated; every device's block is read
      from disk on its own by the process that owns the device.
    dtype: cast to this dtype (default: keep the stored dtype; bf16 stays bf16).
  """
  return {key: read_one(path, key, shape, stored, mesh, dtype)
          for key, (path, shape, stored) in header(model_dir, keys).items()}
