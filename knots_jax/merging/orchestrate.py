"""`merge`: a method applied in its space, checked, and returned as a `MergeResult`.

`align` computes the joint decomposition once; `merge` applies a method to it
(or to the factors, the core matrices or the dense task updates, as the
method's row of `methods.registry` says). A sweep calls `merge` many times on
one `Alignment`:

  >>> adapters = load_adapters(["a/", "b/", "c/"])
  >>> alignment = align(adapters)
  >>> for top_k in (10, 20, 30):
  ...   result = merge(alignment, "knots_ties", scaling=0.6, top_k=top_k)

The spaces (one function each):
* "knots": the method on every stack's diag(s) V_i^T, then back through U;
* "core": on every module's core matrices M_i, then U_B M V_A^T;
* "full": a function of the LoRA factors, the exact LoRA of task arithmetic and
  averaging, or the method on the dense updates `b @ a` (made lazily).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.adapters.stacks import FactorStack
from knots_jax.alignment import core_space, knots_svd
from knots_jax.alignment.decompose import Alignment, align, compute_dtype, factor_alignment
from knots_jax.merging import kernels
from knots_jax.merging.combine import combine
from knots_jax.merging.lazy import LazyStack
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax.methods.options import MergeConfig
from knots_jax.parallel import programs, sharding


def merge_extra(adapters: AdapterSet, mode: str) -> dict[str, np.ndarray]:
  """Non-LoRA tensors (modules_to_save): `error`, `mean`, `first` or `drop`."""
  keys = sorted(adapters.adapters[0].extra)
  if not keys or mode == "drop":
    return {}
  if mode == "error":
    raise ValueError(
        f"the adapters carry non-LoRA tensors (modules_to_save): {keys[:5]}"
        f"{' ...' if len(keys) > 5 else ''}; choose how to merge them with "
        "modules_to_save='mean' | 'first' | 'drop'")
  if mode == "mean":
    return {k: np.mean([ad.extra[k] for ad in adapters.adapters], axis=0) for k in keys}
  return {k: adapters.adapters[0].extra[k] for k in keys}


# ------------------------------------------------------------------ the spaces


def _aligned_matrices(stack: knots_svd.AlignedStack, config: MergeConfig) -> jax.Array:
  """`knots_tsv_m`: the method on the V_i^T, then diag(s) in front (U diag(s) merged)."""
  v = kernels.unscaled_v(stack.rep, stack.s, stack.valid)
  rank = jnp.sum(stack.valid, axis=-1)
  v = kernels.weighted_matrices(v, config)
  return stack.s[:, :, None] * kernels.MATRIX_KERNELS[config.method](v, rank, config)


def _merge_aligned(alignment: Alignment, config: MergeConfig, mesh):
  """KnOTS: the method on every stack's diag(s) V_i^T (V_i^T for "matrices"
  methods), then back through U."""
  stacks = alignment.aligned
  if config.spec.combine == "matrices":
    merged, info = [_aligned_matrices(s, config) for s in stacks], {}
  else:
    merged, info = combine([s.rep for s in stacks], [s.valid for s in stacks],
                           [s.modules for s in stacks], config)
  out = []
  for s, m in zip(stacks, merged):
    b, a = knots_svd.reconstruct(s, m)
    if mesh is not None:
      b, a = (sharding.unpad(x, len(s.modules), mesh) for x in (b, a))
    out.append(MergedStack(s.modules, b=b, a=a))
  kept = np.concatenate([np.sum(sharding.to_host(s.valid)[:len(s.modules)], axis=-1)
                         for s in stacks])  # padding rows of sharded stacks excluded
  info["kept_components"] = dict(min=int(kept.min()), mean=float(kept.mean()),
                                 max=int(kept.max()))
  _check_kept(alignment, kept)
  return out, info


def _check_kept(alignment: Alignment, kept: np.ndarray) -> None:
  """Refuses an alignment that dropped every component of a module with a non-zero update
  (a `tol` above its singular values): the merge would silently be zero there."""
  modules = [m for s in alignment.aligned for m in s.modules]
  norms = np.concatenate([np.abs(f.b).reshape(len(f.modules), -1).max(axis=1)
                          * np.abs(f.a).reshape(len(f.modules), -1).max(axis=1)
                          for f in alignment.factors])
  lost = [m for m, k, v in zip(modules, kept, norms) if k == 0 and v > 0]
  if lost:
    tol = alignment.settings.get("tol")
    raise ValueError(f"tol={tol} drops every singular component of {len(lost)} module(s) with a "
                     f"non-zero update ({', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}); "
                     "the merge would be zero there. Use a smaller tol (the reference: 1e-5)")


def _merge_core(factors: Sequence[FactorStack], config: MergeConfig, dt):
  """Core Space: the method on every module's core matrices M_i, then U_B M V_A^T.

  Entry-wise methods see each core as [Kb * Ka, 1] values whose valid entries
  (valid row and column) are the only ones counted by TIES' top-K.
  """
  cores = [core_space.project_stack(f.modules, f.b, f.a, dtype=dt) for f in factors]
  if config.spec.combine == "matrices":
    kernel = kernels.MATRIX_KERNELS[config.method]
    merged, info = [kernel(kernels.weighted_matrices(c.cores, config), c.rank, config)
                    for c in cores], {}
  else:
    reps = [c.cores.reshape(c.cores.shape[:2] + (-1, 1)) for c in cores]
    merged, info = combine(reps, [c.entry_valid for c in cores], [c.modules for c in cores],
                           config)
    merged = [m.reshape((m.shape[0],) + c.cores.shape[2:]) for c, m in zip(cores, merged)]
  out = [MergedStack(c.modules, *core_space.reconstruct(c, m)) for c, m in zip(cores, merged)]
  sizes = np.concatenate([core_space.core_sizes(c) for c in cores])
  info["core_size"] = dict(min=int(sizes.min()), max=int(sizes.max()))
  return out, info


def _merge_factors(factors: Sequence[FactorStack], config: MergeConfig, dt):
  """A function of the LoRA factors per stack; it returns factors or a dense update."""
  kernel = kernels.FACTOR_KERNELS[config.method]
  out = []
  for f in factors:
    merged = kernel(jnp.asarray(f.b, dt), jnp.asarray(f.a, dt), config, f.modules)
    out.append(MergedStack(f.modules, *merged) if isinstance(merged, tuple)
               else MergedStack(f.modules, delta=merged))
  return out


def _merge_linear(factors: Sequence[FactorStack], config: MergeConfig, dt):
  """Task arithmetic / averaging of LoRAs is a LoRA: concatenated factors, exactly."""
  out = []
  for f in factors:
    L, n, o, r = f.b.shape
    coef = np.broadcast_to(config.task_scaling(n), (n,)) / (n if config.spec.combine == "mean"
                                                             else 1)
    b = jnp.asarray(np.transpose(f.b, (0, 2, 1, 3)).reshape(L, o, n * r), dt)
    a = jnp.asarray(np.repeat(coef, r)[None, :, None] * np.asarray(f.a).reshape(L, n * r, -1),
                    dt)   # scaled on the host: no program to compile
    out.append(MergedStack(f.modules, b=b, a=a))
  return out


def _merge_dense(factors: Sequence[FactorStack], config: MergeConfig, dt, mesh):
  """The method on the dense task updates b @ a of every stack (no KnOTS).

  Streams: the dense updates [L, n, out, in] (n times the adapted weights) are
  never all held; each stack's are made from its factors when a pass needs
  them (`LazyStack`) and dropped after use.
  """
  def lazy(b, a, matmul):
    return LazyStack(lambda: matmul(b, a))

  if mesh is not None:
    reps = [lazy(sharding.place_stack(f.b, mesh, dt), sharding.place_stack(f.a, mesh, dt),
                 kernels.matmul) for f in factors]
    valids = [sharding.place_stack(np.ones((len(f.modules), f.b.shape[2]), bool), mesh,
                                   fill=False) for f in factors]
  else:
    reps = [lazy(jnp.asarray(f.b, dt), jnp.asarray(f.a, dt), jnp.matmul) for f in factors]
    valids = [jnp.ones((f.b.shape[0], f.b.shape[2]), bool) for f in factors]
  merged, info = combine(reps, valids, [f.modules for f in factors], config)
  if mesh is not None:
    merged = [sharding.unpad(m, len(f.modules), mesh) for f, m in zip(factors, merged)]
  return [MergedStack(f.modules, delta=m) for f, m in zip(factors, merged)], info


def _run_space(alignment: Alignment, config: MergeConfig, dt, mesh):
  """The merged stacks and the space's statistics."""
  spec = config.spec
  if spec.knots:
    out, info = _merge_aligned(alignment, config, mesh)
    info["align_seconds"] = alignment.seconds
    return out, info
  if spec.core:
    return _merge_core(alignment.factors, config, dt)
  if spec.combine == "factors":
    return _merge_factors(alignment.factors, config, dt), {}
  if spec.combine in ("sum", "mean") and not spec.dare:
    return _merge_linear(alignment.factors, config, dt), {}
  return _merge_dense(alignment.factors, config, dt, mesh)


