"""The full merged model as an Orbax checkpoint, and back onto a mesh.

`save_merged_model_orbax` writes base + merge (the tensors of
`full_model.merged_model_weights`) as an Orbax `CheckpointManager` directory:

  <out_dir>/config.json             the base model's HF config (and
  <out_dir>/generation_config.json  generation config), copied
  <out_dir>/knots_config.json       how the model was made (method, settings, base)
  <out_dir>/<step>/weights/         Orbax StandardSave of {HF tensor name: array}

The item `weights` is a flat dict keyed by the Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, ...), dtypes as in the base (bf16
stays bf16): the names map one to one onto a `transformers` state dict, and a
flat dict needs no knowledge of the module tree to restore. Any Orbax user
can read it without knots_jax:

  >>> mngr = ocp.CheckpointManager(out_dir, item_handlers={"weights": ocp.StandardCheckpointHandler()})
  >>> meta = mngr.item_metadata(mngr.latest_step())["weights"]      # shapes, dtypes
  >>> target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=...) for k, m in meta.items()}
  >>> weights = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
  ...     weights=ocp.args.StandardRestore(target)))["weights"]

`restore_merged_model` does exactly that, with the shardings of
`sharded_read.read_backbone` (rows over the mesh when they divide its size, else
replicated): every process reads only the blocks of its own devices.

The merged weights are computed on the devices tensor by tensor (the base
tensor is dropped once its merged value exists), then handed to Orbax in one
asynchronous save: the whole merged model is on the devices of the mesh at
that point (as with `read_backbone`), and Orbax copies it to the host before
writing. The directory is written atomically: Orbax's own step directory is
temporary until committed, and the whole `out_dir` is built under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from knots_jax.export import full_model
from knots_jax.io import hf_checkpoint, output_dir
from knots_jax.merging.result import KNOTS_CONFIG, MergeResult
from knots_jax.parallel import sharding as sharding_lib

ITEM = "weights"   # the one item of every step: {HF name: array}


class NotAMergedModelCheckpoint(ValueError):
  """The directory is not an Orbax checkpoint written by `save_merged_model_orbax`."""


def _manager(directory: str, async_write: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (which must exist) with the `weights` item.

  create=False rather than read_only=True for restoring: the same reads,
  without Orbax's warnings about read-only managers.
  """
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=async_write)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={ITEM: ocp.StandardCheckpointHandler()})


def save_merged_model_orbax(result: MergeResult, model_dir: str, out_dir: str, *,
                            mesh: Mesh | None = None, step: int = 0, overwrite: bool = False,
                            async_write: bool = True, progress: bool = False) -> dict:
  """Writes the full merged model (base + merge) as an Orbax CheckpointManager directory.

  Args:
    result: a `knots_jax.merge` result.
    model_dir: the HF safetensors base model (`sharded_read.read_backbone` reads it).
    out_dir: the checkpoint directory (see the module docstring for its layout).
    mesh: compute and save sharded over this mesh (rows over `stack` when they
      divide its size); needed on several processes, where every process must
      call this and writes its own shards into `out_dir` (a shared file system).
    step: the step number of the checkpoint (a sub-directory `<step>/`).
    overwrite: replace an existing `out_dir` (only once the new one is complete).
    async_write: Orbax's asynchronous save (the host files are written in the
      background while the configs are copied); False writes synchronously.
    progress: a progress bar over the merged tensors computed, in bytes (per host).

  Returns {"path", "step", "tensors", "merged", "total_size"}. A write that fails
  on a full, read-only or otherwise failing disk raises one OSError naming
  `out_dir` and the OS error (`output_dir.atomic_output_dir`); Orbax's logs of
  that failure are not shown (`output_dir.quiet_async_failures`), and nothing
  is left of `out_dir`.
  """
  if not result.stacks:
    raise ValueError("the merge result has no modules; nothing to write")
  if jax.process_count() > 1 and mesh is None:
    raise ValueError("save_merged_model_orbax on several processes needs the global mesh "
                     "(mesh=sharding.make_mesh())")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  output_dir.check_output_dir(out_dir, overwrite)
  full_model.check_fits(result, model_dir, hf_checkpoint.tensor_files(model_dir))
  weights = {}
  # One bar for the model, counted in bytes as full_model's "write model" is: tensors
  # differ in size by orders of magnitude. Orbax's own write (the disk part) reports
  # no progress, so the bar ends when the merged model is on the devices.
  nbytes = {k: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            for k, (_, shape, dtype) in hf_checkpoint.header(model_dir).items()}
  with sharding_lib.progress_bar(desc="merge model", total=sum(nbytes.values()), unit="B",
                                 unit_scale=True, disable=not progress) as bar:
    for key, value in full_model.merged_model_weights(result, model_dir, mesh):
      weights[key] = value
      bar.update(nbytes.get(key, int(value.size) * value.dtype.itemsize))
  merged = full_model.adapted_keys(result)
  total = sum(int(v.size) * v.dtype.itemsize for v in weights.values())
  report = {"path": os.path.abspath(out_dir), "step": int(step), "tensors": len(weights),
            "merged": len(merged & set(weights)), "total_size": total}
  with output_dir.shared_atomic_output_dir(out_dir, overwrite) as tmp, \
       output_dir.quiet_async_failures(tmp):   # a failed write: one OSError, no log storm
    with _manager(tmp, async_write) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(weights)}))
      if jax.process_index() == 0:   # while Orbax writes in the background
        full_model.copy_model_files(model_dir, tmp)
        output_dir.write_json(os.path.join(tmp, KNOTS_CONFIG), result.record(merged_model={
            "base_model": os.path.abspath(model_dir), "format": "orbax", "item": ITEM,
            "step": int(step), "tensors": len(weights), "total_size": total}))
      mngr.wait_until_finished()
  return report


