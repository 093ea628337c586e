"""KnOTS-X and X: alignment, a merging method, and reconstruction.

`align` computes the joint decomposition once; `merge` applies a method to it
(or to the dense task updates for the baselines) and returns a `MergeResult`.
A sweep calls `merge` many times on one `Alignment`:

  >>> adapters = load_adapters(["a/", "b/", "c/"])
  >>> alignment = align(adapters)
  >>> for top_k in (10, 20, 30):
  ...   result = merge(alignment, "knots_ties", scaling=0.6, top_k=top_k)
"""

from __future__ import annotations

import functools
import time
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.adapters.stacks import FactorStack
from knots_jax.alignment import core_space, knots_svd
from knots_jax.alignment.decompose import Alignment, align, compute_dtype, factor_alignment
from knots_jax.merging import threshold as threshold_lib
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax.methods import entrywise
from knots_jax.methods.registry import METHOD_OPTIONS, Method, get_method
from knots_jax.parallel import sharding

# ---------------------------------------------------------------------------
# Per-stack kernels (jit boundaries; each vmaps a methods.* function over L).


@functools.partial(jax.jit, static_argnames=("length",))
def _dare_stack(rep, key, keep_prob, length=None):
  """DARE of a stack. `keep_prob` (1 - p) is traced: a search over p compiles once.
  `length`: the true stack length of a padded stack (the mask is drawn for it)."""
  length = rep.shape[0] if length is None else length
  keep = entrywise.keep_mask(key, (length,) + rep.shape[1:], keep_prob)
  keep = jnp.pad(keep, [(0, rep.shape[0] - length)] + [(0, 0)] * (rep.ndim - 1))
  return entrywise.rescale_kept(rep, keep, keep_prob)


def keep_probability(drop_rate: float) -> np.ndarray:
  """1 - p as a host scalar of the dtype a Python float gets in JAX (float32, or
  float64 with x64): the masks and rescaling equal those of a static p."""
  return np.asarray(1.0 - drop_rate, jax.dtypes.canonicalize_dtype(np.float64))


@jax.jit
def _sum_stack(rep, scaling):
  return jax.vmap(entrywise.task_arithmetic, in_axes=(0, None))(rep, scaling)


@jax.jit
def _mean_stack(rep, scaling):
  return jax.vmap(entrywise.average, in_axes=(0, None))(rep, scaling)


@jax.jit
def _sign_sum_stack(rep, threshold):
  """Sum of elected signs over the stack; threshold [n] or [L, n]."""
  in_thr = 0 if threshold.ndim == 2 else None
  pruned = jax.vmap(lambda x, t: jnp.where(entrywise.magnitude_mask(x, t), x, 0),
                    in_axes=(0, in_thr))(rep, threshold)
  return jax.vmap(entrywise.sign_sum)(pruned)  # [L]


@jax.jit
def _sign_total_stack(rep, threshold):
  """Sum of elected signs over the whole stack: a scalar."""
  return jnp.sum(_sign_sum_stack(rep, threshold))


@jax.jit
def _majority_sign(totals):
  """Sign of the sum of the per-stack totals (one sign for the whole model)."""
  return jnp.sign(sum(totals))


@jax.jit
def _ties_stack(rep, threshold, majority, scaling):
  """threshold [n] or [L, n]; majority scalar or [L]."""
  in_thr = 0 if threshold.ndim == 2 else None
  in_maj = 0 if majority.ndim == 1 else None
  return jax.vmap(entrywise.ties, in_axes=(0, in_thr, in_maj, None))(
      rep, threshold, majority, scaling)


@jax.jit
def _layer_thresholds(rep, valid, ranks):
  """Per module and task, the ranks[l]-th smallest valid magnitude: [L, n]."""
  L, n = rep.shape[:2]
  mag = jnp.where(valid[:, None, :, None], jnp.abs(rep), jnp.inf).reshape(L, n, -1)
  ordered = jnp.sort(mag, axis=-1)
  picked = jnp.take_along_axis(ordered, jnp.maximum(ranks - 1, 0)[:, None, None], axis=-1)[..., 0]
  return jnp.where(ranks[:, None] > 0, picked, 0).astype(rep.dtype)


