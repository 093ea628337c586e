r"""Merge your own PEFT LoRA adapters.

  knots-jax merge --config configs/merge.py \
      --config.adapters=a/,b/,c/ --config.method=knots_ties \
      --config.scaling=0.6 --config.top_k=20 --config.output=merged/

Every option, with its default: `knots-jax merge --help`. After the file name go
the papers' presets (`knots-jax presets` lists them, docs/methods.md cites them)
and options: `--config configs/merge.py:sftm_vit_b32` or
`--config configs/merge.py:knots_vit_b32_dare_ties,scaling=0.5`.
"""

from knots_jax.io import config_args
from knots_jax.methods import presets
from knots_jax.pipeline import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.merge_config()
  options = {name: p.options for name, p in presets.PRESETS.items()}
  return config_args.parse_preset(config, arg, options)
