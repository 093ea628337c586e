"""The method table: one row per merging method, with its paper and the space it merges in.

Pure data, no JAX: the command line lists and checks methods without importing
it. The computation of each row lives where the one jit boundary is
(`knots_jax.merging.kernels`); `knots_jax.methods.options.MergeConfig` says which
options each row reads. docs/methods.md is the same table with the sections and
equations of the papers.

  >>> get_method("knots_ties").space
  'knots'
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

SPACES = ("full", "knots", "core")
COMBINES = ("sum", "mean", "ties", "factors", "matrices")


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table: which values are merged, and how.

  `combine` "sum" (task arithmetic), "mean" and "ties" act entry by entry (after
  DARE when `dare`) on the values of the method's `space`: the dense task
  updates ("full"), KnOTS' aligned diag(s) V_i^T ("knots") or the Core Space's
  core matrices ("core"). "factors": a function of the LoRA factors (full
  space; with `dare`, DARE on each factor first: dm_dare, dm_dare_ties).
  "matrices": a function of each task's whole matrix in the KnOTS or
  core space.
  """
  name: str
  space: str          # "full", "knots" or "core"
  combine: str        # "sum", "mean", "ties", "factors" or "matrices"
  dare: bool          # DARE random drop + rescale first
  reference: str
  # The merged update is exactly alpha times the alpha = 1 merge (a search over
  # alpha then merges once and rescales). False where alpha enters twice.
  homogeneous: bool = True

  @property
  def knots(self) -> bool:
    """Merges KnOTS' aligned representations (needs the joint decomposition)."""
    return self.space == "knots"

  @property
  def core(self) -> bool:
    """Merges the Core Space's core matrices."""
    return self.space == "core"


_BASE = {
    "ta": ("sum", False, "Task arithmetic, Ilharco et al. 2023 (arXiv:2212.04089)"),
    "mean": ("mean", False, "Plain averaging of the task updates"),
    "ties": ("ties", False, "TIES-Merging, Yadav et al. 2023 (arXiv:2306.01708)"),
    "dare": ("sum", True, "DARE, Yu et al. 2024 (arXiv:2311.03099), then task arithmetic"),
    "dare_ties": ("ties", True, "DARE then TIES (Yu et al. 2024; Yadav et al. 2023)"),
}
_KNOTS = "KnOTS, Stoica et al. 2025 (arXiv:2410.19735) + "
_CORE = "Core Space, Panariello et al. 2025 (arXiv:2509.17786) + "
_LORA_SVD = "'LoRA Merging with SVD' (Tang et al., ICML 2025 workshop)"
_TSV = "TSV-M, Gargiulo et al. 2025 (arXiv:2412.00081)"
_ISO_C = "Iso-C, Marczak et al. 2025 (arXiv:2502.04959)"
_ISO_CTS = "Iso-CTS, Marczak et al. 2025 (arXiv:2502.04959)"

# Methods computed from the LoRA factors of each module (methods/svd_family.py);
# `scaling` is their alpha (SFTM: gamma). direct_merge, its TIES / DARE variants and
# mm_noise weigh both factors (or the cross term's norm) by alpha: quadratic, not
# proportional.
_DM_OF = f"merged separately, then B_m A_m: DM of {_LORA_SVD} §3.2, Table 1"
_FACTOR_METHODS = {
    "direct_merge": (f"Direct merge of A and B (with cross terms), {_LORA_SVD}", False),
    "dm_ties": (f"TIES (Yadav et al. 2023, arXiv:2306.01708) per factor tensor, B_i and A_i "
                f"{_DM_OF}", False),
    "dm_dare": (f"DARE (Yu et al. 2024, arXiv:2311.03099) on B_i and A_i, {_DM_OF}", False),
    "dm_dare_ties": (f"DARE then TIES per factor tensor, B_i and A_i {_DM_OF}", False),
    "mm_svd": (f"Multiplied merge truncated to the LoRA rank, SVD_r(L_MM), {_LORA_SVD}", True),
    "mm_noise": (f"Multiplied merge + Gaussian noise of the cross term's norm (ablation), "
                 f"{_LORA_SVD}", False),
    "iso_c": (_ISO_C, True),
    "iso_cts": (_ISO_CTS, True),
    "tsv_m": (_TSV, True),
    "sftm": ("SFTM, Qiu et al. 2025 (arXiv:2502.10698)", True),
}

# Factor methods that start with DARE's drop and rescale (of each factor).
_DARE_FACTOR_METHODS = ("dm_dare", "dm_dare_ties")

# Methods of each task's whole matrix in the core space (`core_*`).
_CORE_MATRIX_METHODS = {"tsv_m": _TSV, "iso_c": _ISO_C, "iso_cts": _ISO_CTS}


def _table() -> dict[str, Method]:
  rows = [Method(name, "full", c, d, ref) for name, (c, d, ref) in _BASE.items()]
  rows += [Method(f"knots_{name}", "knots", c, d, _KNOTS + ref)
           for name, (c, d, ref) in _BASE.items()]
  rows += [Method(name, "full", "factors", name in _DARE_FACTOR_METHODS, ref,
                  homogeneous=homogeneous)
           for name, (ref, homogeneous) in _FACTOR_METHODS.items()]
  rows.append(Method("knots_tsv_m", "knots", "matrices", False,
                     _KNOTS + _TSV + " on V_i^T, all components"))
  rows += [Method(f"core_{name}", "core", c, d, _CORE + ref) for name, (c, d, ref) in _BASE.items()]
  rows += [Method(f"core_{name}", "core", "matrices", False, _CORE + ref)
           for name, ref in _CORE_MATRIX_METHODS.items()]
  return {row.name: row for row in rows}


METHODS: Mapping[str, Method] = _table()


def get_method(name: str) -> Method:
  """The row of `name`; ValueError listing the valid names otherwise."""
  if name not in METHODS:
    raise ValueError(f"unknown method `{name}`; valid methods: {', '.join(METHODS)}")
  return METHODS[name]
