"""The settings the papers report, as named presets of `MergeConfig`.

A preset fixes what its paper (or its authors' published configuration) fixes
and leaves the rest at the defaults. Where a paper only gives a search grid,
the preset says so and the value is the grid's default: search the rest
(`evaluation.search.linear_search`). Pure data, no JAX: the command line lists
and applies presets without importing it.

  knots-jax merge --config configs/merge.py:knots_vit_b32_ties --config.adapters=...
  >>> PRESETS["sftm_vit_b32"].config().eta
  0.2

docs/methods.md ("Presets") is the same table.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from knots_jax.methods.options import MergeConfig, check_names


@dataclasses.dataclass(frozen=True)
class Preset:
  """Options of one merge as a paper reports them, and where it says so."""
  name: str
  options: Mapping[str, object]
  source: str      # paper, section / table (or the authors' file)
  note: str = ""   # what the source does not fix

  def config(self, **changes: object) -> MergeConfig:
    """The preset as a validated `MergeConfig`, with `changes` on top."""
    return MergeConfig.from_options({**self.options, **changes}, source=f"preset {self.name}")


_KNOTS = "KnOTS (Stoica et al., ICLR 2025)"
_CORE = "Core Space (Panariello et al., NeurIPS 2025), authors' code apanariello4/core-space-merging"

_ROWS = (
    Preset("knots_vit_b32_ties",
           dict(method="knots_ties", top_k=30, top_k_scope="model", concat="columns", tol=1e-5),
           f"{_KNOTS}, Tables 1, 2, 4 and App. C: KnOTS-TIES, top-K over the whole model, "
           "column-wise concatenation; top-K 30 is App. C's default",
           "α and top-K are searched in the paper (α 0.1…1.0, then top-K 10…100); the values "
           "it picked are not reported"),
    Preset("knots_vit_b32_dare_ties",
           dict(method="knots_dare_ties", top_k=100, drop_rate=0.1, concat="columns", tol=1e-5),
           f"{_KNOTS}, Tables 1, 2 and 4 (KnOTS-DARE-TIES with top-K 100, p 0.1, as the "
           "authors' reference implementation runs it)",
           "α is searched (0.1…1.0); the paper runs DARE with three seeds and reports the best"),
    Preset("knots_llama_nli_ties",
           dict(method="knots_ties", top_k=30, top_k_scope="model"),
           f"{_KNOTS}, Table 3 (six Llama-3-8B NLI LoRAs), App. C's defaults",
           "α and top-K are searched as for ViT"),
    Preset("core_space_ties",
           dict(method="core_ties", top_k_scope="layer"),
           f"{_CORE}: TIES in the core space with thresholds and signs per layer "
           "(`representation='matrix_per_layer'`)",
           "α and top-K are searched; KnOTS' own TIES is per model (`top_k_scope=model`)"),
    Preset("core_space_vit_b32_tsv",
           dict(method="core_tsv_m", scaling=0.2),
           f"{_CORE}, configs/vitB_r16_core_tsv.py: TSV-M in the core space, α 0.2 "
           "(ViT-B/32, 8 rank-16 LoRAs)"),
    Preset("core_space_vit_b32_dare_ties",
           dict(method="dare_ties", scaling=0.3, top_k=10, drop_rate=0.1, top_k_scope="layer"),
           f"{_CORE}, configs/vitB_r16_full_dare_ties.py: DARE-TIES on the full updates, "
           "α 0.3, top-K 10, p 0.1, per layer (ViT-B/32, 8 rank-16 LoRAs)"),
    Preset("sftm_vit_b32",
           dict(method="sftm", scaling=0.7, eta=0.2),
           "SFTM (Qiu et al., arXiv:2502.10698), §5 'Hyperparameter Sensitivity', Fig. 1(c, d): "
           "best with γ < 0.8 and η < 0.4 on ViT-B/32 (grid γ 0.5…1.2, η 0.1…0.5)",
           "the paper gives ranges, not one optimum: γ = 0.7 and η = 0.2 lie inside them"),
    Preset("lora_svd_mm_svd16",
           dict(method="mm_svd", output_rank=16),
           "'LoRA Merging with SVD' (Tang et al.), §4 and Table 2: SVD_16(L_MM), r = 16 to "
           "match the rank of LoRA_DM",
           "α is that of the merge compared (1 for plain sums)"),
)

PRESETS: Mapping[str, Preset] = {p.name: p for p in _ROWS}

for _preset in _ROWS:   # every preset names real options (checked at import, cheaply)
  check_names(_preset.options, f"preset {_preset.name}")


def get_preset(name: str) -> Preset:
  """The preset `name`; ValueError listing the valid ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
  return PRESETS[name]


def presets_table() -> str:
  """The presets, one paragraph each (`knots-jax presets`)."""
  lines = []
  for p in _ROWS:
    options = ", ".join(f"{k}={v}" for k, v in p.options.items())
    lines += [f"{p.name}", f"  {options}", f"  source: {p.source}"]
    if p.note:
      lines.append(f"  note: {p.note}")
  return "\n".join(lines)
