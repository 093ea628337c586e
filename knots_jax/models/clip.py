"""The CLIP vision encoder (ViT) with its projection, in Flax NNX, as in transformers.

A port of `transformers`' `CLIPVisionModelWithProjection` (modeling_clip.py)
for evaluating merges of LoRA adapters fine-tuned on CLIP's image tower:

* the base model is read from a HF safetensors checkpoint (no torch) of a
  `CLIPVisionModelWithProjection` or a full `CLIPModel` (its text tower is
  ignored): both name the image tower `vision_model.*` and the projection
  `visual_projection.weight`;
* a merged model is the same model loaded from merged weights,
  `from_pretrained(base_dir, weights=backbone.merged_model_weights(result, base_dir))`;
* a fine-tuned baseline is the base with one PEFT adapter attached
  (`lora.attach_adapter`): every projection (q/k/v/out_proj, fc1, fc2,
  visual_projection) is a `lora.LoraLinear` named by its HF module path.

  >>> model = clip.from_pretrained("clip-vit-base-patch32/")
  >>> image_embeds = nnx.jit(lambda m, x: m(x))(model, pixel_values)   # [B, C, H, W] -> [B, 512]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.sharding import Mesh

from knots_jax.io import hf_checkpoint, output_dir
from knots_jax.models import lora
from knots_jax.models import weights as weights_lib
from knots_jax.parallel import sharding

# HF ACT2FN names -> functions; "gelu" is the exact (erf) GELU, the others tanh's.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_MODEL_TYPES = ("clip_vision_model", "clip")
_METADATA = {"format": "pt"}   # transformers refuses safetensors files without it


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of HF's `CLIPVisionConfig` the vision encoder uses (defaults: ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIPVisionConfig: hidden_act {self.hidden_act!r} is not supported; "
                       f"use one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, config: Mapping) -> "CLIPVisionConfig":
    """From a HF config dict: a `CLIPVisionConfig`, or a `CLIPConfig` (its `vision_config`
    and its top-level `projection_dim`). Fields HF has and this model does not use are ignored."""
    config = dict(config)
    model_type = config.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
      raise ValueError(f"config: model_type {model_type!r} is not a CLIP model "
                       f"(expected one of {_MODEL_TYPES})")
    if "vision_config" in config or model_type == "clip":
      vision = dict(config.get("vision_config") or {})
      if "projection_dim" in config:
        vision["projection_dim"] = config["projection_dim"]
      config = vision
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})

  def to_hf(self) -> dict:
    """A config.json dict that `transformers.CLIPVisionModelWithProjection` loads."""
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            **dataclasses.asdict(self)}


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis (`weight`, `bias`), computed in float32."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    h = h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return h.astype(x.dtype)

  def targets(self, prefix: str) -> dict:
    return {f"{prefix}.weight": (self.weight, False), f"{prefix}.bias": (self.bias, False)}


class Embeddings(nnx.Module):
  """Patches (a stride-p convolution without bias, as a matmul) + CLS token + positions.

  `patch_embedding` keeps HF's layout [hidden, C, p, p], so it loads and saves as is.
  """

  def __init__(self, config: CLIPVisionConfig, prefix: str, dtype, rngs: nnx.Rngs):
    self.config, self.prefix = config, prefix
    c, p, d = config.num_channels, config.patch_size, config.hidden_size
    self.patch_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d, c, p, p), dtype))
    self.class_embedding = nnx.Param(d ** -0.5 * jax.random.normal(rngs.params(), (d,), dtype))
    self.position_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.num_patches + 1, d), dtype))

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    b, c, h, w = pixel_values.shape
    if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
      raise ValueError(f"pixel_values of shape {pixel_values.shape}: the model expects "
                       f"[B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]")
    p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    kernel = self.patch_embedding[...]
    x = pixel_values.astype(kernel.dtype).reshape(b, c, g, p, g, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)   # patches in row-major order
    patches = x @ kernel.reshape(kernel.shape[0], -1).T
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, kernel.shape[0]))
    return jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...]

  def targets(self) -> dict:
    return {f"{self.prefix}.patch_embedding.weight": (self.patch_embedding, False),
            f"{self.prefix}.class_embedding": (self.class_embedding, False),
            f"{self.prefix}.position_embedding.weight": (self.position_embedding, False)}


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention; q/k/v/out_proj with biases."""

  def __init__(self, config: CLIPVisionConfig, prefix: str, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = d // self.num_heads
    make = lambda name, group=None: lora.LoraLinear(
        d, d, hf_name=f"{prefix}.{name}", use_bias=True, dtype=dtype, rngs=rngs,
        input_group=group)
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (   # q, k, v: one input
        make("q_proj", f"{prefix}.input"), make("k_proj", f"{prefix}.input"),
        make("v_proj", f"{prefix}.input"), make("out_proj"))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim ** -0.5
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.out_proj(out)


class EncoderLayer(nnx.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, config: CLIPVisionConfig, prefix: str, dtype, rngs: nnx.Rngs):
    d, ff, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
    self.prefix = prefix
    self.activation = ACTIVATIONS[config.hidden_act]
    self.layer_norm1 = LayerNorm(d, eps, dtype)
    self.self_attn = Attention(config, f"{prefix}.self_attn", dtype, rngs)
    self.layer_norm2 = LayerNorm(d, eps, dtype)
    self.fc1 = lora.LoraLinear(d, ff, hf_name=f"{prefix}.mlp.fc1", use_bias=True, dtype=dtype,
                               rngs=rngs)
    self.fc2 = lora.LoraLinear(ff, d, hf_name=f"{prefix}.mlp.fc2", use_bias=True, dtype=dtype,
                               rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))

  def targets(self) -> dict:
    return {**self.layer_norm1.targets(f"{self.prefix}.layer_norm1"),
            **self.layer_norm2.targets(f"{self.prefix}.layer_norm2")}


