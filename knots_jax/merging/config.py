"""The options of `knots-jax merge`: defaults and help in one table.

Config files under `configs/` start from `merge_config()` and change what they
need; `knots-jax merge --help` prints this table, so every option is explained
in one place.
"""

from __future__ import annotations

import ml_collections

# name: (default, help)
FIELDS: dict[str, tuple[object, str]] = {
    "adapters": ("", "Comma-separated adapters: PEFT directories (adapter_config.json + "
                     "adapter_model.safetensors or .bin), or .pt / .safetensors state dicts "
                     "with lora_A/lora_B keys (the reference implementation's files)."),
    "names": ("", "Optional comma-separated names for the adapters (default: directory names)."),
    "method": ("knots_ties", "Merging method: ta, mean, ties, dare, dare_ties, or the same with "
                             "the prefix knots_ (merge in the KnOTS-aligned space) or core_ "
                             "(merge the Core Space's core matrices); or direct_merge, mm_svd, "
                             "mm_noise, iso_c, iso_cts, tsv_m, sftm (from the LoRA factors), "
                             "knots_tsv_m, core_tsv_m, core_iso_c, core_iso_cts. "
                             "`knots-jax methods` lists them with their papers."),
    "scaling": (1.0, "alpha: multiplies the merged update (TIES: every kept value, before the "
                     "disjoint mean). The paper searches 0.1 ... 1.0."),
    "top_k": (30.0, "TIES: the share of entries kept per task; > 1 means percent (30 = 30%), "
                    ">= 1 keeps everything. The paper searches 10 ... 100."),
    "top_k_scope": ("model", "TIES threshold and majority sign over the whole `model` (the "
                             "reference) or per `layer` (per module, as PEFT and mergekit)."),
    "drop_rate": (0.9, "DARE: probability p of dropping an entry; kept ones are scaled by "
                       "1/(1-p)."),
    "seed": (0, "DARE: random seed (the result is deterministic given the seed)."),
    "common_fraction": (0.8, "Iso-CTS (iso_cts, core_iso_cts): the share of the space given "
                             "to the common subspace."),
    "tsv_keep": (0, "TSV-M (tsv_m): singular components kept per task; 0 = min(out, in) // n, "
                    "the paper's default."),
    "output_rank": (0, "mm_svd: the rank of the merged LoRA; 0 = the largest adapter rank."),
    "eta": (1.0, "SFTM (sftm): the share of each task's entries kept by its trim; 1 = no trim "
                 "(computed from the factors); < 1 trims the dense updates (memory: n dense "
                 "updates of one stack at a time)."),
    "path": ("core", "KnOTS alignment from the LoRA factors (`core`, fast, exact) or from the "
                     "dense updates (`dense`, the reference, slow)."),
    "concat": ("columns", "KnOTS concatenation: `columns` ([dW_1 ... dW_n], the paper) or "
                          "`rows` (ablation)."),
    "tol": (1e-5, "KnOTS: components with singular value <= tol are dropped (reference: 1e-5)."),
    "dtype": ("float32", "Computation dtype: float32, or float64 (enables jax x64)."),
    "modules_to_save": ("error", "Non-LoRA tensors in the adapters (modules_to_save): `error` "
                                 "(refuse), `mean`, `first` (take the first adapter's), `drop`."),
    "check_base_model": (True, "Refuse adapters whose base_model_name_or_path differ."),
    "output": ("", "Output directory, written atomically: adapter/ (a PEFT adapter), "
                   "merged_weights/ or merged_model/ (with base_model), knots_config.json. "
                   "Empty: no output."),
    "rank": (0, "Truncate the written adapter to this rank (SVD of the merged update, from the "
                "factors); 0 writes it exactly (rank n*r). Dense merges (ties, dare...) need it."),
    "base_model": ("", "Hugging Face model directory (safetensors). If set, the adapters are "
                       "checked against its shapes and merged dense weights are written."),
    "full_model": (False, "With base_model: write the whole merged model (every tensor, HF "
                          "safetensors shards + index + config.json, loadable with "
                          "from_pretrained) to merged_model/ instead of only the adapted "
                          "modules' weights to merged_weights/."),
    "full_model_format": ("safetensors", "With full_model: `safetensors` (HF shards in "
                                         "merged_model/), `orbax` (an Orbax CheckpointManager "
                                         "directory merged_model_orbax/: step 0, item `weights` "
                                         "= {HF tensor name: array}, config.json beside it; "
                                         "restore with knots_jax.export.orbax_model."
                                         "restore_merged_model(dir, mesh=...)), or `both`. "
                                         "See docs/backbone.md."),
    "overwrite": (False, "Replace an existing output directory (only once the new one is "
                         "complete)."),
    "progress": (True, "Show progress bars (alignment; writing the full model). On several "
                       "processes every host shows its own; the full-model bars are labelled "
                       "`host i/n`."),
    "alignment_cache": ("", "KnOTS methods only: a directory holding the saved decomposition "
                            "(knots_jax.alignment.cache, Orbax). If it exists, the alignment is "
                            "restored from it instead of recomputed (its adapters and "
                            "path/concat/tol/dtype must match this run); otherwise it is computed "
                            "and saved there. Empty: no cache."),
    "mesh": ("none", "`none` (one device) or `auto`: shard the merge over every device "
                     "(sharding.initialize() for multi-host, then sharding.make_mesh()); see "
                     "docs/sharding.md."),
}


def merge_config() -> ml_collections.ConfigDict:
  """A ConfigDict with every option at its default."""
  return ml_collections.ConfigDict({name: default for name, (default, _) in FIELDS.items()})


