"""The offline benchmark: 8 synthetic image tasks, a small CLIP ViT, LoRA adapters, the paper's table.

  >>> from knots_jax.experiments.offline import run_benchmark
  >>> results = run_benchmark(get_config())      # configs/offline_benchmark.py

Modules: `tasks` (the datasets), `scenes` (the pretraining mixture), `render`
(drawing), `vit` (the model and batched embedding), `heads` (frozen class
heads), `training` (pretraining and LoRA fine-tuning with optax), `assets`
(the trained files), `benchmark` (evaluation and tables). See
docs/offline_benchmark.md.
"""

from knots_jax.experiments.offline.assets import Assets, build_assets, load_assets
from knots_jax.experiments.offline.benchmark import run_benchmark
from knots_jax.experiments.offline.heads import ClassHeads
from knots_jax.experiments.offline.tasks import TASKS, Split, make_split

__all__ = ["Assets", "build_assets", "load_assets", "run_benchmark", "ClassHeads", "TASKS",
           "Split", "make_split"]
