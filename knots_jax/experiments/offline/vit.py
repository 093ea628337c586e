"""The benchmark's small CLIP ViT: building it, and embedding many images fast.

The model is `knots_jax.models.clip.CLIPVisionModelWithProjection` (HF key
names, LoRA-capable projections); this module only picks its size from a
config and runs it batched under one `jax.jit` per model structure (a base or
merged model and a model with attached LoRA factors compile once each).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from knots_jax.models import clip

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")   # the paper's LoRA targets


def vit_config(model: ml_collections.ConfigDict) -> clip.CLIPVisionConfig:
  """The CLIP vision config of `config.model` (hidden, layers, heads, patch, image, projection)."""
  return clip.CLIPVisionConfig(
      hidden_size=model.hidden_size, intermediate_size=model.mlp_ratio * model.hidden_size,
      num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
      num_channels=3, image_size=model.image_size, patch_size=model.patch_size,
      projection_dim=model.projection_dim, hidden_act="quick_gelu")


def init_vit(config: clip.CLIPVisionConfig, seed: int) -> clip.CLIPVisionModelWithProjection:
  """A randomly initialised ViT (seeded)."""
  return clip.CLIPVisionModelWithProjection(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))


def lora_module_names(config: clip.CLIPVisionConfig) -> list[str]:
  """HF paths of the adapted modules: q, k, v and out_proj of every encoder layer."""
  return [f"vision_model.encoder.layers.{i}.self_attn.{name}"
          for i in range(config.num_hidden_layers) for name in TARGET_MODULES]


@functools.lru_cache(maxsize=16)
def _forward(graphdef):
  def fn(state, pixels):
    return nnx.merge(graphdef, state)(pixels)
  return jax.jit(fn)


def embed(model: nnx.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """image_embeds [n, projection_dim] (float32, not normalized) of images [n, 3, S, S].

  Every batch has `batch_size` rows (the last one zero-padded), so one
  compilation serves any n.
  """
  graphdef, state = nnx.split(model)
  forward = _forward(graphdef)
  n = len(images)
  out = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    out.append(np.asarray(forward(state, jnp.asarray(batch)))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)


__all__ = ["TARGET_MODULES", "vit_config", "init_vit", "lora_module_names", "embed"]
