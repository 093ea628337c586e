"""safetensors files written slot by slot, in any order, by several threads.

A safetensors file is a little-endian u64 header length, a JSON header
(padded with spaces to a multiple of 8 bytes) giving every tensor's dtype,
shape and byte range, then the tensors' bytes back to back in header order.
When the names, shapes and dtypes are known in advance (the merged model has
exactly the base model's), the header can be written first and every tensor
put at its offset whenever it is ready: the base tensors a merge leaves alone
can be copied while the merge is still running, and the merged ones added
afterwards, with no shard ever held in memory.

Unchanged tensors are copied file to file with `os.copy_file_range` (the
kernel moves the bytes; no Python buffers), falling back to reads and
`os.pwrite` of at most `chunk` bytes where the call is missing or refused
(other OS, across filesystems).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_CHUNK = 64 * 2**20
# copy_file_range refusals that mean "not here", not "broken input": fall back to read + write.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM,
                errno.EBADF}


def numpy_dtype(name: str) -> np.dtype:
  """numpy dtype of a safetensors dtype name (`BF16` -> ml_dtypes.bfloat16)."""
  if name not in _DTYPES:
    raise ValueError(f"safetensors dtype {name} is not supported here "
                     f"(supported: {', '.join(_DTYPES)})")
  return np.dtype(_DTYPES[name])


def data_offsets(path: str) -> dict[str, tuple[int, int]]:
  """{key: (first byte, end byte)} of every tensor's data in one safetensors file, from its header.

  Offsets are absolute positions in the file (the header's `data_offsets`
  are relative to the end of the header), so a tensor's stored bytes can be
  copied without reading them into arrays.
  """
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"`{path}` is not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise ValueError(f"`{path}`: unreadable safetensors header ({e})") from None
  start = 8 + length
  return {k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
          for k, v in header.items() if k != "__metadata__"}


def _pwrite_all(fd: int, data, offset: int) -> None:
  view = memoryview(data).cast("B")
  while view:
    written = os.pwrite(fd, view, offset)
    view, offset = view[written:], offset + written


def copy_bytes(src: str, begin: int, nbytes: int, dst_fd: int, dst_offset: int, *,
               chunk: int = _CHUNK, stop: threading.Event | None = None) -> None:
  """Copies bytes [begin, begin + nbytes) of the file `src` to `dst_fd` at `dst_offset`.

  `copy_file_range` in calls of at most `chunk` bytes, else reads and positioned
  writes of `chunk` bytes; `stop` (when set) ends the copy early between chunks.
  """
  src_fd = os.open(src, os.O_RDONLY)
  try:
    done = 0
    fast = hasattr(os, "copy_file_range")
    while done < nbytes:
      if stop is not None and stop.is_set():
        return
      want = min(chunk, nbytes - done)
      moved = 0
      if fast:
        try:
          moved = os.copy_file_range(src_fd, dst_fd, want, begin + done, dst_offset + done)
        except OSError as e:
          if e.errno not in _UNSUPPORTED:
            raise
          fast = False
          continue
      else:
        block = os.pread(src_fd, want, begin + done)
        if block:
          _pwrite_all(dst_fd, block, dst_offset + done)
        moved = len(block)
      if moved == 0:
        raise ValueError(f"{src}: the file ends {nbytes - done} bytes before the end of the "
                         f"tensor that starts at byte {begin}")
      done += moved
  finally:
    os.close(src_fd)


class ShardWriter:
  """One safetensors file whose tensors are written at their offsets, in any order.

  The header (names, dtypes, shapes, byte offsets, in `entries` order) is
  written and the file sized when it is opened; `write` (an array) and
  `copy_from` (bytes of another file) then fill one tensor each, from any
  thread (positioned writes on one descriptor), and `close` checks that every
  tensor was written. Writing a tensor twice replaces it (last write wins).
  """

  def __init__(self, path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               metadata: Mapping[str, str] | None = None):
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    slots = {}
    for key, shape, dtype in entries:
      dtype = np.dtype(dtype)
      if dtype not in _NAMES:
        raise ValueError(f"`{key}`: dtype {dtype} cannot be written to safetensors here")
      if key in slots:
        raise ValueError(f"{path}: tensor `{key}` is listed twice")
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[key] = {"dtype": _NAMES[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
      slots[key] = (offset, tuple(shape), dtype, nbytes)
      offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    self.path = path
    self.nbytes = offset
    self._slots = {k: (start + o, s, d, n) for k, (o, s, d, n) in slots.items()}
    self._order = [k for k, *_ in entries]
    self._written: set[str] = set()
    self._lock = threading.Lock()
    self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      _pwrite_all(self._fd, struct.pack("<Q", len(text)) + text, 0)
      os.ftruncate(self._fd, start + offset)
    except BaseException:
      os.close(self._fd)
      raise

  def _slot(self, key: str):
    if key not in self._slots:
      raise ValueError(f"{self.path}: `{key}` is not in this shard")
    return self._slots[key]

  def _done(self, key: str) -> None:
    with self._lock:
      self._written.add(key)

  def write(self, key: str, array: np.ndarray) -> None:
    """Writes tensor `key` from an array of its shape and dtype."""
    offset, shape, dtype, _ = self._slot(key)
    if array.shape != shape or array.dtype != dtype:
      raise ValueError(f"{self.path}: `{key}` is {shape} {dtype} in the header, got "
                       f"{array.shape} {array.dtype}")
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    _pwrite_all(self._fd, flat, offset)
    self._done(key)

  def copy_from(self, key: str, path: str, begin: int, end: int, *, chunk: int = _CHUNK,
                stop: threading.Event | None = None) -> None:
    """Writes tensor `key` as the bytes [begin, end) of the file `path` (no arrays made).

    With `stop` set meanwhile the copy ends early and the tensor counts as not written.
    """
    offset, shape, dtype, nbytes = self._slot(key)
    if end - begin != nbytes:
      raise ValueError(f"{self.path}: `{key}` ({shape} {dtype}) has {nbytes} bytes, got "
                       f"{end - begin} bytes from {path}")
    copy_bytes(path, begin, nbytes, self._fd, offset, chunk=chunk, stop=stop)
    if stop is None or not stop.is_set():
      self._done(key)

  @property
  def missing(self) -> list[str]:
    """Tensors not written yet, in header order."""
    with self._lock:
      return [k for k in self._order if k not in self._written]

  def close(self, check: bool = True) -> None:
    """Closes the file (once), then checks that every tensor was written unless not `check`."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    missing = self.missing if check else []
    if missing:
      raise ValueError(f"{self.path}: `{missing[0]}` and {len(missing) - 1} more tensors were "
                       "not written")

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, kind, *_):
    self.close(check=kind is None)


__all__ = ["ShardWriter", "copy_bytes", "data_offsets", "numpy_dtype"]
