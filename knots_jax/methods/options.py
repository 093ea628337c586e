"""Every merge option, declared once: name, type, default, valid range, help and who reads it.

`MergeConfig` is what to merge and how (it sits beside the method table it refers
to); what to read and write around the merge
(adapters, output, base model, cache, mesh) is `knots_jax.pipeline.JobConfig`.
`merge()`, the command line (its flags, `--help`, the summary), the
`knots_config.json` written beside every output and the search all take their
options from here, so adding one is one field below plus the code that uses it.

  >>> config = MergeConfig(method="knots_ties", scaling=0.6, top_k=20)
  >>> config.applicable()
  {'method': 'knots_ties', 'scaling': 0.6, 'top_k': 20.0, 'top_k_scope': 'model', ...}
  >>> MergeConfig(top_k=float("nan"))
  Traceback (most recent call last):
  ValueError: top_k must be a finite number, got nan

Options whose `applies` names single methods (Iso-CTS's `common_fraction`, ...)
are refused with any other method unless left at their default. Nothing here
imports JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from knots_jax import checks
from knots_jax.methods import registry

Applies = Callable[[registry.Method], bool]


def option(default: object, help: str, check: checks.Check, applies: Applies | None = None,
            only: tuple[str, ...] = ()) -> Any:
  """A dataclass field with its declaration: help text, check, the methods that read it.

  `applies`: a predicate over method rows (None: every method). `only`: the
  option belongs to these methods only, and another method refuses a
  non-default value.
  """
  if only:
    applies = lambda method: method.name in only  # noqa: E731
  return dataclasses.field(default=default, metadata={
      "help": help, "check": check, "applies": applies, "only": only})


def validate_fields(record: object) -> None:
  """Checks (and normalises in place) every field of a frozen dataclass declared with
  `option`: ValueError naming the field."""
  for field in dataclasses.fields(record):
    value = checks.named(field.name, field.metadata["check"], getattr(record, field.name))
    object.__setattr__(record, field.name, value)


def _method_name(value: object) -> str:
  if not isinstance(value, str) or value not in registry.METHODS:
    raise ValueError(f"{value!r} is unknown; valid methods: {', '.join(registry.METHODS)} "
                     "(`knots-jax methods` lists them with their papers)")
  return value


def _path(value: object) -> str:
  """`factors` (the QR route from the LoRA factors) or `dense`; `core` is the old name
  of `factors` (before Core Space's `core_*` methods took the word)."""
  value = "factors" if value == "core" else value
  if value not in ("factors", "dense"):
    raise ValueError(f"(the alignment path) must be `factors` or `dense`; got {value!r}")
  return value


def _uses_ties(m: registry.Method) -> bool:
  return m.combine == "ties"


# Factor methods with TIES on each factor tensor (their threshold and sign are per tensor:
# `top_k_scope` does not apply).
_FACTOR_TIES = ("dm_ties", "dm_dare_ties")


def uses_top_k(m: registry.Method) -> bool:
  """True if the method trims with TIES' top-K (entrywise TIES or per factor tensor)."""
  return _uses_ties(m) or m.name in _FACTOR_TIES


def _uses_dare(m: registry.Method) -> bool:
  return m.dare


def _uses_seed(m: registry.Method) -> bool:
  return m.dare or m.name == "mm_noise"


def _uses_alignment(m: registry.Method) -> bool:
  return m.knots


def TOP_K(value: object) -> float:  # noqa: N802 - a constant-like check
  """TIES' top-K: positive and at most 100 (> 1 is a percentage, <= 1 a fraction)."""
  value = checks.number(value)
  if not 0 < value <= 100:
    raise ValueError(f"must be positive and at most 100 (a percentage, or a fraction <= 1), "
                     f"got {value:g}")
  return value


DROP_RATE = checks.interval(0.0, 1.0, hi_open=True)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """The options of one merge, validated when made (ValueError naming the option)."""
  method: str = option(
      "knots_ties", "Merging method: ta, mean, ties, dare, dare_ties, or the same with the prefix "
      "knots_ (merge in the KnOTS-aligned space) or core_ (merge the Core Space's core "
      "matrices); or direct_merge, dm_ties, dm_dare, dm_dare_ties, mm_svd, mm_noise, iso_c, "
      "iso_cts, tsv_m, sftm (from the LoRA factors), knots_tsv_m, core_tsv_m, core_iso_c, core_iso_cts. `knots-jax methods` lists "
      "them with their papers.", _method_name)
  scaling: float = option(
      1.0, "alpha: multiplies the merged update (TIES: every kept value, before the disjoint "
      "mean; DM, MM: the weight of every adapter; SFTM: gamma). The paper searches 0.1 ... 1.0.",
      checks.number)
  weights: tuple[float, ...] = option(
      (), "One weight per adapter, in the adapters' order (comma-separated: 0.5,1.0,0.7); "
      "empty: every adapter weighs 1. Each method multiplies adapter i by scaling * w_i "
      "where its alpha acts (TA: sum w_i dW_i; TIES, DARE: the kept values before the "
      "disjoint mean; KnOTS: w_i diag(s) V_i^T; DM, MM: w_i B_i and w_i A_i; Iso-C, Iso-CTS, "
      "TSV-M, SFTM: the task update w_i dW_i before the method). docs/methods.md states each.",
      checks.number_list)
  top_k: float = option(
      30.0, "TIES: the share of entries kept per task, in (0, 100]; > 1 means percent (30 = 30%), "
      "1 or 100 keep everything (dm_ties, dm_dare_ties: of each factor tensor B_i, A_i). The "
      "paper searches 10 ... 100.", TOP_K, uses_top_k)
  top_k_scope: str = option(
      "model", "TIES threshold and majority sign over the whole `model` (the KnOTS reference) or "
      "per `layer` (per module, as PEFT, mergekit and the Core Space paper).",
      checks.one_of(("model", "layer")), _uses_ties)
  drop_rate: float = option(
      0.9, "DARE: probability p in [0, 1) of dropping an entry (dm_dare, dm_dare_ties: of each "
      "factor); kept ones are scaled by 1/(1-p).",
      DROP_RATE, _uses_dare)
  seed: int = option(
      0, "DARE (and mm_noise): random seed in [0, 2**32); the result is deterministic given it.",
      checks.seed, _uses_seed)
  common_fraction: float = option(
      0.8, "Iso-CTS (iso_cts, core_iso_cts): the share of the space given to the common "
      "subspace, in [0, 1].", checks.fraction, only=("iso_cts", "core_iso_cts"))
  tsv_keep: int = option(
      0, "TSV-M (tsv_m): singular components kept per task; 0 = min(out, in) // n, the paper's "
      "default.", checks.non_negative_int, only=("tsv_m",))
  output_rank: int = option(
      0, "mm_svd: the rank of the merged LoRA; 0 = the largest adapter rank.",
      checks.non_negative_int, only=("mm_svd",))
  eta: float = option(
      1.0, "SFTM (sftm): the share of each task's entries kept by its top-eta trim, in (0, 1]; "
      "1 = no trim (computed from the factors); < 1 trims the dense updates (memory: n dense "
      "updates of one stack at a time).", checks.interval(0.0, 1.0, lo_open=True),
      only=("sftm",))
  noise: str = option(
      "moments", "mm_noise: how the cross term M = L_DM - L_MM is simulated: `moments`, "
      "N_ij ~ N(mean(M), std(M)) as the paper samples it (LoRA Merging with SVD, §4), or "
      "`norm`, zero-mean Gaussian noise scaled to ||M||_F (this package's earlier reading).",
      checks.one_of(("moments", "norm")), only=("mm_noise",))
  path: str = option(
      "factors", "KnOTS alignment from the LoRA factors (`factors`: QR + the SVD of a small "
      "matrix; fast, exact) or from the dense updates (`dense`, the reference, slow). `core` is "
      "the old name of `factors`.", _path, _uses_alignment)
  concat: str = option(
      "columns", "KnOTS concatenation: `columns` ([dW_1 ... dW_n], the paper) or `rows` "
      "(ablation).", checks.one_of(("columns", "rows")), _uses_alignment)
  tol: float = option(
      1e-5, "KnOTS: components with singular value <= tol are dropped (reference: 1e-5); a "
      "finite number >= 0.", checks.interval(0.0, float("inf"), hi_open=True), _uses_alignment)
  dtype: str = option(
      "float32", "Computation dtype: float32, or float64 (enables jax x64).",
      checks.one_of(("float32", "float64")))
  modules_to_save: str = option(
      "error", "Non-LoRA tensors in the adapters (modules_to_save): `error` (refuse), `mean`, "
      "`first` (take the first adapter's), `drop`.",
      checks.one_of(("error", "mean", "first", "drop")))

  def __post_init__(self):
    validate_fields(self)
    for field in dataclasses.fields(self):
      only = field.metadata["only"]
      if only and self.method not in only and getattr(self, field.name) != field.default:
        raise ValueError(f"{field.name}={getattr(self, field.name)!r} applies to "
                         f"{' and '.join(only)}, not to `{self.method}`")

  @property
  def spec(self) -> registry.Method:
    """The method's row of the table."""
    return registry.METHODS[self.method]

  def task_scaling(self, n: int):
    """alpha for every task: `scaling` (a float) without `weights`, else the [n] vector
    scaling * w_i (ValueError unless there is one weight per adapter)."""
    if not self.weights:
      return self.scaling
    if len(self.weights) != n:
      raise ValueError(f"weights: {len(self.weights)} weight(s) for {n} adapter(s); give one "
                       "per adapter, in the adapters' order")
    return self.scaling * np.asarray(self.weights)

  def task_weights(self, n: int):
    """w_i for methods that weigh the tasks' updates before their own alpha (a [n] vector,
    all ones without `weights`)."""
    if not self.weights:
      return np.ones(n)
    self.task_scaling(n)   # the length check
    return np.asarray(self.weights)

  def applies(self, name: str) -> bool:
    """Whether the method reads option `name`."""
    predicate = _FIELDS[name].metadata["applies"]
    return predicate is None or predicate(self.spec)

  def applicable(self) -> dict[str, object]:
    """The options this method reads, with their values (the summary, knots_config.json)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if self.applies(f.name)}

  def to_dict(self) -> dict[str, object]:
    return dataclasses.asdict(self)

  def replace(self, **changes: object) -> "MergeConfig":
    """A copy with `changes`, validated; unknown names are refused with the valid ones."""
    check_names(changes)
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_options(cls, options: Mapping[str, object], source: str = "merge()") -> "MergeConfig":
    """From a mapping of option names; unknown names are refused (ValueError naming `source`)."""
    check_names(options, source)
    return cls(**options)


_FIELDS = {f.name: f for f in dataclasses.fields(MergeConfig)}
OPTIONS: tuple[str, ...] = tuple(_FIELDS)


def check_names(options: Mapping[str, object], source: str = "merge()") -> None:
  """ValueError for names that are not merge options, listing the valid ones."""
  unknown = [k for k in options if k not in _FIELDS]
  if unknown:
    raise ValueError(f"{source}: unknown merge option(s) {', '.join(map(repr, unknown))}; "
                     f"valid: {', '.join(OPTIONS)}")


def help_text(name: str) -> str:
  return _FIELDS[name].metadata["help"]


def default(name: str) -> object:
  return _FIELDS[name].default


def users(name: str) -> list[str]:
  """The methods that read option `name`."""
  predicate = _FIELDS[name].metadata["applies"]
  return [m for m, row in registry.METHODS.items() if predicate is None or predicate(row)]
