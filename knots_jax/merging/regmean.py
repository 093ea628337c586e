"""RegMean: merge each adapted linear layer in closed form from input Gram matrices.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023; a baseline of the KnOTS paper) picks, per linear layer, the
weight whose outputs are closest to every task's own outputs on that task's
inputs. With `X_i` the inputs the layer sees in task i's fine-tuned model and
`y = x W^T` (W [out, in], PyTorch's orientation):

    W* = argmin_W  sum_i ||X_i W^T - X_i W_i^T||^2  =  (sum_i G_i)^-1 sum_i G_i W_i^T   (transposed)

with `G_i = X_i^T X_i` [in, in]. For LoRA, `W_i = W0 + delta_i`, and W0 cancels:

    delta* = W* - W0 = ((sum_i G~_i)^-1 sum_i G~_i delta_i^T)^T,

so the merge needs only the Grams and the LoRA factors (`G~_i delta_i^T` is
computed as `(G~_i A_i^T)(s_i B_i)^T`, never forming delta_i). `G~_i = a G_i +
(1 - a) diag(G_i)` is RegMean's off-diagonal scaling (`off_diagonal=a`,
`reduce_non_diagonal_ratio` in the authors' code). Like the authors' code, the
Gram of a task is the mean of `x^T x` over the input rows it saw (so tasks
count equally whatever their number of rows), and modules without Grams get the
plain average of the task updates.

  >>> grams = task_grams(model, forward, adapters, batches_per_task)
  >>> result = regmean_merge(adapters, base_weights, grams, off_diagonal=0.9)
  >>> knots_jax.save_merged_weights(result, base_dir, "merged/")

See docs/data_methods.md. `fisher.py` reuses the per-module bookkeeping below
(`check_statistics`, `averaged_stack`, `module_chunks`, `result_for`).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from knots_jax.adapters.peft_files import AdapterSet, check_against_base
from knots_jax.adapters.stacks import FactorStack, stack_adapters
from knots_jax.alignment import decompose
from knots_jax.merging import orchestrate
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax.models import lora
from knots_jax.parallel import sharding

CHUNK_BYTES = 1 << 29   # statistics of at most ~512 MiB go to the device at once


# ------------------------------------------------------------ Gram matrices


@functools.lru_cache(maxsize=32)
def _jitted(forward: Callable) -> Callable:
  """`nnx.jit(forward)`, one per `forward`: a fresh wrapper every call would recompile."""
  return nnx.jit(forward)


def place_batch(batch: Any, mesh: Mesh) -> Any:
  """Every leaf of `batch` with its leading (batch) axis split over all axes of `mesh`.

  Leaves already on `mesh` are kept. The batch axis must divide the mesh size:
  padding rows would be counted as inputs (and change later layers' inputs).
  The layout is `sharding.batch_sharding`.
  """
  size = mesh.size

  def put(x):
    if sharding.is_on_mesh(x, mesh):
      return x
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % size:
      raise ValueError(f"regmean: a batch leaf of shape {x.shape} cannot be split over the "
                       f"{size} devices of the mesh: its leading (batch) axis must be a "
                       "multiple of the mesh size")
    return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh, x.ndim),
                                        lambda idx: x[idx])

  return jax.tree_util.tree_map(put, batch)


def collect_grams(model: nnx.Module, forward: Callable[[nnx.Module, Any], Any],
                  batches: Iterable[Any], modules: Sequence[str] | None = None, *,
                  mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Mean input Gram `X^T X / rows` [in, in] of each layer over `forward` on `batches`.

  Runs `forward(model, batch)` (compiled with `nnx.jit`) on every batch while
  the layers record their inputs (`lora.record_inputs`, float32 sums), and
  divides each sum by the number of input rows the layer saw (tokens x
  sequences for a transformer), as the RegMean authors do. The model is used as
  it is: attach the task's adapter first (`task_grams` does), since with the
  adapter attached the inputs of later layers change.

  Args:
    model: any NNX model built from `lora.LoraLinear`.
    forward: `forward(model, batch)`; its output is ignored.
    batches: an iterable of batches (any pytree `forward` accepts). Padding
      positions are left out when `forward` passes the attention mask to the
      Flax Llama (`lora.record_inputs`).
    modules: HF module paths to record (default: every `LoraLinear`).
    mesh: split each batch's leading axis over the mesh (`place_batch`); the
      model's arrays are used as placed (single-device arrays are replicated by
      jit). Each device then adds the `x^T x` of its rows and jit sums them
      across devices inside the compiled forward.

  Raises:
    ValueError naming an unknown module, or a module that saw no inputs.
  """
  lora.record_inputs(model, None if modules is None else list(modules))
  try:
    step = _jitted(forward)
    for batch in batches:
      step(model, batch if mesh is None else place_batch(batch, mesh))
    sums = lora.input_grams(model)
  finally:
    lora.stop_recording(model)
  unused = sorted(name for name, (_, rows) in sums.items() if rows == 0)
  if unused:
    raise ValueError(f"regmean: module(s) {', '.join(f'`{m}`' for m in unused[:5])} saw no "
                     "inputs during the forward passes (no batches, or `forward` does not "
                     "call them)")
  return {name: (gram / np.float32(rows)).astype(np.float32)
          for name, (gram, rows) in sums.items()}


def task_grams(model: nnx.Module, forward: Callable[[nnx.Module, Any], Any],
               adapters: AdapterSet, batches_per_task: Sequence[Iterable[Any]],
               modules: Sequence[str] | None = None, *,
               mesh: Mesh | None = None) -> list[dict[str, np.ndarray]]:
  """`collect_grams` for each task with its own adapter attached: one dict per adapter.

  Task i's adapter is attached, the Grams of `modules` (default: the adapted
  modules) are collected on `batches_per_task[i]`, and every adapter is
  detached again (the model is the base model afterwards, also on errors).
  """
  modules = adapters.module_names if modules is None else list(modules)
  return per_task("regmean", model, adapters, batches_per_task,
                  lambda batches: collect_grams(model, forward, batches, modules, mesh=mesh))


# ------------------------------------------- per-module statistics (shared)


def per_task(what: str, model: nnx.Module, adapters: AdapterSet,
             batches_per_task: Sequence[Iterable[Any]],
             statistic: Callable[[Iterable[Any]], dict]) -> list[dict]:
  """`statistic(batches)` of each task with its own adapter attached, in adapter order.

  Every adapter is detached again afterwards (the model is the base model, also
  on errors).
  """
  if len(batches_per_task) != len(adapters):
    raise ValueError(f"{what}: {len(batches_per_task)} batch sets for {len(adapters)} "
                     "adapters; give one set of batches per task, in adapter order")
  out = []
  try:
    for adapter, batches in zip(adapters.adapters, batches_per_task):
      lora.attach_adapter(model, adapter)
      out.append(statistic(batches))
  finally:
    lora.detach_adapters(model)
  return out


def check_statistics(adapters: AdapterSet, stats: Sequence[Mapping[str, Any]], what: str,
                     shape: Callable[[tuple[int, int]], tuple[int, ...]]) -> list[str]:
  """Checks one {module: array} dict per task; returns the adapted modules they cover.

  A module must be in every task's dict or in none; `shape((out, in))` is the
  expected array shape. Modules of the dicts that are not adapted are ignored.

  Raises:
    ValueError naming the module and the task (`what` names the statistic).
  """
  if len(stats) != len(adapters):
    raise ValueError(f"{what}: {len(stats)} dicts for {len(adapters)} adapters; give one "
                     "per task, in adapter order")
  first = adapters.adapters[0]
  covered = []
  for module in adapters.module_names:
    present = [module in s for s in stats]
    if not any(present):
      continue
    if not all(present):
      lacking = [adapters.names[i] for i, p in enumerate(present) if not p]
      raise ValueError(f"{what}: module `{module}` has statistics for some tasks but not for "
                       f"{', '.join(lacking)}; give them for every task or for none")
    expected = shape(first.modules[module].shape)
    for name, s in zip(adapters.names, stats):
      got = tuple(np.shape(s[module]))
      if got != expected:
        raise ValueError(f"{what}: module `{module}` of task `{name}` has shape {got}, "
                         f"expected {expected}")
    covered.append(module)
  return covered


def module_chunks(rows: Sequence[int], bytes_per_module: int) -> list[list[int]]:
  """`rows` cut into chunks whose statistics stay under CHUNK_BYTES (at least one each)."""
  step = max(1, CHUNK_BYTES // max(bytes_per_module, 1))
  return [list(rows[i:i + step]) for i in range(0, len(rows), step)]


@jax.jit
def _weighted_average(b, a, weights):
  """sum_i w_i b_i a_i of every module: b [L, n, out, r], a [L, n, r, in], w [n]."""
  return jnp.einsum("n,lnor,lnri->loi", weights, b, a)


def averaged_stack(stack: FactorStack, rows: Sequence[int], weights: np.ndarray,
                   dtype) -> MergedStack:
  """The weighted average of the task updates of `stack`'s modules `rows`, dense."""
  index = np.asarray(rows)
  delta = _weighted_average(jnp.asarray(stack.b[index], dtype), jnp.asarray(stack.a[index], dtype),
                            jnp.asarray(weights / np.sum(weights), dtype))
  return MergedStack(tuple(stack.modules[i] for i in rows), delta=delta)


def split_stacks(adapters: AdapterSet, covered: Sequence[str], dtype
                 ) -> list[tuple[FactorStack, list[int], list[int]]]:
  """(stack, rows with statistics, rows without) of every stack of same-shaped modules."""
  covered = set(covered)
  out = []
  for stack in stack_adapters(adapters, dtype=np.dtype(dtype)):
    with_stats = [i for i, m in enumerate(stack.modules) if m in covered]
    without = [i for i, m in enumerate(stack.modules) if m not in covered]
    out.append((stack, with_stats, without))
  return out


def warn_averaged(what: str, modules: Sequence[str]) -> None:
  if modules:
    warnings.warn(f"{what}: {len(modules)} adapted module(s) have no statistics and get the "
                  f"average of the task updates: {', '.join(modules[:5])}"
                  + (" ..." if len(modules) > 5 else ""), stacklevel=3)


def result_for(adapters: AdapterSet, stacks: list[MergedStack], method: str, settings: dict,
               stats: dict, extra: Mapping[str, np.ndarray], modules_to_save: str,
               start: float) -> MergeResult:
  """A dense `MergeResult` with the adapters' config and the merged modules_to_save `extra`."""
  for s in stacks:
    jax.block_until_ready(s.delta)
  stats = {"adapters": adapters.names, "modules": len(adapters.module_names), **stats,
           "merge_seconds": time.perf_counter() - start}
  return MergeResult(stacks=tuple(stacks), peft_config=dict(adapters.adapters[0].config),
                     method=method, settings={"method": method, **settings,
                                              "modules_to_save": modules_to_save},
                     extra=extra, stats=stats)


def check_base(adapters: AdapterSet, base_weights: Mapping[str, Any] | None) -> None:
  """Every adapted module has a base weight of the right shape (when weights are given)."""
  if base_weights is not None:
    check_against_base(adapters, {k: tuple(np.shape(v)) for k, v in base_weights.items()})


# ------------------------------------------------------------------- merge


def _solve_module(grams, b, a, off_diagonal, ridge):
  """One module: grams [n, in, in], b [n, out, r] (scale folded in), a [n, r, in].

  Returns (delta* [out, in], smallest squared Cholesky pivot, inputs finite).
  The system is Jacobi-scaled (unit diagonal) before the Cholesky solve, which
  leaves the solution unchanged and tames features of very different scales.
  Features with zero diagonal (no task's inputs reach them) are unconstrained;
  they keep the plain average of the task updates.
  """
  n, features = grams.shape[0], grams.shape[-1]
  eye = jnp.eye(features, dtype=grams.dtype)
  diag = jnp.diagonal(grams, axis1=-2, axis2=-1)                    # [n, in]
  scaled = off_diagonal * grams + (1 - off_diagonal) * diag[:, :, None] * eye
  total = scaled.sum(0)
  rhs = jnp.einsum("nir,nor->io", jnp.einsum("nij,nrj->nir", scaled, a), b)   # [in, out]
  d = jnp.diagonal(total)
  dead = d <= 0
  norm = jnp.where(dead, 1, jax.lax.rsqrt(jnp.where(dead, 1, d)))
  system = total * norm[:, None] * norm[None, :]
  system = jnp.where(dead[:, None] | dead[None, :], eye, system)
  mean_d = jnp.sum(jnp.where(dead, 0, d)) / jnp.maximum(jnp.sum(~dead), 1)
  system = system + jnp.diag(jnp.where(dead, 0, ridge * mean_d * norm ** 2))
  average_t = jnp.einsum("nri,nor->io", a, b) / n
  rhs = jnp.where(dead[:, None], average_t, rhs * norm[:, None])
  chol = jnp.linalg.cholesky(system)
  solved = jax.scipy.linalg.cho_solve((chol, True), rhs) * norm[:, None]
  pivot = jnp.min(jnp.diagonal(chol) ** 2)
  finite = jnp.all(jnp.isfinite(grams))
  return solved.T, jnp.where(jnp.isfinite(pivot), pivot, -1), finite


@jax.jit
def _solve_stack(grams, b, a, off_diagonal, ridge):
  """`_solve_module` over a chunk of L modules: grams [L, n, in, in]; one batched Cholesky."""
  return jax.vmap(_solve_module, in_axes=(0, 0, 0, None, None))(grams, b, a, off_diagonal, ridge)


def pivot_tolerance(features: int, dtype) -> float:
  """Smallest acceptable squared pivot of the unit-diagonal system: features x 4 eps."""
  return 4.0 * features * float(jnp.finfo(dtype).eps)


def _singular_error(modules, pivots, off_diagonal, ridge, dtype, features, n) -> ValueError:
  shown = ", ".join(f"`{m}` (pivot {p:.2g})" for m, p in zip(modules[:3], pivots[:3]))
  more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
  return ValueError(
      f"regmean: the summed Gram system is singular or too ill-conditioned to solve in {dtype} "
      f"for {shown}{more}: the {n} tasks' inputs do not span all {features} input features "
      f"(regularisation applied: off_diagonal={off_diagonal}, ridge={ridge}; smallest squared "
      f"Cholesky pivot of the unit-diagonal system below {pivot_tolerance(features, dtype):.2g}, "
      "negative means the factorisation failed). Pass ridge > 0 (e.g. 1e-4: shrinks the "
      "update toward the base model where the inputs say nothing), off_diagonal < 1 (RegMean's "
      "alpha, e.g. 0.9), more input rows per task, or dtype='float64'.")


def _check_solved(names: Sequence[str], finite: np.ndarray, pivots: np.ndarray,
                  off_diagonal: float, ridge: float, dtype: np.dtype, features: int,
                  n: int) -> None:
  """Raises for a chunk whose Grams hold NaN / inf or whose system is singular."""
  if not finite.all():
    bad = names[int(np.argmin(finite))]
    raise ValueError(f"regmean: the Gram matrices of module `{bad}` contain NaN or inf")
  tol = pivot_tolerance(features, dtype)
  if (pivots < tol).any():
    bad = [i for i, p in enumerate(pivots) if p < tol]
    raise _singular_error([names[i] for i in bad], pivots[bad], off_diagonal, ridge,
                          dtype.name, features, n)


def _solve_chunk(stack: FactorStack, index: list[int], grams: Sequence[Mapping[str, Any]],
                 off_diagonal: float, ridge: float, dtype: np.dtype
                 ) -> tuple[MergedStack, float]:
  """RegMean of `stack`'s modules `index`, one batched solve: (merged, smallest pivot)."""
  names = [stack.modules[i] for i in index]
  g = np.stack([np.stack([np.asarray(t[m], dtype) for t in grams]) for m in names])
  delta, pivots, finite = _solve_stack(
      jnp.asarray(g), jnp.asarray(stack.b[index], dtype), jnp.asarray(stack.a[index], dtype),
      jnp.asarray(off_diagonal, dtype), jnp.asarray(ridge, dtype))
  finite, pivots = np.asarray(finite), np.asarray(pivots, np.float64)
  _check_solved(names, finite, pivots, off_diagonal, ridge, dtype, stack.a.shape[-1], len(grams))
  return MergedStack(tuple(names), delta=delta), float(pivots.min())


def _solve_stacks(adapters: AdapterSet, grams: Sequence[Mapping[str, Any]],
                  covered: Sequence[str], off_diagonal: float, ridge: float, dtype: np.dtype
                  ) -> tuple[list[MergedStack], list[str], float]:
  """Every stack solved chunk by chunk, modules without Grams averaged.

  Returns (merged stacks, averaged module names, smallest pivot or inf)."""
  n = len(adapters)
  out, averaged, smallest = [], [], np.inf
  for stack, rows, rest in split_stacks(adapters, covered, dtype):
    features = stack.a.shape[-1]
    for index in module_chunks(rows, n * features * features * dtype.itemsize):
      merged, pivot = _solve_chunk(stack, index, grams, off_diagonal, ridge, dtype)
      smallest = min(smallest, pivot)
      out.append(merged)
    if rest:
      out.append(averaged_stack(stack, rest, np.ones(n), dtype))
      averaged += [stack.modules[i] for i in rest]
  return out, averaged, smallest


def regmean_merge(adapters: AdapterSet, base_weights: Mapping[str, Any] | None,
                  grams: Sequence[Mapping[str, Any]], *, off_diagonal: float = 1.0,
                  ridge: float = 0.0, dtype: str = "float32",
                  modules_to_save: str = "error") -> MergeResult:
  """RegMean merge of the adapters' modules from each task's input Grams.

  Per module, `delta* = ((sum_i G~_i + ridge m I)^-1 sum_i G~_i delta_i^T)^T`
  with `G~_i = off_diagonal G_i + (1 - off_diagonal) diag(G_i)` and `m` the
  mean diagonal entry of `sum_i G~_i`. With off_diagonal = 1 and ridge = 0 it
  is exactly the least-squares optimum `argmin_W sum_i ||X_i W^T - X_i W_i^T||^2
  / rows_i` (`G_i = X_i^T X_i / rows_i`); ridge > 0 adds `ridge m ||W - W0||^2`
  (shrinks toward the base). Stacks of same-shaped modules are solved together
  (vmap, one jitted Cholesky per chunk).

  Args:
    adapters: from `load_adapters`.
    base_weights: {"<module>.weight": array} of the base model (e.g.
      `hf_checkpoint.read_tensors`), used to check that every adapted module fits
      the base; W0 cancels out of the merged update, so its values are not
      needed (None skips the check).
    grams: one {module: G [in, in]} per adapter, in adapter order (from
      `task_grams`). Modules in no dict get the plain average of the updates
      (with a warning); modules that are not adapted are ignored.
    off_diagonal: RegMean's alpha in [0, 1]; 1 keeps the Grams, 0 keeps only
      their diagonals (a per-input-feature weighted average).
    ridge: >= 0, relative to the mean diagonal entry.
    dtype: "float32" or "float64" (needs jax x64) for the solve.
    modules_to_save: how non-LoRA tensors are merged (`orchestrate.merge_extra`).

  Returns:
    A dense `MergeResult` (`delta` stacks, [out, in]) for
    `save_merged_weights`, `full_model.merged_model_weights` or
    `save_peft_adapter(rank=...)`.

  Raises:
    ValueError naming the module: Grams missing for some tasks, of the wrong
    shape, with NaN / inf, or a singular system (the message says which
    regularisation was applied and what to change).
  """
  if not 0.0 <= off_diagonal <= 1.0:
    raise ValueError(f"regmean: off_diagonal must be in [0, 1], got {off_diagonal}")
  if not ridge >= 0.0:
    raise ValueError(f"regmean: ridge must be >= 0, got {ridge}")
  dt = decompose.compute_dtype(dtype)
  start = time.perf_counter()
  check_base(adapters, base_weights)
  covered = check_statistics(adapters, grams, "regmean", lambda oi: (oi[1], oi[1]))
  extra = orchestrate.merge_extra(adapters, modules_to_save)
  out, averaged, smallest = _solve_stacks(adapters, grams, covered, off_diagonal, ridge, dt)
  warn_averaged("regmean", averaged)
  stats = {"gram_modules": len(covered), "averaged_modules": averaged,
           "smallest_pivot": smallest if np.isfinite(smallest) else None}
  settings = {"off_diagonal": off_diagonal, "ridge": ridge, "dtype": dt.name}
  return result_for(adapters, out, "regmean", settings, stats, extra, modules_to_save, start)