# ---------------------------------------------------------------- the result


def _finite_modules(s: MergedStack) -> np.ndarray:
  """[L] booleans: the module's update is finite. A factored update `b @ a` is never formed:
  its entries are bounded by k max|b| max|a|, which must stay finite in the result's dtype."""
  if s.delta is not None:
    return sharding.to_host(kernels.dense_finite(s.delta))
  return sharding.to_host(kernels.factored_summary(s.b, s.a)[0])


def _check_finite(out: Sequence[MergedStack], method: str) -> None:
  """Refuses a merge with NaN or ±inf anywhere (e.g. products that overflow float32),
  naming the modules, before anything can be written."""
  bad = []
  for s in out:
    bad += [m for m, ok in zip(s.modules, _finite_modules(s)) if not ok]
  if bad:
    raise ValueError(f"`{method}` produced non-finite values (NaN or inf) in {len(bad)} "
                     f"module(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                     "nothing was written. Check the adapters' scales and the options "
                     "(e.g. a smaller scaling, or dtype=float64)")


def _stats(aset: AdapterSet, alignment: Alignment, config: MergeConfig) -> dict:
  stats: dict = {"adapters": aset.names,
                 "ranks": {ad.name: sorted({f.rank for f in ad.modules.values()})
                           for ad in aset.adapters},
                 "modules": sum(len(f.modules) for f in alignment.factors)}
  if aset.adapters[0].extra:
    stats["modules_to_save"] = {"tensors": sorted(aset.adapters[0].extra),
                                "mode": config.modules_to_save}
  return stats


