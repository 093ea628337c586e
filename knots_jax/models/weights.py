"""Filling an NNX model with Hugging Face tensors, from files or from a merge.

A model describes its parameters as `targets`: {HF key: (variable, transposed)}
(`lora.linear_targets` for its projections, plus embeddings and norms). The
model is built abstractly (`nnx.eval_shape`, no random weights allocated) and
`load_pretrained` fills every target:

* from a HF checkpoint directory (one safetensors file or a sharded index):
  every shape is checked against the safetensors headers first, so an error
  names the shard file and the key; the tensors are read with
  `sharded_read.read_backbone` (with a mesh, each device reads its own rows);
* or from `weights=`, a {key: array} mapping or a (key, array) iterator, e.g.
  `full_model.merged_model_weights(result, model_dir)` for a merged model.

Keys the model does not use are skipped (a full CLIPModel's text tower, rotary
caches); each tensor is cast to `dtype` and, with a mesh, placed with
`sharding.weight_sharding`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from knots_jax.io import hf_checkpoint

from knots_jax.io import sharded_read
from knots_jax.parallel import sharding as sharding_lib

Targets = Mapping[str, tuple[nnx.Variable, bool]]     # HF key -> (variable, transposed)
Weights = Mapping[str, object] | Iterable[tuple[str, object]]   # HF key -> array
M = TypeVar("M", bound=nnx.Module)


def _hf_shape(var: nnx.Variable, transposed: bool) -> tuple[int, ...]:
  shape = tuple(var.get_value().shape)
  return shape[::-1] if transposed else shape


def check_shapes(targets: Targets, shapes: Mapping[str, tuple[int, ...]],
                 where: Callable[[str], str]) -> None:
  """ValueError naming `where(key)` (the file) and the key whose shape differs."""
  for key, (var, transposed) in targets.items():
    if key in shapes and tuple(shapes[key]) != _hf_shape(var, transposed):
      raise ValueError(f"{where(key)}: tensor `{key}` has shape {tuple(shapes[key])}, the model "
                       f"(config.json) expects {_hf_shape(var, transposed)}")


def _on_mesh(value, mesh: Mesh) -> bool:
  return (isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding)
          and value.sharding.mesh == mesh)


def place(value, dtype, mesh: Mesh | None) -> jax.Array:
  """`value` as a jax Array of `dtype`; with a mesh, rows over it
  (`sharding.weight_sharding`) unless it already lies on that mesh."""
  if mesh is None:
    return jnp.asarray(value, dtype)
  if _on_mesh(value, mesh):
    return value.astype(dtype)
  host = np.asarray(sharding_lib.to_host(value), dtype)
  return jax.make_array_from_callback(host.shape, sharding_lib.weight_sharding(mesh, host.shape),
                                      lambda idx: host[idx])


def missing_error(source: str, missing: list[str], hint: str = "") -> ValueError:
  return ValueError(f"{source}: missing {len(missing)} tensor(s) the model needs: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{hint}")


def load_pretrained(build: Callable[[], M], targets_of: Callable[[M], Targets], model_dir: str, *,
                    dtype, weights: Weights | None = None, mesh: Mesh | None = None,
                    hint: Callable[[list[str]], str] = lambda missing: "") -> M:
  """Builds `build()` abstractly and fills every target from `model_dir` or `weights`.

  Args:
    build: makes the model (called under `nnx.eval_shape`).
    targets_of: the model's {HF key: (variable, transposed)}.
    model_dir: the HF checkpoint directory (read unless `weights` is given; names
      the source in errors either way).
    dtype: every tensor is cast to it.
    weights: HF-named tensors used instead of the checkpoint's.
    mesh: place every weight with `sharding.weight_sharding` over it.
    hint: extra text for the missing-tensor error, given the missing keys.

  Raises:
    ValueError naming the checkpoint file (or "weights given for ...") and the
    key that is missing or whose shape differs.
  """
  model = nnx.eval_shape(build)
  targets = targets_of(model)
  if weights is None:
    files = hf_checkpoint.tensor_files(model_dir)
    index = os.path.join(model_dir, hf_checkpoint.INDEX)
    source = index if os.path.isfile(index) else os.path.join(model_dir, hf_checkpoint.SINGLE)
    missing = sorted(k for k in targets if k not in files)
    if missing:
      raise missing_error(source, missing, hint(missing))
    check_shapes(targets, hf_checkpoint.weight_shapes(model_dir),
                 lambda key: files[key])
    tensors = sharded_read.read_backbone(model_dir, keys=list(targets), mesh=mesh, dtype=dtype)
  else:
    source = f"weights given for `{model_dir}`"
    items = weights.items() if isinstance(weights, Mapping) else weights
    tensors = {}
    for key, value in items:
      if key in targets:
        check_shapes({key: targets[key]}, {key: tuple(np.shape(value))}, lambda k: source)
        tensors[key] = place(value, dtype, mesh)
    missing = sorted(k for k in targets if k not in tensors)
    if missing:
      raise missing_error(source, missing, hint(missing))
  for key, value in tensors.items():
    var, transposed = targets[key]
    var.set_value(value.T if transposed else value)
  return model


def replace_weights(targets: Targets, weights: Weights, source: str = "weights") -> list[str]:
  """Replaces some parameters of a loaded model in place, keeping dtype and sharding.

  Keys not in `targets` are skipped. Returns the keys loaded.
  """
  items = weights.items() if isinstance(weights, Mapping) else weights
  tensors = {}
  for key, value in items:
    if key not in targets:
      continue
    var, transposed = targets[key]
    check_shapes({key: targets[key]}, {key: tuple(np.shape(value))}, lambda k: source)
    old = var.get_value()
    host = np.asarray(sharding_lib.to_host(value), old.dtype)
    host = host.T if transposed else host
    tensors[key] = jax.make_array_from_callback(host.shape, old.sharding,
                                                lambda idx, h=host: h[idx])
  for key, value in tensors.items():
    targets[key][0].set_value(value)
  return sorted(tensors)
