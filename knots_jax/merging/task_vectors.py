"""Merging full fine-tuned models (task vectors, no LoRA): SFTM's rules, TA, TIES.

A task vector is tau_i = P_i - P_pre, per tensor. `merge_task_vectors` returns
the merged parameters P.

SFTM ("Superpose Singular Features for Model Merging", Qiu et al.,
arXiv:2502.10698) treats tensors by their role (§3.3, Algorithm 2), chosen here
by name and shape (`tensor_rule`, in this order). trim_eta(tau_i) keeps the top
eta entries of each task's tensor by magnitude (Algorithm 2 lines 5 and 11):

* "copy": non-floating tensors (e.g. `position_ids` buffers) are taken from
  the base model; every fine-tuned model must hold the same values.
* "norm": LayerNorm / RMSNorm parameters, weight and bias (a dotted name part
  containing "norm", or named `ln`, `ln1`, `ln_f`, `ln_post`, ...):
  P = P_pre + mean_i trim_eta(tau_i) (Algorithm 2 lines 11, 13), or with
  `norm_trim=False` P = mean_i P_i (§3.3's "averaging").
* "additive": biases, embeddings (a name part containing "embed", or `wte`,
  `wpe`, `shared`), and the other tensors that are neither 2-D nor conv kernels:
  P = P_pre + gamma * sum_i trim_eta(tau_i) (Algorithm 2 lines 11, 15).
* "matrix": the remaining 2-D weights (linear maps) and the `weight`s of 3 or
  more dimensions, read as PyTorch convolution kernels [out, in, *kernel] (e.g.
  OpenCLIP's `visual.conv1.weight`, CLIP's `patch_embedding.weight`): P = P_pre
  + gamma * M with M = SFTM of the tau_i after the per-task top-eta trim
  (`svd_family.sftm_dense`); a kernel is merged as the matrix [out, in * prod
  kernel] and reshaped back (§3.3: "reshaping the convolutional kernels into a
  matrix"). Flax's [*kernel, in, out] `kernel`s are not matched: give them a rule.

`rules` overrides the rule of named tensors where the patterns guess wrong
(e.g. a tied `lm_head.weight` as "additive"). For comparison, "ta", "mean",
"ties", "dare" and "dare_ties" merge every floating tensor the same way, as in
their papers and DESIGN.md §3 (TIES: one top-K threshold per task over the whole
model): P = P_pre + merged, with `gamma` as their scaling coefficient alpha.
"""

from __future__ import annotations

import collections
import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from knots_jax.alignment import decompose
from knots_jax.merging import kernels
from knots_jax.merging.combine import combine
from knots_jax.methods.entrywise import kth_rank
from knots_jax.methods.options import MergeConfig
from knots_jax.methods import registry

RULES = ("copy", "norm", "additive", "matrix")
ENTRYWISE = ("ta", "mean", "ties", "dare", "dare_ties")
METHODS = ("sftm",) + ENTRYWISE

_NORM_PART = re.compile(r"(norm|^ln(_\w+|\d*)$)", re.IGNORECASE)
_EMBED_PART = re.compile(r"(embed|^wte$|^wpe$|^shared$)", re.IGNORECASE)


def tensor_rule(name: str, value: np.ndarray) -> str:
  """How SFTM merges the tensor `name`: "copy", "norm", "additive" or "matrix"."""
  value = np.asarray(value)
  if not np.issubdtype(value.dtype, np.floating):
    return "copy"
  parts = name.split(".")
  module = parts[:-1] if len(parts) > 1 and parts[-1] in ("weight", "bias", "scale") else parts
  if any(_NORM_PART.search(p) for p in module):
    return "norm"
  if parts[-1] == "bias" or parts[-1].endswith("_bias"):
    return "additive"
  if value.ndim >= 3 and parts[-1] == "weight":   # a conv kernel, patch embeddings included
    return "matrix"
  if any(_EMBED_PART.search(p) for p in parts):
    return "additive"
  return "matrix" if value.ndim == 2 else "additive"


