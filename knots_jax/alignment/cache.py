"""Save the KnOTS decomposition once, restore it for later merges and sweeps.

The reference implementation calls the saved decomposition its "ingredients".
An `Alignment` (from `decompose.align`) is written with Orbax as one composite
checkpoint directory:

  <directory>/arrays/   Orbax StandardSave of the arrays, per stack:
                        aligned: u, s, rep, valid;  factors: b, a, ranks;
                        plus the adapters' non-LoRA tensors (modules_to_save)
  <directory>/meta/     Orbax JsonSave: format tag and version, settings
                        (path, concat, tol, dtype), align seconds, the modules
                        and `transposed` of every stack, and per adapter its
                        path, name and adapter_config (PEFT config)

The whole directory is written atomically (`output_dir.atomic_output_dir`):
Orbax writes its checkpoint inside a temporary sibling `<directory>.tmp-…`,
which is renamed to `<directory>` only once complete. A save that fails (a
full or read-only disk: one OSError naming the directory and the OS error) or
is killed leaves no `<directory>`, so a later run never reads a half cache; the
next save to it removes a killed run's leftovers.

The factors themselves are stored (scale folded into `b`, as in `FactorStack`),
so a restore needs no adapter files: the `AdapterSet` is rebuilt from them
(`LoraFactors(a, b, scale=1.0)` of each module's true rank; the task update
`b @ a` is the same as the original `scale * b @ a`). Names, paths and configs
are the original ones.

Arrays are saved at their true stack length (the padding of a sharded
`Alignment` is cut off), so one checkpoint restores on any mesh: with
`mesh=`, every stack is placed with `sharding.place_stack` (zero-padded to a
multiple of the mesh size, `valid` padded with False), exactly as
`align(mesh=...)` lays it out.

  >>> alignment = knots_jax.align(adapters)
  >>> save_alignment(alignment, "ingredients/")
  >>> restored = restore_alignment("ingredients/")          # later, another process
  >>> for top_k in (10, 20, 30):
  ...   result = knots_jax.merge(restored, "knots_ties", top_k=top_k)

Saving gathers every array to the host of each process (`sharding.to_host`);
with several processes call it on every process with the same directory (on a
file system they all see): Orbax lets the primary process write. Restoring onto
a mesh reads each aligned stack straight into its sharded, padded layout, so a
process reads only its own devices' rows; the factors (needed to rebuild the
adapters) are read whole by every process.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from knots_jax.adapters.peft_files import Adapter, AdapterSet, LoraFactors
from knots_jax.adapters.stacks import FactorStack
from knots_jax.alignment import knots_svd
from knots_jax.alignment.decompose import Alignment
from knots_jax.io import output_dir
from knots_jax.parallel import sharding

FORMAT = "knots_jax.alignment"
VERSION = 1
_INNER = "checkpoint"   # where save_alignment has Orbax write, inside the temporary directory


class NotAnAlignmentCheckpoint(ValueError):
  """The directory is not a checkpoint written by `save_alignment`."""


def _host(x, length: int) -> np.ndarray:
  return np.asarray(sharding.to_host(x))[:length]


def save_alignment(alignment: Alignment, directory: str, *, overwrite: bool = False) -> str:
  """Writes `alignment` (from `align`) to `directory` with Orbax; returns its absolute path.

  Raises ValueError for an alignment without decomposition (`factor_alignment`),
  or if `directory` exists and not `overwrite`; `overwrite` replaces only a
  directory knots_jax wrote (`output_dir.atomic_output_dir`: an alignment
  saved by a version before manifests is refused; delete it by hand). The
  directory appears only once complete; an OS failure (full disk, read-only
  parent) is one OSError naming it and the OS error, and leaves nothing.
  """
  if not alignment.aligned:
    raise ValueError("the alignment has no decomposition (from factor_alignment?); "
                     "save the result of knots_jax.align")
  directory = os.path.abspath(os.fspath(directory))
  if os.path.lexists(directory) and not overwrite:
    raise ValueError(f"`{directory}` already exists; pass overwrite=True to replace it")
  aligned, factors = [], []
  for s in alignment.aligned:
    L = len(s.modules)
    aligned.append({"u": _host(s.u, L), "s": _host(s.s, L), "rep": _host(s.rep, L),
                    "valid": _host(s.valid, L)})
  for f in alignment.factors:
    factors.append({"b": np.asarray(f.b), "a": np.asarray(f.a), "ranks": np.asarray(f.ranks)})
  ads = alignment.adapters.adapters
  extra_keys = [sorted(ad.extra) for ad in ads]
  arrays = {"aligned": aligned, "factors": factors,
            "extra": [[np.asarray(ad.extra[k]) for k in keys] for ad, keys in zip(ads, extra_keys)]}
  meta = {
      "format": FORMAT, "version": VERSION,
      "settings": output_dir.to_jsonable(dict(alignment.settings)),
      "seconds": float(alignment.seconds),
      "aligned": [{"modules": list(s.modules), "transposed": bool(s.transposed)}
                  for s in alignment.aligned],
      "factors": [{"modules": list(f.modules)} for f in alignment.factors],
      "adapters": [{"path": ad.path, "name": ad.name, "config": output_dir.to_jsonable(dict(ad.config)),
                    "extra": keys} for ad, keys in zip(ads, extra_keys)],
      "digest": content_digest(alignment.adapters),
  }
  with output_dir.shared_atomic_output_dir(directory, overwrite) as tmp, \
       output_dir.quiet_async_failures(tmp):   # a failed write: one OSError, no log storm
    # Orbax writes `<dir>.orbax-checkpoint-tmp` beside the directory it is given and
    # renames it: given a directory inside `tmp`, all of it stays inside `tmp`.
    inner = os.path.join(tmp, _INNER)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(inner, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                          meta=ocp.args.JsonSave(meta)))
    if jax.process_index() == 0:   # the checkpoint's entries up into `tmp`: the cache's layout
      for entry in os.listdir(inner):
        os.rename(os.path.join(inner, entry), os.path.join(tmp, entry))
      os.rmdir(inner)
  return directory


def content_digest(adapters: AdapterSet) -> str:
  """SHA-256 of what the alignment is computed from: every adapter's name, modules, factors
  and scales, and its non-LoRA tensors. Two adapter sets with the same digest align alike."""
  h = hashlib.sha256()
  for ad in adapters.adapters:
    h.update(f"adapter {ad.name}\n".encode())
    for module in sorted(ad.modules):
      f = ad.modules[module]
      h.update(f"{module} {f.a.shape} {f.b.shape} {float(f.scale)!r}\n".encode())
      h.update(np.ascontiguousarray(f.a, np.float32).tobytes())
      h.update(np.ascontiguousarray(f.b, np.float32).tobytes())
    for key in sorted(ad.extra):
      h.update(f"extra {key} {np.shape(ad.extra[key])}\n".encode())
      h.update(np.ascontiguousarray(ad.extra[key]).tobytes())
  return h.hexdigest()


def stale_reason(directory: str, adapters: AdapterSet, settings: dict) -> str | None:
  """Why the cache in `directory` cannot serve these adapters and settings (None: it can).

  The cache is keyed on the content of the adapters (`content_digest`), not their
  paths: a file replaced at the same path makes it stale. Raises
  NotAnAlignmentCheckpoint if `directory` is not an alignment cache at all.
  """
  meta = read_meta(directory)
  if meta.get("digest") != content_digest(adapters):
    return "the adapters' contents differ from those it was computed from"
  wanted = {k: float(v) if k == "tol" else v for k, v in settings.items()}
  saved = {k: meta["settings"].get(k) for k in wanted}
  if saved.get("path") == "core":
    saved["path"] = "factors"   # the old name of the path
  if saved != wanted:
    return f"it was computed with {saved}, this run asks for {wanted}"
  return None


def read_meta(directory: str) -> dict:
  """The JSON part of a checkpoint (settings, adapters, modules); cheap, no arrays."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(os.path.join(directory, "meta")) or not os.path.isdir(
      os.path.join(directory, "arrays")):
    raise NotAnAlignmentCheckpoint(
        f"`{directory}` is not a knots_jax alignment checkpoint (written by "
        "knots_jax.alignment.cache.save_alignment): it has no meta/ and arrays/")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      meta = ckpt.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - any Orbax failure means: not our checkpoint
    raise NotAnAlignmentCheckpoint(
        f"`{directory}` is not a knots_jax alignment checkpoint: {type(e).__name__}: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise NotAnAlignmentCheckpoint(
        f"`{directory}` is an Orbax checkpoint but not a knots_jax alignment "
        f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
  if meta.get("version") != VERSION:
    raise NotAnAlignmentCheckpoint(
        f"`{directory}`: alignment checkpoint version {meta.get('version')}, "
        f"this knots_jax reads version {VERSION}")
  return meta


def _rebuild_adapters(meta: dict, factors: list[FactorStack], extra) -> AdapterSet:
  adapters = []
  for i, info in enumerate(meta["adapters"]):
    modules = {}
    for f in factors:
      for l, module in enumerate(f.modules):
        r = int(f.ranks[l, i])
        modules[module] = LoraFactors(a=f.a[l, i, :r, :], b=f.b[l, i, :, :r], scale=1.0)
    adapters.append(Adapter(info["path"], info["name"], info["config"], modules,
                            dict(zip(info["extra"], extra[i]))))
  return AdapterSet(tuple(adapters))


def _handler() -> ocp.CompositeCheckpointHandler:
  """The checkpoint's two items, each with its handler."""
  return ocp.CompositeCheckpointHandler(arrays=ocp.StandardCheckpointHandler(),
                                        meta=ocp.JsonCheckpointHandler())


def _restore_targets(directory: str, mesh: jax.sharding.Mesh | None):
  """Orbax restore targets: aligned stacks sharded over `mesh` (padded), the rest on the host.

  With a mesh, each aligned array is read straight into its padded, sharded
  global shape (`strict=False` lets Orbax zero-fill the padding rows, which
  equals `place_stack`'s fill: zeros, and False for `valid`), so every
  process reads only the rows of its own devices. The factors and non-LoRA
  tensors are read whole on every process (the adapters are rebuilt from them).
  """
  with ocp.Checkpointer(_handler()) as ckpt:
    tree = ckpt.metadata(directory).item_metadata["arrays"]
  tree = tree.tree if hasattr(tree, "tree") else tree
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")

  def host(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)   # restored as np.ndarray

  def stack(m):
    shape = (sharding.padded_length(m.shape[0], mesh),) + tuple(m.shape[1:])
    return jax.ShapeDtypeStruct(shape, m.dtype, sharding=sharding.stack_sharding(mesh, shape))

  targets = jax.tree.map(host, dict(tree), is_leaf=is_leaf)
  if mesh is not None:
    targets["aligned"] = jax.tree.map(stack, tree["aligned"], is_leaf=is_leaf)
  return targets


def restore_alignment(directory: str, mesh: jax.sharding.Mesh | None = None) -> Alignment:
  """The `Alignment` saved in `directory`, for `knots_jax.merge`.

  With `mesh` (from `sharding.make_mesh()`), every aligned stack is restored
  sharded over it, padded to a multiple of the mesh size, as `align(mesh=...)`
  lays it out; on several processes each process reads only its own devices'
  rows (every process must call this with the same global mesh). Raises
  `NotAnAlignmentCheckpoint` (a ValueError) for any other directory.
  """
  meta = read_meta(directory)
  directory = os.path.abspath(os.fspath(directory))
  targets = _restore_targets(directory, mesh)
  with ocp.Checkpointer(_handler()) as ckpt:   # both items named: Orbax warns otherwise
    arrays = ckpt.restore(directory, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(targets, strict=False),
        meta=ocp.args.JsonRestore()))["arrays"]
  factors = [FactorStack(tuple(m["modules"]), np.asarray(x["b"]), np.asarray(x["a"]),
                         np.asarray(x["ranks"]).astype(np.int32))
             for m, x in zip(meta["factors"], arrays["factors"])]
  aligned = []
  for m, x in zip(meta["aligned"], arrays["aligned"]):
    u, s, rep, valid = (jax.numpy.asarray(x[k]) for k in ("u", "s", "rep", "valid"))
    aligned.append(knots_svd.AlignedStack(tuple(m["modules"]), u, s, rep, valid,
                                          transposed=m["transposed"]))
  extra = [[np.asarray(v) for v in tensors] for tensors in arrays.get("extra") or []]
  extra = extra or [[] for _ in meta["adapters"]]
  adapters = _rebuild_adapters(meta, factors, extra)
  return Alignment(adapters, tuple(factors), tuple(aligned), dict(meta["settings"]),
                   seconds=float(meta["seconds"]), mesh=mesh)


__all__ = ["save_alignment", "restore_alignment", "read_meta", "NotAnAlignmentCheckpoint"]
