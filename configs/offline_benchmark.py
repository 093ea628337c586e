r"""The offline benchmark: 8 synthetic image tasks, a small CLIP ViT, 8 LoRA adapters, the paper's table.

  knots-jax benchmark --config configs/offline_benchmark.py            # shipped assets
  knots-jax benchmark --config configs/offline_benchmark.py:train      # train from scratch (cached)
  knots-jax benchmark --config configs/offline_benchmark.py:quick      # tiny, seconds (tests)
  python scripts/train_offline_assets.py                               # remake assets/offline

or from Python: `knots_jax.experiments.offline.run_benchmark(get_config())`.

Presets (the argument after the colon, comma-separated): `train` trains the
base, heads and adapters into `cache_dir` (reused when its training config
matches) instead of reading `assets`; `quick` shrinks everything (3 tasks, a
2-layer ViT on 16 x 16 images, a few dozen steps, short search grids) and
implies `train`. Any field can also be set as `key=value` (e.g.
`:quick,workdir=/tmp/b`) or with `--config.<field>=<value>`.
"""

import os

import ml_collections

from knots_jax.io import config_args

_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
ALL_TASKS = "digits,shapes,textures,orientation,counting,colours,positions,stripes"
METHODS = "ta,ties,dare_ties,knots_ties,knots_dare_ties"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                       # data, initialisation, batches, DARE: everything
  c.tasks = ALL_TASKS              # comma-separated names of knots_jax.experiments.offline.tasks.TASKS
  c.data = dict(train=2000,        # images per task: LoRA training and the class heads
                val=200,           # hyper-parameter search (the paper's validation split)
                test=500)          # reported numbers
  c.model = dict(                  # the CLIP vision tower (HF CLIPVisionConfig fields)
      image_size=32, patch_size=8, hidden_size=64, mlp_ratio=4, num_layers=4, num_heads=4,
      projection_dim=64)
  c.pretrain = dict(               # on the pretraining scenes (offline/scenes.py), never the tasks
      steps=3000, batch_size=64, examples=24000, learning_rate=3e-3, weight_decay=0.05,
      warmup_fraction=0.05, whiten_patches=True, sincos_positions=True)
  c.heads = dict(logit_scale=30.0,  # CLIP-style fixed temperature of the frozen heads
                 center=True)       # subtract the mean class embedding (offline/heads.py)
  c.lora = dict(                   # the paper's adapters: rank 16 on q, k, v, out_proj
      rank=16, alpha=16, steps=400, batch_size=64, learning_rate=1e-2, weight_decay=0.0,
      warmup_fraction=0.05)
  c.methods = METHODS              # merged with the linear search, in this order
  c.search = dict(                 # the paper's grids (App. C); empty string: the default
      scalings="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
      top_ks="10,20,30,40,50,60,70,80,90,100",
      drop_rates="0.99,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1",
      stop_early=False)            # True: the reference's stop at the first worse candidate
  c.hits_k = "1,3,5"               # joint-task Hits@k
  c.assets = os.path.join(_ROOT, "assets", "offline")   # shipped files (train=False)
  c.train = False                  # train into cache_dir instead of reading `assets`
  c.cache_dir = os.path.join("outputs", "offline_assets")
  c.workdir = os.path.join("outputs", "offline_benchmark")   # results.json, results.md
  c.overwrite = True               # replace workdir (atomically) on every run
  c.eval_batch_size = 500
  c.progress = True
  return apply_arg(c, arg)


def _quick(c: ml_collections.ConfigDict) -> None:
  c.tasks = "shapes,colours,orientation"
  c.data = dict(train=300, val=60, test=90)
  c.model = dict(image_size=16, patch_size=4, hidden_size=32, mlp_ratio=2, num_layers=2,
                 num_heads=2, projection_dim=32)
  c.pretrain.update(steps=60, batch_size=32, examples=1000)
  c.lora.update(steps=60, batch_size=32)
  c.search.update(scalings="0.5,1.0", top_ks="30,100", drop_rates="0.9,0.5")
  c.train = True
  c.cache_dir = os.path.join("outputs", "offline_assets_quick")
  c.workdir = os.path.join("outputs", "offline_benchmark_quick")
  c.eval_batch_size = 100


PRESETS = {"quick": _quick, "train": lambda c: setattr(c, "train", True)}


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Presets and `key=value` items (dotted keys reach nested fields), comma-separated."""
  return config_args.apply_arg(c, arg, presets=PRESETS, source="configs/offline_benchmark.py")
