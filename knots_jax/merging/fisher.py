"""Fisher-weighted averaging of LoRA adapters (Matena & Raffel, NeurIPS 2022).

A KnOTS-paper baseline (App. E). Each task's fine-tuned model `p(y | x; W_i)`
gives a diagonal Fisher per weight entry,

    F_i = (1/N) sum_{n<=N} (d/dW log p(y_n | x_n; W) at W = W_i)^2,

from per-example gradients (`jax.vmap` of `jax.grad` over the examples of a
batch) on N examples of task i, with `y_n` sampled from the model's own
predictive distribution (`labels="sampled"`, the Fisher of the paper), the
exact expectation over the classes (`"expected"`, what the authors' code
computes for classifiers), or the dataset label (`"empirical"`). Only the
weights of the adapted modules are merged, so only their Fisher is computed:
the gradient is taken w.r.t. the full weight `W = W0 + s B A` of each adapted
`LoraLinear` (its kernel, with the task's LoRA attached).

The merge is elementwise,

    W* = sum_i l_i F~_i W_i / sum_i l_i F~_i,  F~_i = max(F_i, floor),

and since the weights sum to one, W0 cancels: `W* - W0 = sum_i l_i F~_i delta_i
/ sum_i l_i F~_i`. See docs/data_methods.md.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from knots_jax.adapters.peft_files import AdapterSet
from knots_jax.adapters.stacks import FactorStack
from knots_jax.alignment import decompose
from knots_jax.merging import orchestrate, regmean
from knots_jax.merging.result import MergedStack, MergeResult
from knots_jax.models import lora

LABELS = ("sampled", "expected", "empirical")


# ------------------------------------------------------------- Fisher diagonal


def _kernel_paths(model: nnx.Module, modules: Sequence[str]) -> dict[tuple, str]:
  """{graph path of the kernel: HF module name} of the `modules` of `model`."""
  paths = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, lora.LoraLinear) and node.hf_name in modules:
      paths[tuple(path) + ("kernel",)] = node.hf_name
  missing = sorted(set(modules) - set(paths.values()))
  if missing:
    raise ValueError(f"fisher: no layer {', '.join(f'`{m}`' for m in missing[:5])} in the model")
  return paths


def _example_log_likelihood(log_probs: jax.Array, label: jax.Array) -> jax.Array:
  """log p of `label` [*S] under `log_probs` [*S, C], summed over positions (label < 0: none)."""
  picked = jnp.take_along_axis(log_probs, jnp.maximum(label, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(label >= 0, picked, 0))


@functools.partial(jax.jit, static_argnames=("graphdef", "log_prob_fn", "labels"))
def _squared_gradients(graphdef, log_prob_fn, labels, kernels, rest, inputs, targets, keys,
                       counted):
  """Sum over the batch of squared per-example gradients w.r.t. `kernels` (float32).

  `counted`: None, or [B, *S] (1: the position counts; 0: padding, left out)."""

  def log_probs_of(k, example):
    model = nnx.merge(graphdef, k, rest)
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    out = log_prob_fn(model, single)
    if out.ndim < 2:
      raise ValueError(f"fisher: log_prob_fn must return log-probs [B, ..., C]; got shape "
                       f"{out.shape}")
    return out[0].astype(jnp.float32)

  def one_example(example, target, key, count):
    if labels == "expected":
      log_probs = log_probs_of(kernels, example)
      if log_probs.ndim != 1:
        raise ValueError("fisher: labels='expected' needs log-probs [B, C] (one label per "
                         f"example); got [B, {', '.join(map(str, log_probs.shape))}]")
      jac = jax.jacrev(lambda k: log_probs_of(k, example))(kernels)     # [C, ...] per kernel
      p = jax.lax.stop_gradient(jnp.exp(log_probs))
      return jax.tree_util.tree_map(
          lambda g: jnp.tensordot(p, jnp.square(g.astype(jnp.float32)), axes=1), jac)

    def log_likelihood(k):
      log_probs = log_probs_of(k, example)
      if labels == "sampled":
        label = jax.random.categorical(key, jax.lax.stop_gradient(log_probs))
      else:
        label = jnp.asarray(target).astype(jnp.int32)
        if label.shape != log_probs.shape[:-1]:
          raise ValueError(f"fisher: an example's labels have shape {label.shape} but its "
                           f"log-probs have shape {log_probs.shape} ([..., C])")
      if count is not None:
        if count.shape != log_probs.shape[:-1]:
          raise ValueError(f"fisher: positions() gives shape {count.shape} per example but "
                           f"the log-probs have shape {log_probs.shape} ([..., C])")
        label = jnp.where(count != 0, label, -1)
      return _example_log_likelihood(log_probs, label)

    grad = jax.grad(log_likelihood)(kernels)
    return jax.tree_util.tree_map(lambda g: jnp.square(g.astype(jnp.float32)), grad)

  per_example = jax.vmap(one_example)(inputs, targets, keys, counted)
  return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), per_example)


def _batch_size(inputs: Any) -> int:
  """The leading (batch) axis shared by every leaf of `inputs`."""
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(inputs)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"fisher: every leaf of a batch needs the same leading (batch) axis; got "
                     f"sizes {sorted(map(str, sizes))}")
  return sizes.pop()


def _check_diagonal_options(labels: str, positions: Callable[[Any], Any] | None,
                            n_examples: int) -> None:
  """Raises for `fisher_diagonal` options that are unknown or do not fit together."""
  if labels not in LABELS:
    raise ValueError(f"fisher: labels must be one of {', '.join(LABELS)}; got {labels!r}")
  if positions is not None and labels == "expected":
    raise ValueError("fisher: positions= is for log-probs [B, *S, C]; labels='expected' "
                     "takes one prediction per example")
  if not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
    raise ValueError(f"fisher: n_examples must be a positive integer, got {n_examples!r}")


def _adapted_modules(model: nnx.Module) -> list[str]:
  """HF names of the model's layers with a LoRA attached (sorted); raises when none is."""
  modules = sorted(m.hf_name for m in lora.linears(model).values() if m.lora_a is not None)
  if not modules:
    raise ValueError("fisher: no adapter is attached to the model; attach one "
                     "(lora.attach_adapter) or pass modules=")
  return modules