class CLIPVisionModelWithProjection(nnx.Module):
  """CLIP's image tower: pixels [B, C, H, W] -> image_embeds [B, projection_dim].

  Parameters are `nnx.Param` (random until loaded); attached LoRA factors are
  `lora.LoraWeight`. HF key of every parameter: `hf_targets(model)`.
  """

  def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    d, eps = config.hidden_size, config.layer_norm_eps
    self.embeddings = Embeddings(config, "vision_model.embeddings", dtype, rngs)
    self.pre_layrnorm = LayerNorm(d, eps, dtype)   # sic: HF's name
    self.layers = nnx.List([EncoderLayer(config, f"vision_model.encoder.layers.{i}", dtype, rngs)
                            for i in range(config.num_hidden_layers)])
    self.post_layernorm = LayerNorm(d, eps, dtype)
    self.visual_projection = lora.LoraLinear(d, config.projection_dim,
                                             hf_name="visual_projection", dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, *, output_hidden_states: bool = False):
    """image_embeds [B, projection_dim]; with `output_hidden_states`, also HF's hidden_states:
    a tuple of num_hidden_layers + 1 arrays [B, 1 + num_patches, hidden] (the input of the
    first layer, after pre_layrnorm, then every layer's output; no post_layernorm)."""
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    hidden_states = [x]
    for layer in self.layers:
      x = layer(x)
      hidden_states.append(x)
    image_embeds = self.visual_projection(self.post_layernorm(x[:, 0, :]))
    if output_hidden_states:
      return image_embeds, tuple(hidden_states)
    return image_embeds


def hf_targets(model: CLIPVisionModelWithProjection) -> dict[str, tuple[nnx.Variable, bool]]:
  """{HF key: (variable, transposed)} of every parameter (see `models.weights`)."""
  out = {**model.embeddings.targets(), **model.pre_layrnorm.targets("vision_model.pre_layrnorm"),
         **model.post_layernorm.targets("vision_model.post_layernorm")}
  for layer in model.layers:
    out.update(layer.targets())
  for layer in lora.linears(model).values():
    out.update(lora.linear_targets(layer))
  return out


def from_pretrained(model_dir: str, *, dtype=jnp.float32,
                    weights: Mapping[str, object] | Iterable[tuple[str, object]] | None = None,
                    mesh: Mesh | None = None) -> CLIPVisionModelWithProjection:
  """Loads a HF CLIP vision model (or the image tower of a full CLIPModel), no torch.

  Args:
    model_dir: a directory with config.json and model.safetensors (or a sharded
      checkpoint with model.safetensors.index.json).
    dtype: the parameter and compute dtype (weights are cast to it).
    weights: instead of the checkpoint's tensors, a {key: array} mapping or a
      (key, array) iterator with the same HF key names, e.g.
      `full_model.merged_model_weights(result, model_dir)` for a merged model.
      Keys the model does not use (text tower, logit_scale) are skipped.
    mesh: a `sharding.make_mesh()` mesh: every parameter is placed with
      `sharding.weight_sharding` (rows over the mesh when they divide its size,
      else replicated).

  Raises:
    FileNotFoundError without config.json or safetensors; ValueError naming the
    checkpoint file and the missing key, or a key whose shape differs.
  """
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"`{model_dir}` has no config.json")
  with open(config_path) as f:
    config = CLIPVisionConfig.from_hf(json.load(f))
  return weights_lib.load_pretrained(
      lambda: CLIPVisionModelWithProjection(config, dtype=dtype, rngs=nnx.Rngs(0)), hf_targets,
      model_dir, dtype=dtype, weights=weights, mesh=mesh)


def hf_tensors(model: CLIPVisionModelWithProjection) -> dict[str, np.ndarray]:
  """The HF state dict of `model` (PyTorch layouts: Linear weights [out, in]).

  Base weights only: attached LoRA factors are not included (nor added).
  """
  return {key: np.ascontiguousarray(sharding.to_host(var[...]).T if transposed
                                    else sharding.to_host(var[...]))
          for key, (var, transposed) in hf_targets(model).items()}


def save_pretrained(model: CLIPVisionModelWithProjection, out_dir: str, *,
                    overwrite: bool = False) -> None:
  """Writes config.json + model.safetensors that
  `transformers.CLIPVisionModelWithProjection.from_pretrained` loads.

  Written atomically (`output_dir.atomic_output_dir`): a failure leaves no
  `out_dir`. On several processes every process must call it; process 0 writes.
  """
  tensors = hf_tensors(model)
  if jax.process_index() != 0:
    return
  dtype = str(next(iter(tensors.values())).dtype)
  with output_dir.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, hf_checkpoint.SINGLE), metadata=_METADATA)
    output_dir.write_json(os.path.join(tmp, "config.json"), {**model.config.to_hf(), "dtype": dtype})


__all__ = ["CLIPVisionConfig", "CLIPVisionModelWithProjection", "from_pretrained", "hf_tensors",
           "hf_targets", "save_pretrained", "ACTIVATIONS"]
