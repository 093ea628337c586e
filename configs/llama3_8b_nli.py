r"""The paper's Llama-3-8B NLI setting: KnOTS-TIES of six rank-16 LoRA adapters.

  knots-jax merge --config configs/llama3_8b_nli.py:root=/path/to/adapters
  knots-jax merge --config configs/llama3_8b_nli.py:root=/path/to/adapters,method=knots_dare_ties

KnOTS (Stoica et al. 2025, arXiv:2410.19735), Llama-3-8B: one LoRA per NLI
task (SNLI, MNLI, SICK, QNLI, RTE, SciTail) on the attention projections
q_proj, k_proj, v_proj, o_proj, rank 16, merged with KnOTS-TIES. The adapters
are expected at `<root>/<task>` (PEFT directories, or the reference
implementation's .pt / .safetensors files given as `<root>/<task>.pt` etc. if
`suffix=` is set, e.g. `:root=/ckpts,suffix=.pt`).

Every key of `knots-jax merge --help` can be given after the file name as
`key=value` (config.parse_preset), and `--config.<key>=<value>` overrides
afterwards. `method=knots_dare_ties` switches to the paper's KnOTS-DARE-TIES
preset below (top_k 100, drop_rate 0.1) unless those keys are also given.

Hyper-parameter search of the paper (docs/methods.md, "Defaults and search
ranges"): alpha (`scaling`) in {0.1, 0.2, ..., 1.0}; then, for TIES,
top-K (`top_k`) in {10, 20, ..., 100} percent; for DARE, the drop rate p
(`drop_rate`) in {0.99, 0.9, 0.8, ..., 0.1}. KnOTS-DARE-TIES in the paper uses
top-K 100 and p 0.1. The values below are starting points, not the searched
optimum (which depends on the adapters): sweep them with one saved alignment,
`alignment_cache=<dir>` (computed on the first run, restored afterwards).
"""

import os

from knots_jax.io import config_args
from knots_jax.pipeline import config as config_lib

TASKS = ("snli", "mnli", "sick", "qnli", "rte", "scitail")   # the paper's six NLI tasks
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")    # LoRA targets (documentation)
RANK = 16                                                    # LoRA rank of every adapter
ROOT_PLACEHOLDER = "<set root>"                              # the default `root`

# Preset of the paper's KnOTS-DARE-TIES row (applied when method=knots_dare_ties).
_DARE_TIES = {"top_k": 100.0, "drop_rate": 0.1}


def _parse_arg(arg):
  """Splits the config argument into this file's own keys (root, suffix) and the rest."""
  own, rest = {"root": ROOT_PLACEHOLDER, "suffix": ""}, []
  for item in (arg or "").split(","):
    key, sep, value = item.partition("=")
    if sep and key in own:
      own[key] = value
    elif item:
      rest.append(item)
  return own, ",".join(rest)


def get_config(arg=None):
  own, preset = _parse_arg(arg)
  root = own["root"]
  if root == ROOT_PLACEHOLDER or not root:
    raise ValueError(
        "configs/llama3_8b_nli.py: set root, the directory holding the six adapters "
        f"({', '.join(TASKS)}): --config configs/llama3_8b_nli.py:root=/path/to/adapters")
  config = config_lib.merge_config()
  # The six adapters, in the paper's task order: <root>/<task><suffix>.
  config.adapters = ",".join(os.path.join(root, t + own["suffix"]) for t in TASKS)
  # Names used in the summary and in knots_config.json.
  config.names = ",".join(TASKS)
  # KnOTS-TIES, the paper's best method on this setting.
  config.method = "knots_ties"
  # alpha: searched over 0.1 ... 1.0 (see the docstring); 1.0 is the library default.
  config.scaling = 1.0
  # TIES top-K in percent: searched over 10 ... 100.
  config.top_k = 30.0
  # TIES threshold and sign over the whole model, as in the reference implementation.
  config.top_k_scope = "model"
  # DARE's p (only for *dare* methods): searched over 0.99, 0.9, ..., 0.1.
  config.drop_rate = 0.9
  # DARE's seed: fixed, so every run of a sweep draws the same masks.
  config.seed = 0
  # Alignment from the LoRA factors (exact and fast; `dense` is the slow reference).
  config.path = "core"
  # Column-wise concatenation [dW_1 ... dW_n], as in the paper.
  config.concat = "columns"
  # Components with singular value <= tol are dropped (reference value).
  config.tol = 1e-5
  # float32 is enough at rank 16 x 6 = 96 components per module.
  config.dtype = "float32"
  # NLI adapters trained with a classification head carry non-LoRA tensors: refuse by default.
  config.modules_to_save = "error"
  # All six must share base_model_name_or_path.
  config.check_base_model = True
  # Where the merged adapter goes (empty: nothing written).
  config.output = os.path.join("outputs", "llama3_8b_nli_merged")
  # 0 writes the merged adapter exactly (rank <= 96); set e.g. 16 to truncate.
  config.rank = 0
  # Set to the Llama-3-8B directory to check shapes and write merged dense weights.
  config.base_model = ""
  # A sweep re-runs this config: keep the previous output from blocking the next run only if asked.
  config.overwrite = False
  # Progress bars over the 128 modules.
  config.progress = True
  # Save the decomposition here on the first run, restore it on later runs (empty: off).
  config.alignment_cache = ""
  # `auto` shards the merge over all devices (docs/sharding.md).
  config.mesh = "none"
  config = config_args.parse_preset(config, preset)
  if config.method == "knots_dare_ties":
    given = {item.partition("=")[0] for item in preset.split(",") if item}
    for key, value in _DARE_TIES.items():
      if key not in given:
        config[key] = value
  return config
