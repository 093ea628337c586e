r"""Merge your own PEFT LoRA adapters.

  knots-jax merge --config configs/merge.py \
      --config.adapters=a/,b/,c/ --config.method=knots_ties \
      --config.scaling=0.6 --config.top_k=20 --config.output=merged/

Every option, with its default: `knots-jax merge --help`. Presets can also go
after the file name: `--config configs/merge.py:method=knots_dare_ties,top_k=100`.
"""

from knots_jax.io import config_args
from knots_jax.pipeline import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.merge_config()
  return config_args.parse_preset(config, arg)
