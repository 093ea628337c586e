"""Frozen class heads: one fixed embedding per label name, as CLIP's text embeddings.

In the paper a task's classifier is CLIP's text embedding of each class name:
fixed, never trained, the same for every model that is evaluated, and the
same vector wherever a name recurs (so duplicate names are one class of the
joint task). Here there is no text tower; the embedding of a name is the
pretrained base model's mean image embedding over the training images that
carry that name (normalized embeddings averaged, then normalized): a
nearest-class-mean head computed once, before any fine-tuning. Like CLIP's
heads it agrees with the pretrained model to some degree (zero-shot accuracy
is above chance), it is a function of the name alone (the images of a name
that occurs in several tasks are pooled into one vector), and fine-tuning
must move the image embeddings towards it, not the other way round.

The class means are centered (the mean over all classes subtracted) before
they are normalized: the pretrained embeddings share a large common
direction, and without centering the class vectors are nearly parallel
(mean cosine 0.96 among the digits), so logits differ by a small fraction of
the scale and fine-tuning stalls.

  logits = logit_scale * normalize(image_embeds) @ heads.matrix(names).T
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np
import safetensors
import safetensors.numpy

from knots_jax.evaluation.metrics import normalize_label_name

HEADS_FILE = "heads.safetensors"


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=axis, keepdims=True)
  return x / np.maximum(norm, 1e-12)


@dataclasses.dataclass(frozen=True)
class ClassHeads:
  """Unit class embeddings keyed by (normalized) label name, and the logit scale."""
  names: tuple[str, ...]        # as first spelled
  embeddings: np.ndarray        # [len(names), D], unit rows
  logit_scale: float

  def __post_init__(self):
    keys = [normalize_label_name(n) for n in self.names]
    if len(set(keys)) != len(keys):
      raise ValueError(f"class heads: label names repeat: {self.names}")
    if self.embeddings.shape[0] != len(self.names):
      raise ValueError(f"class heads: {self.embeddings.shape[0]} embeddings for "
                       f"{len(self.names)} names")

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  def matrix(self, names: Sequence[str]) -> np.ndarray:
    """[len(names), D]: the embedding of each name (a task's head, or the union's)."""
    index = {normalize_label_name(n): i for i, n in enumerate(self.names)}
    missing = [n for n in names if normalize_label_name(n) not in index]
    if missing:
      raise ValueError(f"class heads have no embedding for {missing[:5]}")
    return self.embeddings[[index[normalize_label_name(n)] for n in names]]

  def logits(self, image_embeds: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """[n, len(names)] = logit_scale * cos(image embedding, class embedding)."""
    return self.logit_scale * normalize(image_embeds) @ self.matrix(names).T


def prototype_heads(embeds_per_task: Mapping[str, np.ndarray],
                    labels_per_task: Mapping[str, np.ndarray],
                    names_per_task: Mapping[str, Sequence[str]],
                    logit_scale: float, center: bool = True) -> ClassHeads:
  """Heads from image embeddings: per label name, the normalized mean of the normalized
  embeddings of every image with that name, across tasks."""
  sums: dict[str, np.ndarray] = {}
  spelled: dict[str, str] = {}
  for task, embeds in embeds_per_task.items():
    unit = normalize(embeds)
    labels = np.asarray(labels_per_task[task])
    for c, name in enumerate(names_per_task[task]):
      rows = unit[labels == c]
      if not len(rows):
        raise ValueError(f"task `{task}`: no image of class `{name}` to build its head from")
      key = normalize_label_name(name)
      spelled.setdefault(key, name)
      sums[key] = sums.get(key, 0.0) + rows.sum(0)
  keys = list(sums)
  means = normalize(np.stack([sums[k] for k in keys]))
  if center:
    means = means - means.mean(0, keepdims=True)
  return ClassHeads(tuple(spelled[k] for k in keys), normalize(means), float(logit_scale))


def save_heads(heads: ClassHeads, path: str) -> None:
  """One safetensors file: tensor `embeddings`, names and logit scale in its metadata."""
  safetensors.numpy.save_file(
      {"embeddings": np.ascontiguousarray(heads.embeddings, np.float32)}, path,
      metadata={"names": json.dumps(list(heads.names)), "logit_scale": repr(heads.logit_scale)})


def load_heads(path: str) -> ClassHeads:
  """Reads `save_heads`' file; ValueError naming the file if it is not one."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      embeddings = f.get_tensor("embeddings")
    names = json.loads(meta["names"])
    scale = float(meta["logit_scale"])
  except (OSError, KeyError, ValueError, safetensors.SafetensorError) as e:
    raise ValueError(f"{path}: not a class-heads file (a safetensors file with tensor "
                     f"`embeddings` and metadata `names`, `logit_scale`): {e}") from e
  return ClassHeads(tuple(names), np.asarray(embeddings, np.float32), scale)


__all__ = ["ClassHeads", "prototype_heads", "save_heads", "load_heads", "normalize", "HEADS_FILE"]
