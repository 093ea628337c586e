r"""The KnOTS paper's ViT-B/32 setting: eight LoRA adapters of CLIP ViT-B/32, merged and scored.

  knots-jax evaluate --config configs/vit_b32_8tasks.py:root=/data/knots
  knots-jax evaluate --config configs/vit_b32_8tasks.py:root=/data/knots,quick
  knots-jax evaluate --config configs/vit_b32_8tasks.py:root=/data/knots,methods=knots_ties

or from Python: `knots_jax.experiments.paper.run_paper_vision(get_config("root=/data/knots"))`.

KnOTS (Stoica et al. 2025, arXiv:2410.19735), ViT-B/32 results: CLIP ViT-B/32 with one
rank-16 LoRA (q, k, v, out_proj of the image tower) per task on Cars, DTD,
EuroSAT, GTSRB, MNIST, RESISC45, SUN397 and SVHN; frozen zero-shot text heads;
TA, TIES, DARE-TIES, KnOTS-TIES and KnOTS-DARE-TIES, each with the linear
search of alpha, then top-K or DARE's p, on the validation split.

Everything is read from disk under `root` (docs/paper_settings.md says how to
prepare it):

  <root>/models/clip-vit-base-patch32/            HF CLIPModel (safetensors)
  <root>/adapters/clip-vit-base-patch32/<task>/   PEFT LoRA adapters
  <root>/heads/clip-vit-base-patch32/<task>.safetensors   scripts/make_clip_heads.py
  <root>/datasets/<task>/                         datasets.save_to_disk (or format=folder)

Argument after the colon, comma-separated: `root=DIR`, the preset `quick`
(50 val / 100 test images per task, short grids), or `key=value` for any
field (dotted keys reach nested ones: `datasets.mnist.format=folder`,
`max_examples.test=0`). Paths still at the placeholder are refused with the
list of fields to set.
"""

from knots_jax.experiments import paper

MODEL = "clip-vit-base-patch32"    # HF openai/clip-vit-base-patch32, saved locally


def get_config(arg: str | None = None):
  return paper.apply_arg(paper.vision_config(MODEL), arg, "configs/vit_b32_8tasks.py")