def checkpoint_steps(ckpt_dir: str) -> list[int]:
  """The steps saved in an Orbax merged-model directory (ascending)."""
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"merged model checkpoint `{ckpt_dir}` does not exist")
  with _manager(ckpt_dir) as mngr:
    return sorted(mngr.all_steps())


def _target(shape, dtype, mesh: Mesh | None) -> jax.ShapeDtypeStruct:
  """What Orbax restores one tensor into: read_backbone's placement, or the first local device."""
  placement = (SingleDeviceSharding(jax.local_devices()[0]) if mesh is None
               else sharding_lib.weight_sharding(mesh, tuple(shape)))
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=placement)


def restore_merged_model(ckpt_dir: str, mesh: Mesh | None = None, step: int | None = None, *,
                         dtype=None) -> dict[str, jax.Array]:
  """{HF tensor name: jax.Array} of a checkpoint written by `save_merged_model_orbax`.

  Args:
    ckpt_dir: the directory given to `save_merged_model_orbax`.
    mesh: restore onto this mesh with `sharding.weight_sharding` (rows over the
      mesh when they divide its size, else replicated); each process reads
      only its own devices' blocks. None: everything on the first local device.
    step: the step to restore (default: the latest).
    dtype: cast to this dtype while reading (default: the saved dtypes).

  Raises `NotAMergedModelCheckpoint` (a ValueError) for a directory without
  such a checkpoint, and ValueError for a step that is not there.
  """
  ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
  steps = checkpoint_steps(ckpt_dir)
  if not steps:
    raise NotAMergedModelCheckpoint(
        f"`{ckpt_dir}` holds no Orbax checkpoint step (written by "
        "knots_jax.export.orbax_model.save_merged_model_orbax?)")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"`{ckpt_dir}` has no step {step}; steps: {steps}")
  if not os.path.isdir(os.path.join(ckpt_dir, str(step), ITEM)):
    raise NotAMergedModelCheckpoint(
        f"`{ckpt_dir}` step {step} has no item `{ITEM}`: not a merged model written by "
        "knots_jax.export.orbax_model.save_merged_model_orbax")
  with _manager(ckpt_dir) as mngr:
    meta = mngr.item_metadata(step)[ITEM]
    if meta is None:
      raise NotAMergedModelCheckpoint(f"`{ckpt_dir}` step {step}: cannot read `{ITEM}` metadata")
    target = {key: _target(m.shape, m.dtype if dtype is None else np.dtype(dtype), mesh)
              for key, m in dict(meta.tree if hasattr(meta, "tree") else meta).items()}
    restored = mngr.restore(step, args=ocp.args.Composite(
        **{ITEM: ocp.args.StandardRestore(target)}))
  return dict(restored[ITEM])


__all__ = ["save_merged_model_orbax", "restore_merged_model", "checkpoint_steps",
           "NotAMergedModelCheckpoint", "ITEM"]
