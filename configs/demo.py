r"""The embedded default: merge the three small adapters shipped in assets/demo.

  knots-jax merge --config configs/demo.py

The adapters were fine-tuned with PEFT on a tiny random Llama
(scripts/make_demo_adapters.py). KnOTS-TIES merges them; the merged adapter and
the merged dense weights go to outputs/demo_merged/ (replaced on every run).
"""

import os

from knots_jax.io import config_args
from knots_jax.pipeline import config as config_lib

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo")


def get_config(arg: str | None = None):
  config = config_lib.merge_config()
  config.adapters = ",".join(
      os.path.normpath(os.path.join(_DEMO, "adapters", name))
      for name in ("task_a", "task_b", "task_c"))
  config.base_model = os.path.normpath(os.path.join(_DEMO, "base"))
  config.method = "knots_ties"
  config.scaling = 1.0
  config.top_k = 30.0
  config.output = os.path.join("outputs", "demo_merged")
  config.overwrite = True
  return config_args.parse_preset(config, arg)