def tensor_rules(base: Mapping[str, np.ndarray],
                 rules: Mapping[str, str] | None = None) -> dict[str, str]:
  """The rule of every tensor of `base` (`tensor_rule`, then the `rules` overrides)."""
  rules = dict(rules or {})
  unknown = sorted(set(rules) - set(base))
  if unknown:
    raise ValueError(f"merge_task_vectors: `rules` names tensors the model does not have: "
                     f"{unknown[:5]}")
  bad = {k: v for k, v in rules.items() if v not in RULES}
  if bad:
    raise ValueError(f"merge_task_vectors: unknown rules {bad}; valid rules: {', '.join(RULES)}")
  out = {name: rules.get(name, tensor_rule(name, value)) for name, value in base.items()}
  for name, rule in out.items():
    if rule == "matrix" and np.ndim(base[name]) < 2:
      raise ValueError(f"merge_task_vectors: `{name}` has shape {np.shape(base[name])}; "
                       "the rule `matrix` (SFTM) needs a 2-D tensor or a conv kernel "
                       "[out, in, *kernel]")
  return out


def _check_models(base: Mapping[str, np.ndarray],
                  finetuned: Sequence[Mapping[str, np.ndarray]]) -> None:
  """Raises unless `finetuned` is a non-empty list of models with the base's names and shapes."""
  if not isinstance(finetuned, (list, tuple)) or not finetuned:
    raise ValueError("merge_task_vectors: `finetuned` must be a non-empty list of state dicts")
  if not base:
    raise ValueError("merge_task_vectors: the base state dict is empty")
  for i, model in enumerate(finetuned):
    missing, extra = sorted(set(base) - set(model)), sorted(set(model) - set(base))
    if missing or extra:
      raise ValueError(f"merge_task_vectors: fine-tuned model {i} does not match the base: "
                       f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in base.items():
      if np.shape(model[name]) != np.shape(value):
        raise ValueError(f"merge_task_vectors: `{name}` has shape {np.shape(model[name])} in "
                         f"fine-tuned model {i} and {np.shape(value)} in the base")


def _as_matrix(x: np.ndarray) -> np.ndarray:
  """[n, ...] -> [n, R, C]: 2-D tensors as they are, others as one row (or rows x rest)."""
  n = x.shape[0]
  if x.ndim == 3:
    return x
  if x.ndim <= 2:
    return x.reshape(n, 1, -1)
  return x.reshape(n, x.shape[1], -1)


def _by_shape(names: Sequence[str], tau: Mapping[str, np.ndarray]) -> list[list[str]]:
  """Tensor names grouped by their [R, C] shape (one stack each), in sorted order."""
  groups = collections.defaultdict(list)
  for name in sorted(names):
    groups[_as_matrix(tau[name][:1]).shape[1:]].append(name)
  return [groups[k] for k in sorted(groups)]


def _entrywise(names, tau, spec, gamma, top_k, drop_rate, seed, top_k_scope, dt):
  """TA / mean / TIES / DARE over the tensors `names` (TIES thresholds over all of them)."""
  stacks = _by_shape(names, tau)
  reps = [jnp.asarray(np.stack([_as_matrix(tau[n]) for n in group]), dt) for group in stacks]
  valids = [jnp.ones(r.shape[:1] + r.shape[2:3], bool) for r in reps]
  config = MergeConfig(method=spec.name, scaling=gamma, top_k=top_k, drop_rate=drop_rate,
                       seed=seed, top_k_scope=top_k_scope)
  merged, _ = combine(reps, valids, stacks, config)
  return {name: np.asarray(m[l]).reshape(tau[name].shape[1:])
          for group, m in zip(stacks, merged) for l, name in enumerate(group)}


def _sftm(names, tau, gamma, eta, dt):
  """gamma * M of SFTM for the matrices and conv kernels `names`, one stack per shape.

  A kernel [out, in, *kernel] is merged as the matrix [out, in * prod kernel]
  (§3.3) and reshaped back.
  """
  out = {}
  for group in _by_shape(names, tau):
    delta = jnp.asarray(np.stack([_as_matrix(tau[n]) for n in group]), dt)
    update, _ = kernels.sftm_dense_stack(delta, eta=eta, gamma=gamma, modules=group)
    out.update({name: np.asarray(update[l]).reshape(tau[name].shape[1:])
                for l, name in enumerate(group)})
  return out


def _trim(tau: np.ndarray, eta: float) -> np.ndarray:
  """tau [n, ...] with each task's top-eta entries by magnitude kept (Algorithm 2 line 11).

  The rule of `svd_family.trim_top` (TIES' kthvalue threshold), in float64 NumPy
  like the sums it feeds; eta = 1 keeps all.
  """
  n = tau.shape[0]
  flat = np.abs(tau.reshape(n, -1))
  k = kth_rank(flat.shape[1], eta)
  if k == 0:
    return tau
  kth = np.sort(flat, axis=1)[:, k - 1].reshape((n,) + (1,) * (tau.ndim - 1))
  return np.where(np.abs(tau) >= kth, tau, 0)


def _check_options(method: str, gamma: float, eta: float, rules: Mapping[str, str] | None,
                   norm_trim: bool = True) -> None:
  """Raises for an unknown method, a non-finite gamma, eta outside (0, 1], misplaced rules
  or norm_trim."""
  if method not in METHODS:
    raise ValueError(f"merge_task_vectors: unknown method `{method}`; valid: {', '.join(METHODS)}")
  if not np.isfinite(gamma):
    raise ValueError(f"merge_task_vectors: gamma must be finite; got {gamma}")
  if not 0.0 < eta <= 1.0:
    raise ValueError(f"merge_task_vectors: eta must be in (0, 1]; got {eta}")
  if method != "sftm" and rules:
    raise ValueError("merge_task_vectors: `rules` only apply to method `sftm`")
  if not isinstance(norm_trim, (bool, np.bool_)):
    raise ValueError(f"merge_task_vectors: norm_trim must be True or False; got {norm_trim!r}")
  if method != "sftm" and not norm_trim:
    raise ValueError("merge_task_vectors: `norm_trim` only applies to method `sftm`")


def _rules_for(method: str, base: Mapping[str, np.ndarray],
               rules: Mapping[str, str] | None) -> dict[str, str]:
  """{name: rule}: SFTM's rules, or for the entrywise methods "copy" / "additive" only."""
  if method == "sftm":
    return tensor_rules(base, rules)
  return {name: "copy" if tensor_rule(name, value) == "copy" else "additive"
          for name, value in base.items()}


def _copied(base: Mapping[str, np.ndarray], finetuned: Sequence[Mapping[str, np.ndarray]],
            rule: Mapping[str, str]) -> dict[str, np.ndarray]:
  """The "copy" tensors of `base`; raises when a fine-tuned model holds other values."""
  copied = [name for name, r in rule.items() if r == "copy"]
  for name in copied:
    if any(not np.array_equal(model[name], base[name]) for model in finetuned):
      raise ValueError(f"merge_task_vectors: non-floating tensor `{name}` differs between the "
                       "models; it cannot be merged")
  return {name: np.asarray(base[name]) for name in copied}


def _task_vectors(base: Mapping[str, np.ndarray], finetuned: Sequence[Mapping[str, np.ndarray]],
                  names: Sequence[str]) -> dict[str, np.ndarray]:
  """{name: tau [n, ...]}: P_i - P_pre of every model, float64."""
  return {name: np.stack([np.asarray(m[name], np.float64) for m in finetuned])
          - np.asarray(base[name], np.float64) for name in names}


def _sftm_updates(floating: Sequence[str], rule: Mapping[str, str], tau: Mapping[str, np.ndarray],
                  gamma: float, eta: float, dt, norm_trim: bool = True) -> dict[str, np.ndarray]:
  """P - P_pre of every floating tensor under its SFTM rule (matrix, additive, norm).

  Algorithm 2: the trim of each tau_i (line 11) comes before the sum (line 15)
  and, with `norm_trim`, before the mean (line 13).
  """
  matrices = [name for name in floating if rule[name] == "matrix"]
  updates = _sftm(matrices, tau, gamma, eta, dt) if matrices else {}
  updates.update({name: gamma * _trim(tau[name], eta).sum(0) for name in floating
                  if rule[name] == "additive"})
  updates.update({name: (_trim(tau[name], eta) if norm_trim else tau[name]).mean(0)
                  for name in floating if rule[name] == "norm"})
  return updates


def merge_task_vectors(
    base: Mapping[str, np.ndarray],
    finetuned: Sequence[Mapping[str, np.ndarray]],
    method: str = "sftm",
    *,
    gamma: float = 1.0,
    eta: float = 1.0,
    top_k: float = 30,
    drop_rate: float = 0.9,
    seed: int = 0,
    top_k_scope: str = "model",
    rules: Mapping[str, str] | None = None,
    norm_trim: bool = True,
    dtype: str = "float32",
) -> dict[str, np.ndarray]:
  """Merges fully fine-tuned models of one base model; returns the merged state dict.

  Args:
    base: the pre-trained parameters {name: array}.
    finetuned: the fine-tuned models, each with the same names and shapes.
    method: "sftm" (per-tensor rules, see the module docstring) or one of
      "ta", "mean", "ties", "dare", "dare_ties" on every floating tensor.
    gamma: the scaling coefficient: SFTM's gamma, TA / TIES's alpha.
    eta: SFTM's trim: the share of entries (not of singular components) of each
      task's tensor kept, top |x| (Algorithm 2 lines 5 and 11: matrices, conv
      kernels, biases, embeddings, norms); 1 keeps all. The paper searches
      0.1 ... 0.5 and finds eta < 0.4 best on ViT-B/32 (§4.3).
    top_k, drop_rate, seed, top_k_scope: TIES / DARE, as in `knots_jax.merge`.
    rules: {name: rule} overrides of `tensor_rule` (SFTM only).
    norm_trim: SFTM's normalization layers: True (default) averages the trimmed
      task vectors, P_pre + mean_i trim_eta(tau_i), as Algorithm 2 does (its
      line 11 "Keep top eta parameters by magnitude in each tau_i" precedes the
      line 13 mean for every "bias, embedding, normalization layer"); False
      averages the parameters untrimmed, mean_i P_i, as §3.3 reads ("we merge
      them by averaging the normalization parameters of the individual
      tasks"). Algorithm 2 is the one the paper gives step by step (and
      DESIGN.md takes it for the order of steps); the two agree at eta = 1.
    dtype: "float32" or "float64" (needs jax x64) for the computation; the
      result has the base's dtypes.
  """
  _check_options(method, gamma, eta, rules, norm_trim)
  _check_models(base, finetuned)
  dt = decompose.compute_dtype(dtype)
  rule = _rules_for(method, base, rules)
  merged = _copied(base, finetuned, rule)
  floating = [name for name, r in rule.items() if r != "copy"]
  tau = _task_vectors(base, finetuned, floating)
  if method == "sftm":
    updates = _sftm_updates(floating, rule, tau, gamma, eta, dt, norm_trim)
  else:
    spec = registry.get_method(method)
    updates = _entrywise(floating, tau, spec, gamma, top_k, drop_rate, seed, top_k_scope, dt)
  for name in floating:   # mean_i P_i = P_pre + mean_i tau_i for the norms
    merged[name] = (np.asarray(base[name], np.float64) + updates[name]).astype(
        np.asarray(base[name]).dtype)
  return {name: merged[name] for name in base}
