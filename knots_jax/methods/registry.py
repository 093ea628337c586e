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

import dataclasses
from typing import Callable, Mapping

import jax.numpy as jnp

from knots_jax.methods import svd_family


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table: which values are merged, and how.

  `combine` "sum" (task arithmetic), "mean" and "ties" act entry by entry (after
  DARE when `dare`) on the values of the method's space: the dense task
  updates (full space), KnOTS' aligned diag(s) V_i^T (`knots`) or the core
  matrices (`core`). "factors": a function of the LoRA factors (full space).
  "matrices": a function of each task's whole matrix in the KnOTS or core space.
  """
  knots: bool        # merge KnOTS' aligned representations
  combine: str       # "sum", "mean", "ties", "factors" or "matrices"
  dare: bool         # DARE random drop + rescale first
  reference: str
  # combine == "factors": (b [L,n,out,r], a [L,n,r,in], hyper, modules) -> (b_m, a_m) or delta
  factors: Callable | None = None
  core: bool = False  # merge the core matrices of the Core Space
  # combine == "matrices": (x [L,n,R,C], rank [L], hyper) -> merged [L,R,C]
  matrices: Callable | None = None
  # The merged update is exactly alpha times the alpha = 1 merge (a search over
  # alpha then merges once and rescales). False where alpha enters twice.
  homogeneous: bool = True

  @property
  def space(self) -> str:
    """Where the method merges: "knots", "core" or "full"."""
    return "knots" if self.knots else "core" if self.core else "full"


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


def _uniform_weights(b, scaling):
  return jnp.full((b.shape[1],), scaling, b.dtype)


def _sftm(b, a, hyper, modules):
  """SFTM from the factors (eta = 1), or with its top-eta trim on the dense updates."""
  if hyper["eta"] == 1.0:
    return svd_family.sftm_stack(b, a, gamma=hyper["scaling"], modules=modules)[:2]
  return svd_family.sftm_dense_stack(jnp.matmul(b, a), eta=hyper["eta"], gamma=hyper["scaling"],
                                      modules=modules)[0]


# Methods computed from the LoRA factors of each module (knots_jax/methods/svd_family.py,
# docs/methods.md); `scaling` is their alpha (SFTM: gamma).
_FACTOR_METHODS = {
    "direct_merge": (lambda b, a, hyper, modules: svd_family.direct_merge_stack(
        b, a, _uniform_weights(b, hyper["scaling"])),
        f"Direct merge of A and B (with cross terms), {_LORA_SVD}"),
    "mm_svd": (lambda b, a, hyper, modules: svd_family.mm_svd_stack(
        b, a, _uniform_weights(b, hyper["scaling"]), rank=hyper["output_rank"] or None),
        f"Multiplied merge truncated to the LoRA rank, SVD_r(L_MM), {_LORA_SVD}"),
    "mm_noise": (lambda b, a, hyper, modules: svd_family.cross_term_noise_stack(
        b, a, _uniform_weights(b, hyper["scaling"]), hyper["seed"], modules),
        f"Multiplied merge + Gaussian noise of the cross term's norm (ablation), {_LORA_SVD}"),
    "iso_c": (lambda b, a, hyper, modules: svd_family.iso_c_stack(b, a, scaling=hyper["scaling"]),
              _ISO_C),
    "iso_cts": (lambda b, a, hyper, modules: svd_family.iso_cts_stack(
        b, a, common_fraction=hyper["common_fraction"], scaling=hyper["scaling"]), _ISO_CTS),
    "tsv_m": (lambda b, a, hyper, modules: svd_family.tsv_merge_stack(
        b, a, keep=hyper["tsv_keep"] or None, scaling=hyper["scaling"]), _TSV),
    "sftm": (_sftm, "SFTM, Qiu et al. 2025 (arXiv:2502.10698)"),
}


# Methods of each task's whole matrix in a small space: the core matrices M_i
# (`core_*`) or KnOTS' V_i^T (`knots_tsv_m`); `rank` is the size of that space.
_MATRIX_METHODS = {
    "tsv_m": (lambda x, rank, hyper: svd_family.tsv_merge_ranked_stack(
        x, rank, scaling=hyper["scaling"]), _TSV),
    "iso_c": (lambda x, rank, hyper: svd_family.iso_c_dense_stack(x, scaling=hyper["scaling"]),
              _ISO_C),
    "iso_cts": (lambda x, rank, hyper: svd_family.iso_cts_dense_stack(
        x, common_fraction=hyper["common_fraction"], scaling=hyper["scaling"]), _ISO_CTS),
}


# Factor methods where alpha weighs both B and A (or the cross term's norm): their
# update is quadratic in alpha, not proportional to it.
_QUADRATIC = ("direct_merge", "mm_noise")


# Options of single methods: name -> (default, the methods that use it).
METHOD_OPTIONS: Mapping[str, tuple[object, tuple[str, ...]]] = {
    "common_fraction": (0.8, ("iso_cts", "core_iso_cts")),
    "tsv_keep": (0, ("tsv_m",)),
    "output_rank": (0, ("mm_svd",)),
    "eta": (1.0, ("sftm",)),
}


def _knots_tsv(v, rank, hyper):
  """TSV-M on KnOTS' V_i^T keeping every component. For generic LoRAs (sum r_i <=
  out) the V_i^T are partial isometries (sum_i V_i^T V_i = I_K, ranks adding up),
  so all their singular values are 1 and a truncation would pick an arbitrary
  subspace; keeping all leaves the whitening, which is well defined."""
  return svd_family.tsv_merge_dense_stack(v, keep=min(v.shape[-2:]), scaling=hyper["scaling"])


METHODS: Mapping[str, Method] = {
    **{name: Method(False, c, d, ref) for name, (c, d, ref) in _BASE.items()},
    **{f"knots_{name}": Method(True, c, d, _KNOTS + ref) for name, (c, d, ref) in _BASE.items()},
    **{name: Method(False, "factors", False, ref, fn, homogeneous=name not in _QUADRATIC)
       for name, (fn, ref) in _FACTOR_METHODS.items()},
    "knots_tsv_m": Method(True, "matrices", False, _KNOTS + _TSV + " on V_i^T, all components",
                          matrices=_knots_tsv),
    **{f"core_{name}": Method(False, c, d, _CORE + ref, core=True)
       for name, (c, d, ref) in _BASE.items()},
    **{f"core_{name}": Method(False, "matrices", False, _CORE + ref, core=True, matrices=fn)
       for name, (fn, ref) in _MATRIX_METHODS.items()},
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method `{name}`; valid methods: {', '.join(METHODS)}")
  return METHODS[name]
