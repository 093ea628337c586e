"""Atomic output directories: a failed or interrupted write leaves nothing behind.

Everything is written into a temporary sibling `<path>.tmp-<random>` that is
renamed to `path` only when the block exits normally. On the same filesystem a
rename is atomic, so a reader sees either no output (or the old one) or the
complete new one, never a half-written directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np


def check_output_dir(path: str, overwrite: bool = False) -> None:
  """Raises ValueError if `path` may not be written: it exists and not `overwrite`, or is a file."""
  _check_target(os.path.normpath(os.path.abspath(os.fspath(path))), overwrite)


def _check_target(path: str, overwrite: bool) -> None:
  """Refuses to write over an existing output unless asked to (and never over a file)."""
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path) or os.path.islink(path):
    raise ValueError(f"output `{path}` exists and is not a directory; refusing to replace it")
  if not overwrite:
    raise ValueError(f"output directory `{path}` already exists; pass overwrite=True "
                     "(--config.overwrite=True) to replace it")


def _swap_in(tmp: str, path: str) -> None:
  """Moves the finished `tmp` to `path`; an old `path` is removed only after the swap."""
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  parent, name = os.path.split(path)
  aside = tempfile.mkdtemp(prefix=f"{name}.old-", dir=parent)
  os.rmdir(aside)                      # only the unique name is wanted
  os.rename(path, aside)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(aside, path)             # put the old output back
    raise
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `path` when the block succeeds.

  Raises ValueError before anything is written if `path` exists and not
  `overwrite`. With `overwrite`, the old directory is replaced only once the new
  one is complete. On any exception (KeyboardInterrupt included) the temporary
  directory is removed and `path` is left as it was.
  """
  path = os.path.normpath(os.path.abspath(os.fspath(path)))
  _check_target(path, overwrite)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=parent)
  try:
    yield tmp
    _check_target(path, overwrite)     # something may have appeared meanwhile
    _swap_in(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _to_json(obj: Any) -> Any:
  """JSON fallback for NumPy / JAX scalars and arrays, tuples, sets."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  if isinstance(obj, (set, frozenset)):
    return sorted(obj)
  raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON (NumPy values converted), replacing `path` atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, default=_to_json)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def write_results(workdir: str, results: Any, text: str, overwrite: bool = False) -> None:
  """An evaluation's `results.json` (every number) and `results.md` (its tables), atomically."""
  with atomic_output_dir(workdir, overwrite=overwrite) as tmp:
    write_json(os.path.join(tmp, RESULTS_JSON), results)
    with open(os.path.join(tmp, RESULTS_MD), "w") as f:
      f.write(text)