def _resolve(adapters: AdapterSet | Alignment, method: str | None, config: MergeConfig | None,
             options: dict) -> MergeConfig:
  """The merge's config: `config` (or the defaults) with `method` and `options` on top;
  an Alignment's own settings (path, concat, tol, dtype) win."""
  changes = dict(options)
  if method is not None:
    changes["method"] = method
  config = (config or MergeConfig()).replace(**changes)
  if isinstance(adapters, Alignment) and adapters.aligned and config.spec.knots:
    config = config.replace(**adapters.settings)
  return config


def _alignment_for(adapters: AdapterSet | Alignment, config: MergeConfig, progress: bool,
                   mesh) -> Alignment:
  """The alignment a method needs: the joint decomposition for KnOTS, else the factors."""
  knots = config.spec.knots
  source = adapters.adapters if isinstance(adapters, Alignment) else adapters
  if isinstance(adapters, Alignment) and (adapters.aligned or not knots):
    return adapters
  if knots:
    return align(source, path=config.path, concat=config.concat, tol=config.tol,
                 dtype=config.dtype, progress=progress, mesh=mesh)
  return factor_alignment(source, config.dtype)


def merge(
    adapters: AdapterSet | Alignment,
    method: str | None = None,
    *,
    config: MergeConfig | None = None,
    progress: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    **options: object,
) -> MergeResult:
  """Merges adapters with `method` (see `knots_jax.METHODS` and docs/methods.md).

  Args:
    adapters: an `AdapterSet`, or an `Alignment` from `align` to reuse its
      decomposition (its path/concat/tol/dtype then apply).
    method: a name of `METHODS` (default: `config.method`, else "knots_ties").
    config: a `MergeConfig`; `method` and `options` override its fields.
    progress: show a progress bar over modules while aligning.
    mesh: from `sharding.make_mesh()`: align and merge with every stack
      sharded over the mesh (an `Alignment` keeps the mesh it was made with);
      the merged stacks come back replicated. See docs/sharding.md.
    **options: any field of `MergeConfig` (scaling, top_k, top_k_scope,
      drop_rate, seed, common_fraction, tsv_keep, output_rank, eta, path,
      concat, tol, dtype, modules_to_save): each is documented and checked
      there; `knots-jax merge --help` lists them. An unknown name, a value out
      of range or an option of another method raises ValueError.

  Raises ValueError too if the merge produced NaN or inf anywhere (naming the
  modules), or if `tol` dropped every component of a module. Turns on JAX's
  persistent compilation cache (`parallel.programs.enable_compile_cache`; set
  KNOTS_JAX_COMPILE_CACHE=off to disable it).
  """
  config = _resolve(adapters, method, config, options)
  programs.enable_compile_cache()
  alignment = _alignment_for(adapters, config, progress, mesh)
  if mesh is None and config.spec.knots:
    mesh = alignment.mesh
  aset = alignment.adapters
  extra = merge_extra(aset, config.modules_to_save)

  start = time.perf_counter()
  dt = compute_dtype(alignment.settings.get("dtype", config.dtype))
  stats = _stats(aset, alignment, config)
  if config.weights and len(config.weights) != len(aset.adapters):
    raise ValueError(f"weights: {len(config.weights)} weight(s) for {len(aset.adapters)} "
                     f"adapter(s) ({', '.join(aset.names)}); give one per adapter, in this order")
  out, info = _run_space(alignment, config, dt, mesh)
  for s in out:
    jax.block_until_ready(s.delta if s.delta is not None else s.a)
  _check_finite(out, config.method)
  stats.update(info, merge_seconds=time.perf_counter() - start)
  if mesh is not None and (config.spec.core or config.spec.combine == "factors"):
    stats["mesh"] = "not used: this method runs unsharded"
  if out and out[0].is_factored:   # the rank of the exact PEFT adapter (zero components dropped)
    stats["output_rank"] = max(1, max(int(np.sum(s.used_components())) for s in out))
  settings = {**config.applicable(), "dtype": str(dt)}
  return MergeResult(stacks=tuple(out), peft_config=dict(aset.adapters[0].config),
                     method=config.method, settings=settings, extra=extra, stats=stats,
                     config=config)