def _inputs_and_targets(batch: Any, labels: str) -> tuple[Any, Any]:
  """(inputs, labels or None) of one batch: "empirical" batches are (inputs, labels) pairs."""
  if labels != "empirical":
    return batch, None
  if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
    raise ValueError("fisher: labels='empirical' needs batches of (inputs, labels) pairs")
  return batch[0], batch[1]


def _first_examples(inputs: Any, targets: Any, wanted: int) -> tuple[Any, jax.Array, int]:
  """The first min(batch size, `wanted`) examples: (inputs, int labels, count).

  Without labels ("sampled", "expected") the labels are zeros, never read."""
  size = _batch_size(inputs)
  take = min(size, wanted)
  if take < size:
    inputs = jax.tree_util.tree_map(lambda x: x[:take], inputs)
  targets = jnp.zeros((take,), jnp.int32) if targets is None else jnp.asarray(targets)[:take]
  return inputs, targets, take


def _summed_squared_gradients(graphdef, log_prob_fn, labels: str, kernels, rest,
                              batches: Iterable[Any], n_examples: int, seed: int,
                              positions: Callable[[Any], Any] | None) -> tuple[Any, int]:
  """Squared per-example gradients summed over the first `n_examples` of `batches`.

  Returns (the sums, a state like `kernels`, or None; the examples seen). Batch
  `index` draws its labels from `fold_in(key(seed), index)`."""
  key = jax.random.key(seed)
  total, seen = None, 0
  for index, batch in enumerate(batches):
    if seen >= n_examples:
      break
    inputs, targets = _inputs_and_targets(batch, labels)
    inputs, targets, take = _first_examples(inputs, targets, n_examples - seen)
    keys = jax.random.split(jax.random.fold_in(key, index), take)
    counted = None if positions is None else jnp.asarray(positions(inputs))
    sums = _squared_gradients(graphdef, log_prob_fn, labels, kernels, rest, inputs, targets,
                              keys, counted)
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    seen += take
  return total, seen


