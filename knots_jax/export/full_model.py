"""The whole base model in JAX: read it, add a merge to it, write it back.

* `read_backbone`: a Llama-family HF safetensors checkpoint (one file or
  sharded with `model.safetensors.index.json`) straight into `jax.Array`s, no
  torch. With a mesh, every weight whose first axis divides the mesh size is
  sharded over its rows (axis `sharding.STACK`), the others are replicated, and
  each device's block is read from disk by itself (`safe_open(...).get_slice`)
  inside `jax.make_array_from_callback`: no process reads rows it does not own.
* `merged_model_weights`: yields (key, array) for every tensor of the model:
  base + merged update for the adapted modules (the update `b @ a` computed on
  the device in float32 from the factors, transposed for fan_in_fan_out, cast
  back to the base dtype), merged modules_to_save tensors, every other tensor
  as stored.
* `save_merged_model` / `MergedModelWriter`: the full merged model as HF
  safetensors shards + index that `transformers` loads. The unchanged tensors
  are copied file to file on a background thread (with `MergedModelWriter`,
  while the merge itself still runs), the merged ones written into their
  slots (`safetensors_slots.ShardWriter`).

The Orbax form of the full model is in `knots_jax.export.orbax_model`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import threading
from typing import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from knots_jax.io import hf_checkpoint, output_dir, safetensors_slots

from knots_jax.io import sharded_read
from knots_jax.merging.result import KNOTS_CONFIG, MergeResult
from knots_jax.parallel import sharding

COPIED_FILES = ("config.json", "generation_config.json")
_METADATA = {"format": "pt"}   # transformers refuses safetensors files without it


# ------------------------------------------------------------------- reading


# ------------------------------------------------------------------- merging


def adapted_keys(result: MergeResult) -> set[str]:
  """The base tensors a merge changes: `<module>.weight` of every merged module."""
  return {f"{m}.weight" for m in result.module_names}


def _module_updates(result: MergeResult) -> dict[str, tuple]:
  """{"<module>.weight": ("factors", b, a) | ("dense", delta)} (per-module views)."""
  updates = {}
  for stack in result.stacks:
    for i, module in enumerate(stack.modules):
      key = f"{module}.weight"
      if stack.is_factored:
        updates[key] = ("factors", stack, i)
      else:
        updates[key] = ("dense", stack, i)
  return updates


def check_fits(result: MergeResult, model_dir: str, base_keys, *, extra: bool = True) -> None:
  """Raises ValueError unless the base has a tensor for every merged module and (with
  `extra`) every merged modules_to_save tensor: none is dropped silently from a full model."""
  missing = [k for k in _module_updates(result) if k not in base_keys]
  if missing:
    raise ValueError(f"base model `{model_dir}` has no tensor {missing[0]!r} for the merged "
                     f"module (and {len(missing) - 1} more): is it the adapters' base model?")
  absent = sorted(k for k in result.extra if k not in base_keys) if extra else []
  if absent:
    raise ValueError(
        f"base model `{model_dir}` has no tensor {absent[0]!r} (and {len(absent) - 1} more) for "
        "the merged modules_to_save tensors: the adapters replace a layer the base lacks (e.g. "
        "a `score` head on a causal-LM checkpoint). Use a base with that layer, or "
        "modules_to_save='drop' to leave them out of the full model")


def _on(mesh: Mesh | None, x) -> jax.Array:
  """A small host or device array, replicated on `mesh` (as is without a mesh)."""
  if mesh is None:
    return jnp.asarray(x)
  return sharding.place_replicated(sharding.to_host(x), mesh)


def base_plus_update(base, delta, transpose: bool):
  """base + delta in the base's layout (delta transposed for Conv1D / fan_in_fan_out) and
  dtype, added in float32 or the update's wider dtype: the one base + update of the package
  (`merged_model_weights` on the device, `merged_weights.save_merged_weights` on the host)."""
  work = jnp.result_type(jnp.float32, delta.dtype)
  delta = delta.astype(work)
  if transpose:
    delta = delta.T
  return (base.astype(work) + delta).astype(base.dtype)


def _add_factors(base, b, a, transpose: bool):
  return base_plus_update(base, jnp.matmul(b.astype(jnp.float32), a.astype(jnp.float32)),
                          transpose)


def _add_dense(base, delta, transpose: bool):
  return base_plus_update(base, delta, transpose)


@functools.lru_cache(maxsize=64)
def _jitted(fn, out_sharding):
  return jax.jit(fn, static_argnums=(-1,), out_shardings=out_sharding)


def merged_model_weights(result: MergeResult, model_dir: str, mesh: Mesh | None = None,
                         keys: Iterable[str] | None = None) -> Iterator[tuple[str, jax.Array]]:
  """Yields (key, array) of every tensor of the merged model (or of `keys`), one at a time.

  Adapted modules (`<module>.weight`): base + merged update, computed on the
  device in float32 and cast back to the base dtype; with a mesh the result has
  the base weight's sharding (rows over the mesh). The update is `b @ a` from
  the factors of a factored merge, or the dense update of TIES / DARE,
  transposed to [in, out] when the adapters are fan_in_fan_out. modules_to_save
  tensors of the merge (`result.extra`) replace the base ones, cast to the base
  dtype; those the base lacks (a classification head on a causal-LM base) are not
  yielded: chain `result.extra.items()` for them. Every other tensor is yielded as
  stored. Only one tensor is read at a time.
  """
  header = hf_checkpoint.header(model_dir, keys)
  updates = _module_updates(result)
  check_fits(result, model_dir, hf_checkpoint.tensor_files(model_dir), extra=False)
  transpose = result.fan_in_fan_out
  for key, (path, shape, stored) in header.items():
    base = sharded_read.read_one(path, key, shape, stored, mesh, None)
    out_sharding = None if mesh is None else sharding.weight_sharding(mesh, shape)
    if key in updates:
      kind, stack, i = updates[key]
      if kind == "factors":
        b, a = _on(mesh, stack.b[i]), _on(mesh, stack.a[i])
        upd_shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        args = (b, a)
        fn = _add_factors
      else:
        d = _on(mesh, stack.delta[i])
        upd_shape = d.shape[::-1] if transpose else d.shape
        args = (d,)
        fn = _add_dense
      if tuple(upd_shape) != tuple(shape):
        layout = " (fan_in_fan_out: transposed to [in, out])" if transpose else ""
        raise ValueError(f"`{key}`: the base weight has shape {shape} but the merged update "
                         f"has shape {tuple(upd_shape)}{layout}")
      yield key, _jitted(fn, out_sharding)(base, *args, transpose)
    elif key in result.extra:
      value = np.asarray(result.extra[key])
      if value.shape != shape:
        raise ValueError(f"modules_to_save tensor `{key}`: the base has shape {shape} but the "
                         f"merged tensor has shape {value.shape}")
      value = value.astype(stored)
      if mesh is None:
        yield key, jnp.asarray(value)
      else:
        yield key, jax.make_array_from_callback(shape, out_sharding, lambda idx, v=value: v[idx])
    else:
      yield key, base


# ------------------------------------------------------------------- writing


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes of `2GB` (10^9, as transformers), `500MiB` (2^20) or an int."""
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    value = int(size)
  else:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
      raise ValueError(f"max_shard_size: cannot read {size!r} (e.g. 2GB, 500MB, 1GiB or bytes)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if value < 1:
    raise ValueError(f"max_shard_size must be positive; got {size!r}")
  return value


def plan_shards(header: Mapping[str, tuple], max_bytes: int) -> list[list[str]]:
  """Keys grouped greedily, in checkpoint order, into shards of at most `max_bytes`.

  A tensor larger than `max_bytes` gets a shard of its own (as in transformers).
  """
  shards: list[list[str]] = []
  size = 0
  for key, (_, shape, dtype) in header.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if not shards or size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  return [s for s in shards if s]


def copy_model_files(model_dir: str, out_dir: str) -> None:
  """Copies the base's config.json and generation_config.json (when present) to `out_dir`."""
  for name in COPIED_FILES:
    src = os.path.join(model_dir, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out_dir, name))


