"""Hugging Face backbones on disk: `model.safetensors` or a sharded checkpoint.

Only headers and the requested tensors are read (`safetensors.safe_open`), so a
large backbone is never loaded whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Iterator

import numpy as np
import safetensors


SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def open_safetensors(path: str) -> Iterator:
  """`safetensors.safe_open(path)`; a corrupt or truncated file raises a ValueError that names
  it (safetensors' own errors do not say which file)."""
  open(path, "rb").close()   # the real OSError (safetensors says "No such file" for EACCES)
  try:
    handle = safetensors.safe_open(path, framework="numpy")
  except (safetensors.SafetensorError, OSError) as e:
    raise ValueError(f"`{path}` is not a readable safetensors file: {e}") from None
  with handle as f:
    try:
      yield f
    except safetensors.SafetensorError as e:
      raise ValueError(f"`{path}`: corrupt safetensors data: {e}") from None


def tensor_files(model_dir: str) -> dict[str, str]:
  """{tensor key: safetensors file} of a model directory."""
  index = os.path.join(model_dir, INDEX)
  single = os.path.join(model_dir, SINGLE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
  if os.path.isfile(single):
    with open_safetensors(single) as f:
      return {k: single for k in f.keys()}
  raise FileNotFoundError(
      f"`{model_dir}` is not a Hugging Face safetensors model: neither {SINGLE} nor {INDEX} "
      "found (pickled .bin backbones are not supported; re-save with safe_serialization=True)")


def keys_by_file(model_dir: str, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
  """{safetensors file: its keys among `keys` (default: all)}; KeyError for missing keys."""
  files = tensor_files(model_dir)
  keys = list(files) if keys is None else list(keys)
  missing = [k for k in keys if k not in files]
  if missing:
    raise KeyError(f"`{model_dir}` has no tensor {missing[0]!r}"
                   f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}")
  by_file: dict[str, list[str]] = {}
  for key in keys:
    by_file.setdefault(files[key], []).append(key)
  return by_file


def weight_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
  """{tensor key: shape} from the safetensors headers only."""
  shapes = {}
  for path, keys in keys_by_file(model_dir).items():
    with open_safetensors(path) as f:
      for key in keys:
        shapes[key] = tuple(f.get_slice(key).get_shape())
  return shapes


def read_tensors(model_dir: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Reads only `keys` (in their stored dtype; bf16 as ml_dtypes.bfloat16)."""
  out = {}
  for path, file_keys in keys_by_file(model_dir, keys).items():
    with open_safetensors(path) as f:
      for key in file_keys:
        out[key] = f.get_tensor(key)
  return out


def header(model_dir: str, keys: Iterable[str] | None = None):
  """{key: (file, shape, numpy dtype)} from the safetensors headers only."""
  from knots_jax.io import safetensors_slots   # ml_dtypes (~1 s to import): only when needed
  keys = list(tensor_files(model_dir) if keys is None else keys)
  info = {}
  for path, file_keys in keys_by_file(model_dir, keys).items():
    with open_safetensors(path) as f:
      for key in file_keys:
        s = f.get_slice(key)
        info[key] = (path, tuple(s.get_shape()), safetensors_slots.numpy_dtype(s.get_dtype()))
  return {k: info[k] for k in keys}