def fisher_diagonal(model: nnx.Module, log_prob_fn: Callable[[nnx.Module, Any], jax.Array],
                    batches: Iterable[Any], modules: Sequence[str] | None = None, *,
                    n_examples: int, labels: str = "sampled", seed: int = 0,
                    positions: Callable[[Any], Any] | None = None) -> dict[str, np.ndarray]:
  """Diagonal Fisher [out, in] of each adapted module's full weight, from N examples.

  Args:
    model: any NNX model of `lora.LoraLinear` layers, with the task's adapter
      attached (`task_fishers` does it). It is not modified.
    log_prob_fn: `log_prob_fn(model, inputs) -> log-probs [B, C]` (normalised,
      e.g. `jax.nn.log_softmax(logits)`), or [B, *S, C] for several predictions
      per example (tokens): an example's log-likelihood is then the sum over
      the positions (labels < 0 are ignored, HF's -100 padding convention).
      It is called on batches of one example.
    batches: for "sampled" and "expected", each batch is the `inputs` pytree
      (leading axis = examples); for "empirical", an `(inputs, labels)` pair
      with integer labels [B] or [B, *S].
    modules: HF module paths (default: every layer with a LoRA attached).
    n_examples: N; batches are consumed until N examples are seen (the last
      one cut); fewer raise ValueError.
    labels: "sampled" (y ~ p(y|x), one draw per example, seeded), "expected"
      (sum_c p_c g_c^2, exact; C gradients per example, [B, C] only) or
      "empirical" (the given labels).
    seed: the sampling seed; the same seed and batches give the same Fisher.
    positions: for log-probs [B, *S, C], `positions(inputs) -> [B, *S]` of 1
      (the position counts) and 0 (padding: left out of the log-likelihood),
      e.g. `lambda b: b["attention_mask"]`. Without it every position counts
      under "sampled" (under "empirical", labels < 0 are left out already).

  Memory: the per-example gradients of one batch, B x the adapted weights.
  """
  _check_diagonal_options(labels, positions, n_examples)
  modules = _adapted_modules(model) if modules is None else list(modules)
  paths = _kernel_paths(model, modules)
  graphdef, kernels, rest = nnx.split(model, lambda path, _: tuple(path) in paths, ...)
  total, seen = _summed_squared_gradients(graphdef, log_prob_fn, labels, kernels, rest, batches,
                                          n_examples, seed, positions)
  if seen < n_examples:
    raise ValueError(f"fisher: the batches hold {seen} examples, fewer than n_examples="
                     f"{n_examples}")
  return {paths[tuple(path)]: np.asarray(value.get_value() / seen).T
          for path, value in nnx.to_flat_state(total)}


def task_fishers(model: nnx.Module, log_prob_fn: Callable[[nnx.Module, Any], jax.Array],
                 adapters: AdapterSet, batches_per_task: Sequence[Iterable[Any]],
                 modules: Sequence[str] | None = None, *, n_examples: int,
                 labels: str = "sampled", seed: int = 0,
                 positions: Callable[[Any], Any] | None = None) -> list[dict[str, np.ndarray]]:
  """`fisher_diagonal` of each task with its own adapter attached: one dict per adapter.

  `modules` defaults to the adapted modules; every adapter is detached again
  afterwards (also on errors). The seed is the same for every task.
  """
  modules = adapters.module_names if modules is None else list(modules)
  return regmean.per_task(
      "fisher", model, adapters, batches_per_task,
      lambda batches: fisher_diagonal(model, log_prob_fn, batches, modules,
                                      n_examples=n_examples, labels=labels, seed=seed,
                                      positions=positions))


# ------------------------------------------------------------------- merge


def _merge_module(fisher, b, a, coefficients, floor):
  """fisher [n, out, in], b [n, out, r], a [n, r, in] -> merged update [out, in], checks."""
  weight = jnp.maximum(fisher, floor) * coefficients[:, None, None]
  delta = jnp.einsum("nor,nri->noi", b, a)
  total = weight.sum(0)
  average = jnp.einsum("n,noi->oi", coefficients / coefficients.sum(), delta)
  merged = jnp.where(total > 0, (weight * delta).sum(0) / jnp.where(total > 0, total, 1), average)
  valid = jnp.all(jnp.isfinite(fisher)) & jnp.all(fisher >= 0)
  return merged, valid


@jax.jit
def _merge_stack(fisher, b, a, coefficients, floor):
  """`_merge_module` over a chunk of L modules: fisher [L, n, out, in]."""
  return jax.vmap(_merge_module, in_axes=(0, 0, 0, None, None))(fisher, b, a, coefficients, floor)


def _coefficients(coefficients, n: int) -> np.ndarray:
  """The merging weights l_i as float64 [n] (default: 1/n each); raises when invalid."""
  if coefficients is None:
    return np.full(n, 1.0 / n)
  c = np.asarray(coefficients, np.float64)
  if c.shape != (n,) or not np.all(np.isfinite(c)) or np.any(c < 0) or c.sum() <= 0:
    raise ValueError(f"fisher: coefficients must be {n} finite non-negative numbers, not all "
                     f"zero (one per adapter); got {coefficients!r}")
  return c


def _fisher_norms(fishers: Sequence[Mapping[str, Any]], covered: Sequence[str]) -> np.ndarray:
  """L2 norm of each task's Fisher over the `covered` modules (float64 [n]); non-zero, finite."""
  norms = np.sqrt([sum(float(np.sum(np.square(np.asarray(f[m], np.float64)))) for m in covered)
                   for f in fishers])
  if np.any(norms == 0) or not np.all(np.isfinite(norms)):
    raise ValueError(f"fisher: normalize=True needs non-zero finite Fishers; the norms per "
                     f"task are {norms.tolist()}")
  return norms