def changed_keys(adapters) -> set[str]:
  """The base tensors a merge of `adapters` (an `AdapterSet`) replaces, known before merging:
  `<module>.weight` of every adapted module and the modules_to_save tensors."""
  keys = {f"{m}.weight" for m in adapters.module_names}
  for adapter in adapters.adapters:
    keys.update(adapter.extra)
  return keys


_END = object()


def _one_ahead(items: Iterator):
  """The items of `items`, each handed out after the next one was asked for: the
  device computes the next merged tensor while the host writes this one."""
  current = next(items, _END)
  while current is not _END:
    following = next(items, _END)
    yield current
    current = following


class MergedModelWriter:
  """The full merged model as a HF safetensors checkpoint, begun before the merge is done.

  Opening it plans the shards and creates the files (headers first,
  `safetensors_slots.ShardWriter`) in a temporary directory. The base tensors
  outside `changed` (those the merge will replace: `changed_keys(adapters)`)
  are copied file to file on a background thread: most of a model's bytes
  (embeddings, MLPs, norms, the LM head). With `overlap` the copy starts at
  once and runs beside the merge; otherwise it starts in `finish`. `finish(result)`
  computes and writes the merged tensors one at a time (beside the copy), waits
  for the copy and moves the directory into place (`output_dir.atomic_output_dir`).
  Leaving the `with` block without `finish`, or with an error, stops the copy
  and leaves no `out_dir`.

      with backbone.MergedModelWriter("llama/", "merged/",
                                      changed=backbone.changed_keys(adapters)) as writer:
        result = knots_jax.merge(adapters, "knots_ties", top_k=30)
        report = writer.finish(result)

  `overlap` defaults to True when JAX's default backend is an accelerator (the
  merge runs there, the copy on the host) and False on the CPU backend, where
  the copy takes cores from XLA's compute threads: on the 2-core test host
  single runs saw the merge slowed 1.2-1.6x by the copy, and over 3 runs the
  whole job was no faster (docs/performance.md).

  `changed` is a hint: a tensor the result does not change after all is
  copied in `finish`, and one it changes that was not announced is written
  over its copy (after the copy thread is done). On several processes every
  process opens the writer and calls `finish` (the merged tensors are computed
  on the global mesh); only process 0 writes, and only it copies.
  """

  def __init__(self, model_dir: str, out_dir: str, *, changed: Iterable[str] = (),
               overlap: bool | None = None, max_shard_size: int | str = "2GB",
               overwrite: bool = False, mesh: Mesh | None = None, progress: bool = False):
    max_bytes = parse_size(max_shard_size)
    output_dir.check_output_dir(out_dir, overwrite)
    self._model_dir, self._out_dir, self._mesh = model_dir, out_dir, mesh
    self._header = hf_checkpoint.header(model_dir)
    self._plan = plan_shards(self._header, max_bytes)
    n = len(self._plan)
    self._names = (["model.safetensors"] if n == 1 else
                   [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self._hint = set(changed) & set(self._header)
    self._writes = jax.process_index() == 0
    self._shards: dict[str, safetensors_slots.ShardWriter] = {}
    self._offsets: dict[str, dict] = {}
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = None
    self._finished = self._aborted = False
    self._lock = threading.Lock()
    self._exit = contextlib.ExitStack()
    if overlap is None:
      overlap = jax.default_backend() != "cpu"
    try:
      # Counted in bytes, not tensors: tensors differ in size by orders of magnitude
      # (norms vs embeddings), so a count of tensors gives a meaningless rate and ETA.
      self._bar = self._exit.enter_context(sharding.progress_bar(
          desc="write model", total=sum(self._nbytes(k) for k in self._header), unit="B",
          unit_scale=True, disable=not progress))
      if self._writes:
        self._tmp = self._exit.enter_context(output_dir.atomic_output_dir(out_dir, overwrite))
        for name, keys in zip(self._names, self._plan):
          writer = safetensors_slots.ShardWriter(
              os.path.join(self._tmp, name),
              [(k, self._header[k][1], self._header[k][2]) for k in keys], _METADATA)
          self._exit.callback(writer.close, check=False)
          self._shards.update({k: writer for k in keys})
        if overlap:
          self._start_copy()
    except BaseException as e:
      self._abort(e)
      raise

  def _start_copy(self) -> None:
    """The copy of every tensor outside the hint, on a background thread."""
    todo = [k for k in self._header if k not in self._hint]
    self._thread = threading.Thread(target=self._copy_all, args=(todo,), daemon=True,
                                    name="knots-jax copy unchanged tensors")
    self._thread.start()

  def _nbytes(self, key: str) -> int:
    _, shape, dtype = self._header[key]
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

  def _tick(self, key: str) -> None:
    with self._lock:
      self._bar.update(self._nbytes(key))

  def _copy(self, key: str) -> None:
    """Tensor `key` of the base, copied byte for byte into its slot."""
    path = self._header[key][0]
    if path not in self._offsets:
      self._offsets[path] = safetensors_slots.data_offsets(path)
    self._shards[key].copy_from(key, path, *self._offsets[path][key], stop=self._stop)
    self._tick(key)

  def _copy_all(self, keys: list[str]) -> None:
    try:
      for key in keys:
        if self._stop.is_set():
          return
        self._copy(key)
    except BaseException as e:   # reported by finish()
      self._error = e

  def _join(self) -> None:
    if self._thread is not None:
      self._thread.join()
    if self._error is not None:
      raise self._error

  def _abort(self, error: BaseException) -> None:
    if self._aborted:
      return
    self._aborted = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._exit.__exit__(type(error), error, error.__traceback__)

  def finish(self, result: MergeResult) -> dict:
    """Writes the merged tensors of `result`, completes the files and puts `out_dir` in place.

    Returns {"path", "shards", "tensors", "merged" (adapted tensors), "total_size"}.
    """
    if self._finished or self._aborted:
      raise RuntimeError("MergedModelWriter.finish was already called")
    try:
      return self._finish(result)
    except BaseException as e:
      self._abort(e)
      raise

  def _finish(self, result: MergeResult) -> dict:
    if not result.stacks:
      raise ValueError("the merge result has no modules; nothing to write")
    check_fits(result, self._model_dir, self._header)
    updates = _module_updates(result)
    changed = [k for k in self._header if k in updates or k in result.extra]
    if self._writes and self._thread is None:
      self._start_copy()
    if self._writes and any(k not in self._hint for k in changed):
      self._join()   # those were being copied: overwrite them only after the copy
    if not self._writes:   # other processes only compute the changed tensors
      self._bar.reset(total=sum(self._nbytes(k) for k in changed))
    computed = merged_model_weights(result, self._model_dir, self._mesh, keys=changed)
    for key, value in _one_ahead(computed):
      host = sharding.to_host(value)
      del value
      if self._writes:
        self._shards[key].write(key, host)
      if key in self._hint or not self._writes:   # else the copy thread counted it
        self._tick(key)
      del host
    total = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                for _, shape, dtype in self._header.values())
    n = len(self._plan)
    if self._writes:
      for key in self._header:
        if key in self._hint and key not in changed:   # announced, left alone: as stored
          self._copy(key)
      self._join()
      for writer in dict.fromkeys(self._shards.values()):
        writer.close()
      if n > 1:
        weight_map = {k: name for name, keys in zip(self._names, self._plan) for k in keys}
        output_dir.write_json(os.path.join(self._tmp, hf_checkpoint.INDEX),
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
      copy_model_files(self._model_dir, self._tmp)
      output_dir.write_json(os.path.join(self._tmp, KNOTS_CONFIG), result.record(merged_model={
          "base_model": os.path.abspath(self._model_dir), "format": "safetensors", "shards": n,
          "tensors": len(self._header), "total_size": total}))
    self._finished = True
    self._exit.close()   # closes the bar and moves the directory into place
    return {"path": os.path.abspath(self._out_dir), "shards": n, "tensors": len(self._header),
            "merged": sum(k in updates for k in self._header), "total_size": total}

  def __enter__(self) -> "MergedModelWriter":
    return self

  def __exit__(self, kind, value, traceback):
    if self._finished:
      return False
    if value is None:
      value = RuntimeError("MergedModelWriter: the block ended without finish(result); "
                           f"nothing was written to `{self._out_dir}`")
      self._abort(value)
      raise value
    self._abort(value)
    return False


def save_merged_model(result: MergeResult, model_dir: str, out_dir: str, *,
                      max_shard_size: int | str = "2GB", overwrite: bool = False,
                      mesh: Mesh | None = None, progress: bool = False) -> dict:
  """Writes the full merged model (base + merge) as a HF safetensors checkpoint.

  Same key names and dtypes as the base; `config.json` and
  `generation_config.json` are copied, and `knots_config.json` says how the
  model was made. One shard: `model.safetensors`; more:
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
  Tensors the merge does not change are copied byte for byte from the base
  files on a background thread while the changed ones are computed one at a
  time, brought to the host and written into their slots, so the host holds
  about one tensor at a time, not a shard (`MergedModelWriter`). Written
  atomically: a failure leaves no `out_dir`.

  To start the copy before the merge is done, use `MergedModelWriter` directly.
  On several processes, every process must call this; only process 0 writes.
  `progress` shows a bar over the tensors (per host on several processes).

  Returns {"path", "shards", "tensors", "merged" (adapted tensors), "total_size"}.
  """
  if not result.stacks:
    raise ValueError("the merge result has no modules; nothing to write")
  changed = set(_module_updates(result)) | set(result.extra)
  with MergedModelWriter(model_dir, out_dir, changed=changed, max_shard_size=max_shard_size,
                         overwrite=overwrite, mesh=mesh, progress=progress) as writer:
    return writer.finish(result)


__all__ = ["merged_model_weights", "save_merged_model", "MergedModelWriter", "changed_keys",
           "parse_size", "plan_shards", "copy_model_files", "adapted_keys"]