_matmul = jax.jit(jnp.matmul)


def stack_key(seed: int, modules: Sequence[str]) -> jax.Array:
  """The DARE key of a stack: depends on the seed and the stack's modules only."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(",".join(modules).encode()))


def _per_stack(fn, reps):
  """`fn(rep)` for every stack; a lazy stack (a zero-argument callable, see
  `threshold.kth_smallest_magnitude`) is made, used and dropped before the next one
  (waiting for each result: dispatch is asynchronous)."""
  out = []
  for r in reps:
    if callable(r):
      out.append(jax.block_until_ready(fn(r())))
    else:
      out.append(fn(r))
  return out


def _lazy_dare(r, key, drop_rate, length):
  """DARE of a stack given as an array, or lazily (the same mask at every call)."""
  keep_prob = keep_probability(drop_rate)
  if callable(r):
    return lambda: _dare_stack(r(), key, keep_prob, length)
  return _dare_stack(r, key, keep_prob, length)


def _ties_model(reps, valids, top_k, scaling):
  """TIES with one threshold per task and one majority sign for the whole model.

  Stacks may be lazy: then pass 1 (threshold, majority sign) and pass 2 (merge)
  each make every stack again and hold about one at a time."""
  shapes = [threshold_lib.stack_shape(r) for r in reps]
  n = shapes[0].shape[1]
  count = sum(int(np.sum(sharding.to_host(v))) * r.shape[-1] for r, v in zip(shapes, valids))
  rank = entrywise.kth_rank(count, top_k)
  start = time.perf_counter()
  ref = valids[0] if callable(reps[0]) else reps[0]
  threshold = sharding.like(ref, threshold_lib.kth_smallest_magnitude(reps, valids, [rank] * n))
  threshold_seconds = time.perf_counter() - start
  majority = _majority_sign(_per_stack(lambda r: _sign_total_stack(r, threshold), reps))
  merged = _per_stack(lambda r: _ties_stack(r, threshold, majority.astype(r.dtype), scaling),
                      reps)
  return merged, {"threshold": np.asarray(threshold).tolist(), "kth_rank": rank,
                  "values_per_task": count, "threshold_seconds": threshold_seconds}


def _ties_layer(reps, valids, top_k, scaling):
  """TIES with thresholds and majority signs per module (PEFT / mergekit style)."""
  merged = []
  for r, v in zip(reps, valids):
    lazy = callable(r)
    r = threshold_lib.get_stack(r)
    counts = np.sum(sharding.to_host(v), axis=-1) * r.shape[-1]
    ranks = sharding.like(r, [entrywise.kth_rank(int(c), top_k) for c in counts])
    threshold = _layer_thresholds(r, v, ranks)
    majority = jnp.sign(_sign_sum_stack(r, threshold)).astype(r.dtype)
    merged.append(_ties_stack(r, threshold, majority, scaling))
    del r
    if lazy:   # the next lazy stack is made only once this one is freed
      jax.block_until_ready(merged[-1])
  return merged, {}


def combine(
    reps: Sequence[jax.Array],
    valids: Sequence[jax.Array],
    modules: Sequence[Sequence[str]],
    method: Method,
    *,
    scaling: float,
    top_k: float,
    drop_rate: float,
    seed: int,
    top_k_scope: str,
    padded: bool = False,
) -> tuple[list[jax.Array], dict]:
  """Merges per-task values [L, n, R, C] of every stack into [L, R, C].

  `reps`: arrays, or zero-argument callables returning them (lazy stacks, made
  on the fly in every pass and dropped after use: see `_merge_dense`).

  `padded`: stacks may be longer than their module lists (sharded stacks);
  the extra rows must be invalid (zero) and DARE draws its mask for the true length.
  """
  if method.dare:
    reps = [_lazy_dare(r, stack_key(seed, m), drop_rate, len(m) if padded else None)
            for r, m in zip(reps, modules)]
  if method.combine == "sum":
    return _per_stack(lambda r: _sum_stack(r, scaling), reps), {}
  if method.combine == "mean":
    return _per_stack(lambda r: _mean_stack(r, scaling), reps), {}
  if top_k_scope == "model":
    return _ties_model(reps, valids, top_k, scaling)
  if top_k_scope == "layer":
    return _ties_layer(reps, valids, top_k, scaling)
  raise ValueError(f"top_k_scope must be `model` or `layer`, got `{top_k_scope}`")


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
  if mode == "first":
    return {k: adapters.adapters[0].extra[k] for k in keys}
  raise ValueError(f"modules_to_save must be error, mean, first or drop; got `{mode}`")


@jax.jit
def _unscaled_v(rep, s, valid):
  """V_i^T = diag(s)^-1 rep_i on the valid components (0 elsewhere): [L, n, K, C]."""
  scale = jnp.where(valid, s, 1)[:, None, :, None]
  return jnp.where(valid[:, None, :, None], rep / scale, 0)


def _aligned_matrices(stack: knots_svd.AlignedStack, spec: Method, hyper: dict) -> jax.Array:
  """`knots_tsv_m`: the method on the V_i^T, then diag(s) in front (U diag(s) merged)."""
  v = _unscaled_v(stack.rep, stack.s, stack.valid)
  rank = jnp.sum(stack.valid, axis=-1)
  return stack.s[:, :, None] * spec.matrices(v, rank, hyper)


def _merge_aligned(alignment: Alignment, spec: Method, hyper: dict, mesh):
  """KnOTS: the method on every stack's diag(s) V_i^T (V_i^T for "matrices"
  methods), then back through U."""
  stacks = alignment.aligned
  if spec.combine == "matrices":
    merged, info = [_aligned_matrices(s, spec, hyper) for s in stacks], {}
  else:
    merged, info = combine([s.rep for s in stacks], [s.valid for s in stacks],
                           [s.modules for s in stacks], spec, **hyper, padded=mesh is not None)
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
  return out, info


def _merge_core(factors: Sequence[FactorStack], spec: Method, hyper: dict, dt):
  """Core Space: the method on every module's core matrices M_i, then U_B M V_A^T.

  Entry-wise methods see each core as [Kb * Ka, 1] values whose valid entries
  (valid row and column) are the only ones counted by TIES' top-K.
  """
  cores = [core_space.project_stack(f.modules, f.b, f.a, dtype=dt) for f in factors]
  if spec.combine == "matrices":
    merged, info = [spec.matrices(c.cores, c.rank, hyper) for c in cores], {}
  else:
    reps = [c.cores.reshape(c.cores.shape[:2] + (-1, 1)) for c in cores]
    merged, info = combine(reps, [c.entry_valid for c in cores], [c.modules for c in cores],
                           spec, **hyper)
    merged = [m.reshape((m.shape[0],) + c.cores.shape[2:]) for c, m in zip(cores, merged)]
  out = [MergedStack(c.modules, *core_space.reconstruct(c, m)) for c, m in zip(cores, merged)]
  sizes = np.concatenate([core_space.core_sizes(c) for c in cores])
  info["core_size"] = dict(min=int(sizes.min()), max=int(sizes.max()))
  return out, info


def _merge_factors(factors: Sequence[FactorStack], spec: Method, hyper: dict, dt):
  """A function of the LoRA factors per stack; it returns factors or a dense update."""
  out = []
  for f in factors:
    merged = spec.factors(jnp.asarray(f.b, dt), jnp.asarray(f.a, dt), hyper, f.modules)
    out.append(MergedStack(f.modules, *merged) if isinstance(merged, tuple)
               else MergedStack(f.modules, delta=merged))
  return out


def _merge_linear(factors: Sequence[FactorStack], spec: Method, scaling: float, dt):
  """Task arithmetic / averaging of LoRAs is a LoRA: concatenated factors, exactly."""
  out = []
  for f in factors:
    L, n, o, r = f.b.shape
    coef = scaling / (n if spec.combine == "mean" else 1)
    b = jnp.asarray(np.transpose(f.b, (0, 2, 1, 3)).reshape(L, o, n * r), dt)
    a = coef * jnp.asarray(f.a.reshape(L, n * r, -1), dt)
    out.append(MergedStack(f.modules, b=b, a=a))
  return out


def _merge_dense(factors: Sequence[FactorStack], spec: Method, hyper: dict, dt, mesh):
  """The method on the dense task updates b @ a of every stack (no KnOTS).

  Streams: the dense updates [L, n, out, in] (n times the adapted weights) are
  never all held; each stack's are made from its factors when a pass needs
  them (lazy stacks, see `combine`) and dropped after use.
  """
  if mesh is not None:
    reps = [functools.partial(_matmul, sharding.place_stack(f.b, mesh, dt),
                              sharding.place_stack(f.a, mesh, dt)) for f in factors]
    valids = [sharding.place_stack(np.ones((len(f.modules), f.b.shape[2]), bool), mesh,
                                   fill=False) for f in factors]
  else:
    reps = [functools.partial(jnp.matmul, jnp.asarray(f.b, dt), jnp.asarray(f.a, dt))
            for f in factors]
    valids = [jnp.ones((f.b.shape[0], f.b.shape[2]), bool) for f in factors]
  merged, info = combine(reps, valids, [f.modules for f in factors], spec, **hyper,
                         padded=mesh is not None)
  if mesh is not None:
    merged = [sharding.unpad(m, len(f.modules), mesh) for f, m in zip(factors, merged)]
  return [MergedStack(f.modules, delta=m) for f, m in zip(factors, merged)], info


def merge(
    adapters: AdapterSet | Alignment,
    method: str = "knots_ties",
    *,
    scaling: float = 1.0,
    top_k: float = 30,
    drop_rate: float = 0.9,
    seed: int = 0,
    top_k_scope: str = "model",
    modules_to_save: str = "error",
    path: str = "core",
    concat: str = "columns",
    tol: float = knots_svd.DEFAULT_TOL,
    dtype: str = "float32",
    progress: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    common_fraction: float = 0.8,
    tsv_keep: int = 0,
    output_rank: int = 0,
    eta: float = 1.0,
) -> MergeResult:
  """Merges adapters with `method` (see `METHODS`).

  Args:
    adapters: an `AdapterSet`, or an `Alignment` from `align` to reuse its
      decomposition (its path/concat/tol/dtype then apply).
    method: a name of `METHODS` (the table in docs/methods.md): `ta`, `mean`,
      `ties`, `dare`, `dare_ties`; the same with the prefix `knots_` (KnOTS'
      aligned representations) or `core_` (the Core Space's core matrices);
      the SVD-based `direct_merge`, `mm_svd`, `mm_noise`, `iso_c`, `iso_cts`,
      `tsv_m`, `sftm`, `knots_tsv_m`, `core_tsv_m`, `core_iso_c`, `core_iso_cts`.
    scaling: alpha, multiplies the merged update (TIES: every kept value; DM,
      MM: the weight of every adapter; SFTM: gamma).
    top_k: kept fraction for TIES; > 1 means percent, >= 1 keeps everything.
    drop_rate: DARE's p, the probability of dropping an entry.
    seed: DARE's random seed (`mm_noise`: the noise's).
    top_k_scope: "model" (reference: one threshold per task over all modules)
      or "layer" (per module, as PEFT and mergekit do).
    modules_to_save: how non-LoRA tensors are merged: error, mean, first, drop.
    mesh: from `sharding.make_mesh()`: align and merge with every stack
      sharded over the mesh (an `Alignment` keeps the mesh it was made with);
      the merged stacks come back replicated. See docs/sharding.md.
    common_fraction: Iso-CTS (`iso_cts`, `core_iso_cts`): the share of the
      space given to the common subspace.
    tsv_keep: TSV-M (`tsv_m`): components kept per task; 0 = TSV-M's default,
      min(out, in) // n.
    output_rank: `mm_svd`: the rank of the merged LoRA; 0 = the largest
      adapter rank.
    eta: SFTM (`sftm`): the share of each task's singular components kept
      (top-eta trim); 1 (no trim) works from the factors, < 1 on the dense
      updates of each stack.
  Options of a method other than `method` must stay at their defaults
  (`METHOD_OPTIONS`).
  """
  spec = get_method(method)
  options = dict(common_fraction=common_fraction, tsv_keep=tsv_keep, output_rank=output_rank,
                 eta=eta)
  for name, value in options.items():
    default, users = METHOD_OPTIONS[name]
    if method not in users and value != default:
      raise ValueError(f"{name}={value!r} applies to {' and '.join(users)}, not to `{method}`")
  if not 0.0 <= common_fraction <= 1.0:
    raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")
  if not 0.0 < eta <= 1.0:
    raise ValueError(f"eta must be in (0, 1], got {eta}")
  for name in ("tsv_keep", "output_rank"):
    if isinstance(options[name], bool) or not isinstance(options[name], int) or options[name] < 0:
      raise ValueError(f"{name} must be a non-negative integer (0: the default), got "
                       f"{options[name]!r}")
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
  entrywise.top_k_fraction(top_k)
  if isinstance(adapters, Alignment):
    alignment = adapters
  elif spec.knots:
    alignment = align(adapters, path=path, concat=concat, tol=tol, dtype=dtype, progress=progress,
                      mesh=mesh)
  else:
    alignment = factor_alignment(adapters, dtype)
  if spec.knots and not alignment.aligned:
    alignment = align(alignment.adapters, path=path, concat=concat, tol=tol, dtype=dtype,
                      progress=progress, mesh=mesh)
  if mesh is None and spec.knots:
    mesh = alignment.mesh
  aset = alignment.adapters
  extra = merge_extra(aset, modules_to_save)

  start = time.perf_counter()
  dt = compute_dtype(alignment.settings.get("dtype", dtype))
  hyper = dict(scaling=scaling, top_k=top_k, drop_rate=drop_rate, seed=seed,
               top_k_scope=top_k_scope,
               **{k: v for k, v in options.items() if method in METHOD_OPTIONS[k][1]})
  stats: dict = {"adapters": aset.names,
                 "ranks": {ad.name: sorted({f.rank for f in ad.modules.values()})
                           for ad in aset.adapters},
                 "modules": sum(len(f.modules) for f in alignment.factors)}
  if aset.adapters[0].extra:
    stats["modules_to_save"] = {"tensors": sorted(aset.adapters[0].extra), "mode": modules_to_save}
  if spec.knots:
    out, info = _merge_aligned(alignment, spec, hyper, mesh)
    info["align_seconds"] = alignment.seconds
  elif spec.core:
    out, info = _merge_core(alignment.factors, spec, hyper, dt)
  elif spec.factors is not None:
    out, info = _merge_factors(alignment.factors, spec, hyper, dt), {}
  elif spec.combine in ("sum", "mean") and not spec.dare:
    out, info = _merge_linear(alignment.factors, spec, scaling, dt), {}
  else:
    out, info = _merge_dense(alignment.factors, spec, hyper, dt, mesh)
  for s in out:
    jax.block_until_ready(s.delta if s.delta is not None else s.a)
  stats.update(info, merge_seconds=time.perf_counter() - start)
  if mesh is not None and (spec.core or spec.factors is not None):
    stats["mesh"] = "not used: this method runs unsharded"
  if out and out[0].is_factored:
    stats["output_rank"] = max(int(s.a.shape[-2]) for s in out)
  settings = {"method": method, **hyper, "modules_to_save": modules_to_save,
              **(dict(alignment.settings) if spec.knots else {"dtype": str(dt)})}
  return MergeResult(stacks=tuple(out), peft_config=dict(aset.adapters[0].config),
                     method=method, settings=settings, extra=extra, stats=stats)