def _merge_chunk(stack: FactorStack, index: list[int], fishers: Sequence[Mapping[str, Any]],
                 coef: np.ndarray, floor: float, dtype: np.dtype) -> MergedStack:
  """Fisher-weighted average of `stack`'s modules `index` (one jitted call); checks the Fishers."""
  names = [stack.modules[i] for i in index]
  f = np.stack([np.stack([np.asarray(t[m], dtype) for t in fishers]) for m in names])
  delta, valid = _merge_stack(jnp.asarray(f), jnp.asarray(stack.b[index], dtype),
                              jnp.asarray(stack.a[index], dtype), jnp.asarray(coef, dtype),
                              jnp.asarray(floor, dtype))
  valid = np.asarray(valid)
  if not valid.all():
    bad = names[int(np.argmin(valid))]
    raise ValueError(f"fisher: the Fisher of module `{bad}` has negative, NaN or inf "
                     "entries (a diagonal Fisher is a mean of squares)")
  return MergedStack(tuple(names), delta=delta)


def _merge_stacks(adapters: AdapterSet, fishers: Sequence[Mapping[str, Any]],
                  covered: Sequence[str], coef: np.ndarray, floor: float, dtype: np.dtype
                  ) -> tuple[list[MergedStack], list[str]]:
  """Every stack merged chunk by chunk, modules without Fishers averaged (l-weighted).

  Returns (merged stacks, averaged module names)."""
  n = len(adapters)
  out, averaged = [], []
  for stack, rows, rest in regmean.split_stacks(adapters, covered, dtype):
    out_dim, in_dim = stack.b.shape[2], stack.a.shape[-1]
    for index in regmean.module_chunks(rows, 2 * n * out_dim * in_dim * dtype.itemsize):
      out.append(_merge_chunk(stack, index, fishers, coef, floor, dtype))
    if rest:
      out.append(regmean.averaged_stack(stack, rest, coef, dtype))
      averaged += [stack.modules[i] for i in rest]
  return out, averaged


def fisher_merge(adapters: AdapterSet, base_weights: Mapping[str, Any] | None,
                 fishers: Sequence[Mapping[str, Any]], *, floor: float = 1e-6,
                 coefficients: Sequence[float] | None = None, normalize: bool = False,
                 dtype: str = "float32", modules_to_save: str = "error") -> MergeResult:
  """Fisher-weighted average of the adapters' modules, elementwise.

  Per entry, `delta* = sum_i l_i F~_i delta_i / sum_i l_i F~_i` with
  `F~_i = max(F_i, floor)` (Matena & Raffel's `fisher_floor`, default 1e-6,
  applied to every task); entries where all `l_i F~_i` are 0 (floor = 0) get
  the l-weighted average. Equal Fishers give the (l-weighted) average.

  Args:
    adapters: from `load_adapters`.
    base_weights: {"<module>.weight": array}, used to check that the modules
      fit the base; W0 cancels out of the merged update (None skips the check).
    fishers: one {module: F [out, in]} per adapter (from `task_fishers`).
      Modules in no dict get the plain average (with a warning).
    floor: >= 0, the lower bound applied to every Fisher entry.
    coefficients: the merging weights l_i (default: equal).
    normalize: divide l_i by the L2 norm of task i's Fisher over all merged
      modules (`normalize_fishers` of the authors' script).
    dtype: "float32" or "float64" (needs jax x64).
    modules_to_save: how non-LoRA tensors are merged (`orchestrate.merge_extra`).

  Returns:
    A dense `MergeResult` for `save_merged_weights` / `full_model.merged_model_weights`.

  Raises:
    ValueError naming the module: Fishers missing for some tasks, of the wrong
    shape, negative, NaN or inf.
  """
  if not floor >= 0.0:
    raise ValueError(f"fisher: floor must be >= 0, got {floor}")
  dt = decompose.compute_dtype(dtype)
  start = time.perf_counter()
  given = _coefficients(coefficients, len(adapters))
  regmean.check_base(adapters, base_weights)
  covered = regmean.check_statistics(adapters, fishers, "fisher", lambda oi: oi)
  extra = orchestrate.merge_extra(adapters, modules_to_save)
  norms = _fisher_norms(fishers, covered) if normalize and covered else None
  coef = given if norms is None else given / norms
  out, averaged = _merge_stacks(adapters, fishers, covered, coef, floor, dt)
  regmean.warn_averaged("fisher", averaged)
  stats = {"fisher_modules": len(covered), "averaged_modules": averaged,
           "fisher_norms": None if norms is None else norms.tolist()}
  settings = {"floor": floor, "coefficients": given.tolist(), "normalize": normalize,
              "dtype": dt.name}
  return regmean.result_for(adapters, out, "fisher", settings, stats, extra, modules_to_save,
                            start)
