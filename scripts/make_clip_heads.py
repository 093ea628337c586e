r"""Writes CLIP's zero-shot class heads of every task of a paper config: <heads_dir>/<task>.safetensors.

  python scripts/make_clip_heads.py --config configs/vit_b32_8tasks.py:root=/data/knots
  python scripts/make_clip_heads.py --config configs/vit_l14_8tasks.py:root=/data/knots --device cuda

A task's head [C, D] is, per class name (from the dataset, as the evaluation
reads it: evaluation/real_data.py), the mean of CLIP's unit text embeddings of
a few prompts ("a photo of a {}." and task-specific variants below),
renormalized: the usual zero-shot classifier. The text tower is that of the
config's `model_dir` (a full HF `CLIPModel`, read by transformers with torch:
this is an offline tool). The file is `knots_jax.experiments.offline.heads`' format; its
logit scale is the model's `exp(logit_scale)` (100 for OpenAI's CLIPs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Callable, Sequence

import numpy as np

from knots_jax.experiments import paper, real_data
from knots_jax.experiments.offline import heads as heads_lib

GENERIC = ("a photo of a {}.", "a good photo of a {}.", "a close-up photo of a {}.")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "cars": ("a photo of a {}.", "a photo of a {}, a type of car.", "a photo of my {}."),
    "dtd": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} surface."),
    "eurosat": ("a satellite photo of {}.", "a centered satellite photo of {}.",
                "a satellite image showing {}."),
    "gtsrb": ("a photo of a \"{}\" traffic sign.", "a zoomed in photo of a \"{}\" traffic sign.",
              "a centered photo of a \"{}\" traffic sign."),
    "mnist": ("a photo of the number: \"{}\".", "an image of the handwritten digit {}."),
    "resisc45": ("satellite imagery of {}.", "aerial imagery of {}.", "an aerial photo of {}."),
    "sun397": ("a photo of a {}.", "a photo of the {}.", "a photo of a scene: {}."),
    "svhn": ("a photo of the number: \"{}\".", "a street sign showing the number {}."),
}


def text_head(encode: Callable[[list[str]], np.ndarray], names: Sequence[str],
              templates: Sequence[str]) -> np.ndarray:
  """[C, D]: per name, the normalized mean of the unit embeddings of its prompts.

  `encode(texts) -> [len(texts), D]` is the text tower (text_embeds, any norm).
  """
  if not templates:
    raise ValueError("text_head: no prompt templates")
  rows = []
  for name in names:
    embeds = heads_lib.normalize(np.asarray(encode([t.format(name) for t in templates])))
    rows.append(embeds.mean(0))
  return heads_lib.normalize(np.stack(rows))


def load_config(spec: str):
  """`path.py[:arg]` -> the config of its get_config(arg)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("paper_config", path)
  if module_spec is None or not os.path.isfile(path):
    raise ValueError(f"--config: no config file `{path}`")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def clip_encoder(model_dir: str, device: str) -> tuple[Callable[[list[str]], np.ndarray], float]:
  """transformers' CLIP text tower of `model_dir` and its exp(logit_scale)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.CLIPModel.from_pretrained(model_dir).to(device).eval()
  tokenizer = transformers.CLIPTokenizer.from_pretrained(model_dir)

  def encode(texts: list[str]) -> np.ndarray:
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
    with torch.no_grad():
      out = model.get_text_features(**tokens)
    out = getattr(out, "pooler_output", out)      # a tensor, or an output object
    return out.float().cpu().numpy()

  return encode, float(model.logit_scale.exp().item())


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="configs/vit_*.py:root=DIR[,key=value]")
  parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  tasks = paper.task_names(config)
  if paper.PLACEHOLDER in config.model_dir or paper.PLACEHOLDER in config.heads_dir:
    raise SystemExit(f"{args.config}: model_dir / heads_dir still hold `{paper.PLACEHOLDER}`: "
                     "give root=DIR")
  encode, scale = clip_encoder(config.model_dir, args.device)
  os.makedirs(config.heads_dir, exist_ok=True)
  for t in tasks:
    d = config.datasets[t]
    spec = real_data.DatasetSpec(t, d.path, d.format, d.image_key, d.label_key)
    names = real_data.class_names(spec, d.test_split)
    head = text_head(encode, names, TEMPLATES.get(t, GENERIC))
    path = paper.heads_path(config, t)
    heads_lib.save_heads(heads_lib.ClassHeads(tuple(names), head, scale), path)
    print(f"{t}: {len(names)} classes -> {path}")


if __name__ == "__main__":
  main()
