"""Llama in Flax NNX, as transformers' `modeling_llama.py`, to evaluate merges.

A port of `LlamaForCausalLM` and `LlamaForSequenceClassification` (the Llama
family: Llama 2 / 3 / 3.1 / 3.2, TinyLlama, ...) for evaluating merged LoRA
adapters in JAX, without torch:

* the base model is read from a HF safetensors checkpoint (one file or sharded
  with `model.safetensors.index.json`) with `sharded_read.read_backbone`;
* a merged model is the same model loaded from merged weights,
  `from_pretrained(base_dir, weights=backbone.merged_model_weights(result, base_dir))`;
* a fine-tuned baseline is the base with one PEFT adapter attached
  (`lora.attach_adapter`): every projection (q/k/v/o_proj, gate/up/down_proj,
  lm_head, score) is a `lora.LoraLinear` named by its HF module path.

  >>> model = llama.from_pretrained("Llama-3.2-1B/")
  >>> logits = llama.forward(model, input_ids, attention_mask)   # [B, T] -> [B, T, vocab]

Semantics follow transformers: RMSNorm computed in float32, rotary embeddings
("default", "linear" and "llama3" types), grouped-query attention with a causal
mask and the padding mask `attention_mask` [B, T] (1 = token, 0 = padding),
position ids `arange(T)` unless given (also with padding, as HF's forward),
softmax in float32, SiLU-gated MLP, and for classification the `score` head
read at the rightmost token that is not `pad_token_id`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from knots_jax.models import lora
from knots_jax.models import weights as weights_lib

TASKS = ("causal_lm", "sequence_classification")
ROPE_TYPES = ("default", "linear", "llama3")
_PREFIX = "model"   # HF's base_model_prefix of both heads


# ------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The fields of HF's `LlamaConfig` the model uses (defaults: HF's).

  `num_key_value_heads` and `head_dim` default as in HF (to the number of
  heads, and `hidden_size // num_attention_heads`). The rotary embedding is
  `rope_type` with `rope_theta` and, for "linear" / "llama3", `rope_factor`
  (and the llama3 `rope_low_freq_factor`, `rope_high_freq_factor`,
  `rope_original_max_position_embeddings`). `labels` are the class names by
  id (HF's id2label) of a classification head.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  pad_token_id: int | None = None
  num_labels: int = 2
  labels: tuple[str, ...] | None = None
  attention_bias: bool = False
  mlp_bias: bool = False

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.labels is None:
      object.__setattr__(self, "labels", tuple(f"LABEL_{i}" for i in range(self.num_labels)))
    problems = []
    if self.hidden_act != "silu":
      problems.append(f"hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
    if self.num_attention_heads % self.num_key_value_heads:
      problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                      f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim {self.head_dim} is odd; rotary embeddings need an even one")
    if self.rope_type not in ROPE_TYPES:
      problems.append(f"rope_type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
    if len(self.labels) != self.num_labels:
      problems.append(f"{len(self.labels)} labels for num_labels={self.num_labels}")
    if problems:
      raise ValueError("LlamaConfig: " + "; ".join(problems))

  @property
  def num_key_value_groups(self) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, config: Mapping) -> "LlamaConfig":
    """From a HF config.json dict (transformers 4 or 5).

    RoPE settings are read as transformers 5 reads them: from `rope_scaling`
    (transformers 4 files) or else `rope_parameters`, with `rope_theta` inside
    or at the top level; the type from `rope_type` (or the older `type`).
    Fields the model does not use are ignored.
    """
    config = dict(config)
    model_type = config.get("model_type")
    if model_type is not None and model_type != "llama":
      raise ValueError(f"config: model_type {model_type!r} is not 'llama'")
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in rope.values()):
      raise ValueError("config: rope parameters nested per layer type are not supported by Llama")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
      raise ValueError("config: partial_rotary_factor != 1 is not supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields and k not in ("labels",)}
    kwargs.update(
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"))
    if config.get("id2label"):
      id2label = {int(k): str(v) for k, v in config["id2label"].items()}
      if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"config: id2label ids {sorted(id2label)} are not 0..n-1")
      kwargs["labels"] = tuple(id2label[i] for i in range(len(id2label)))
      kwargs["num_labels"] = len(id2label)
    return cls(**kwargs)


def read_config(model_dir: str) -> LlamaConfig:
  """`LlamaConfig.from_hf` of `<model_dir>/config.json`; errors name the file."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`{model_dir}` has no config.json")
  with open(path) as f:
    raw = json.load(f)
  try:
    return LlamaConfig.from_hf(raw)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------- rotary


@functools.lru_cache(maxsize=32)
def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float32) of the rotary embedding, as HF's
  `ROPE_INIT_FUNCTIONS`: theta^(-2i/d), divided by `factor` ("linear"), or
  Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth
  interpolation between."""
  dim = config.head_dim
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if config.rope_type == "linear":
    inv_freq = inv_freq / config.rope_factor
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    context = (config.rope_original_max_position_embeddings
               or config.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    inv_freq = np.where(medium, smoothed, scaled)
  inv_freq = inv_freq.astype(np.float32)
  inv_freq.setflags(write=False)   # cached and shared
  return inv_freq


def rotary_embedding(position_ids: jax.Array, config: LlamaConfig,
                     dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, head_dim] for `position_ids` [B or 1, T], computed in float32."""
  freqs = position_ids.astype(jnp.float32)[..., None] * rope_frequencies(config)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, ..., head_dim] rotated by cos, sin [B, T, head_dim]."""
  extra = (1,) * (x.ndim - 3)
  cos = cos.reshape(cos.shape[:2] + extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + extra + sin.shape[2:])
  return x * cos + rotate_half(x) * sin


def attention_mask_matrix(attention_mask: jax.Array | None, batch: int,
                          length: int) -> jax.Array:
  """bool [B, T, T]: query t sees key s when s <= t and key s is not padding."""
  causal = jnp.tril(jnp.ones((length, length), bool))[None]
  if attention_mask is None:
    return jnp.broadcast_to(causal, (batch, length, length))
  return causal & (attention_mask[:, None, :] != 0)


# ------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
  """`weight * x / sqrt(mean(x^2) + eps)`, normalized in float32, as HF's LlamaRMSNorm."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * h.astype(x.dtype)


class Embedding(nnx.Module):
  """Token embeddings `weight` [vocab, hidden] (HF's layout)."""

  def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
    self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab, dim), dtype))

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], input_ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """x @ weight^T: the tied output projection."""
    return x @ self.weight[...].T


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs: nnx.Rngs):
    self.config = config
    d, h, kv, hd = (config.hidden_size, config.num_attention_heads,
                    config.num_key_value_heads, config.head_dim)
    make = lambda name, n_in, n_out, group=None: lora.LoraLinear(
        n_in, n_out, hf_name=f"{prefix}.{name}", use_bias=config.attention_bias,
        dtype=dtype, rngs=rngs, input_group=group)
    self.q_proj = make("q_proj", d, h * hd, f"{prefix}.input")   # q, k, v: one input
    self.k_proj = make("k_proj", d, kv * hd, f"{prefix}.input")
    self.v_proj = make("v_proj", d, kv * hd, f"{prefix}.input")
    self.o_proj = make("o_proj", h * hd, d)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    b, t, _ = x.shape
    kv, groups, hd = cfg.num_key_value_heads, cfg.num_key_value_groups, cfg.head_dim
    # Query head j*groups + g shares key/value head j (HF's repeat_kv).
    q = apply_rotary(self.q_proj(x, tokens).reshape(b, t, kv, groups, hd), cos, sin)
    k = apply_rotary(self.k_proj(x, tokens).reshape(b, t, kv, hd), cos, sin)
    v = self.v_proj(x, tokens).reshape(b, t, kv, hd)
    scores = jnp.einsum("btjgd,bsjd->bjgts", q, k) * hd ** -0.5
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bjgts,bsjd->btjgd", probs, v).reshape(b, t, kv * groups * hd)
    return self.o_proj(out, tokens)


class MLP(nnx.Module):
  """`down_proj(silu(gate_proj(x)) * up_proj(x))`."""

  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs: nnx.Rngs):
    d, ff = config.hidden_size, config.intermediate_size
    make = lambda name, n_in, n_out, group=None: lora.LoraLinear(
        n_in, n_out, hf_name=f"{prefix}.{name}", use_bias=config.mlp_bias, dtype=dtype, rngs=rngs,
        input_group=group)
    self.gate_proj = make("gate_proj", d, ff, f"{prefix}.input")   # gate, up: one input
    self.up_proj = make("up_proj", d, ff, f"{prefix}.input")
    self.down_proj = make("down_proj", ff, d)

  def __call__(self, x: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
    hidden = jax.nn.silu(self.gate_proj(x, tokens)) * self.up_proj(x, tokens)
    return self.down_proj(hidden, tokens)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, prefix: str, dtype, rngs: nnx.Rngs):
    self.prefix = prefix
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.self_attn = Attention(config, f"{prefix}.self_attn", dtype, rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    self.mlp = MLP(config, f"{prefix}.mlp", dtype, rngs)

  def __call__(self, x, cos, sin, mask, tokens=None):
    """`tokens` [B, T] (the attention_mask): which rows the layers' recordings count."""
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, tokens)
    return x + self.mlp(self.post_attention_layernorm(x), tokens)


class LlamaModel(nnx.Module):
  """The decoder: input_ids [B, T] -> last hidden states [B, T, hidden] (after the final norm).

  HF keys start with `model.` (the base model of both heads).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, rngs)
    self.layers = nnx.List([DecoderLayer(config, f"{_PREFIX}.layers.{i}", dtype, rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    input_ids, attention_mask, position_ids = _check_inputs(input_ids, attention_mask,
                                                            position_ids)
    b, t = input_ids.shape
    x = self.embed_tokens(input_ids)
    cos, sin = rotary_embedding(position_ids, self.config, x.dtype)
    mask = attention_mask_matrix(attention_mask, b, t)
    for layer in self.layers:
      x = layer(x, cos, sin, mask, attention_mask)
    return self.norm(x)


def _check_inputs(input_ids, attention_mask, position_ids):
  """Shapes checked (they are static under jit); position_ids default to arange(T)."""
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integer token ids [batch, length]; got shape "
                     f"{input_ids.shape} of {input_ids.dtype}")
  if attention_mask is not None:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}; it must be "
                       f"[batch, length] of 1 (token) / 0 (padding) like input_ids "
                       f"{input_ids.shape}")
  if position_ids is None:
    position_ids = jnp.arange(input_ids.shape[1])[None]
  else:
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 1:
      position_ids = position_ids[None]
    if position_ids.ndim != 2 or position_ids.shape[1] != input_ids.shape[1] or (
        position_ids.shape[0] not in (1, input_ids.shape[0])):
      raise ValueError(f"position_ids has shape {position_ids.shape}; expected [length], "
                       f"[1, length] or [batch, length] for input_ids {input_ids.shape}")
  return input_ids, attention_mask, position_ids


class LlamaForCausalLM(nnx.Module):
  """input_ids [B, T] -> next-token logits [B, T, vocab].

  With `tie_word_embeddings` the output projection is the embedding matrix
  (there is no `lm_head` layer), else `lm_head` is a `LoraLinear`.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else lora.LoraLinear(
        config.hidden_size, config.vocab_size, hf_name="lm_head", dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    h = self.model(input_ids, attention_mask, position_ids)
    if self.lm_head is None:
      return self.model.embed_tokens.attend(h)
    return self.lm_head(h, attention_mask)


def last_token_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
  """[B]: HF's pooling position, the rightmost token that is not `pad_token_id`
  (left or right padding; 0 for a row of padding only), or the last position
  without a pad token (then only batches of one row, as HF)."""
  b, t = input_ids.shape
  if pad_token_id is None:
    if b != 1:
      raise ValueError("sequence classification of batches of more than one row needs "
                       "pad_token_id in config.json (as in transformers)")
    return jnp.full((b,), t - 1)
  positions = jnp.arange(t) * (input_ids != pad_token_id)
  return jnp.argmax(positions, axis=-1)


class LlamaForSequenceClassification(nnx.Module):
  """input_ids [B, T] -> class logits [B, num_labels] from the `score` head (no bias)
  at `last_token_index`."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, rngs=rngs)
    self.score = lora.LoraLinear(config.hidden_size, config.num_labels, hf_name="score",
                                 dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    h = self.model(input_ids, attention_mask, position_ids)
    index = last_token_index(jnp.asarray(input_ids), self.config.pad_token_id)
    return self.score(h[jnp.arange(h.shape[0]), index])


LlamaForAnyTask = LlamaForCausalLM | LlamaForSequenceClassification
_CLASSES = {"causal_lm": LlamaForCausalLM,
            "sequence_classification": LlamaForSequenceClassification}


@nnx.jit
def forward(model: LlamaForAnyTask, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None) -> jax.Array:
  """`model(input_ids, attention_mask, position_ids)` under `nnx.jit`: compiled once per
  input shape and model structure (attached adapter ranks); state changes made in
  the call (`lora.record_inputs`) reach the model. Works on sharded parameters."""
  return model(input_ids, attention_mask, position_ids)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, input_ids, attention_mask, position_ids):
  return nnx.merge(graphdef, state)(input_ids, attention_mask, position_ids)


def make_forward(model: LlamaForAnyTask):
  """A jitted `f(input_ids, attention_mask=None, position_ids=None)` of `model` as it is now.

  Splits the model once (`nnx.split`), so a call costs only the compiled
  program: for evaluation loops (`forward` walks the model's graph at every
  call, milliseconds per call). Make it again after `lora.attach_adapter`,
  `detach_adapters` or `load_weights`; models of the same structure share the
  compiled program. Use `forward` while recording inputs (`lora.record_inputs`).
  """
  graphdef, state = nnx.split(model)

  def apply(input_ids, attention_mask=None, position_ids=None) -> jax.Array:
    return _apply(graphdef, state, input_ids, attention_mask, position_ids)

  return apply


# ------------------------------------------------------------------- weights


def hf_targets(model: LlamaForAnyTask) -> dict[str, tuple[nnx.Variable, bool]]:
  """{HF key: (variable, transposed)} of every parameter of `model`."""
  base = model.model
  out = {f"{_PREFIX}.embed_tokens.weight": (base.embed_tokens.weight, False),
         f"{_PREFIX}.norm.weight": (base.norm.weight, False)}
  for layer in base.layers:
    for name in ("input_layernorm", "post_attention_layernorm"):
      out[f"{layer.prefix}.{name}.weight"] = (getattr(layer, name).weight, False)
  for layer in lora.linears(model).values():
    out.update(lora.linear_targets(layer))
  return out


def _missing_hint(missing: list[str]) -> str:
  if "score.weight" in missing:
    return (" (a causal-LM checkpoint has no `score` head: pass weights= that include it, "
            "e.g. itertools.chain(backbone.read_backbone(model_dir).items(), "
            "adapter.extra.items()))")
  if "lm_head.weight" in missing:
    return " (config.json says tie_word_embeddings=false)"
  return ""


Weights = weights_lib.Weights


def load_weights(model: LlamaForAnyTask, weights: Weights, source: str = "weights") -> list[str]:
  """Replaces some parameters of a loaded model, in place, by HF-named tensors.

  For tensors beside the LoRA factors of an adapter, e.g. a classification head
  trained with `modules_to_save`: `load_weights(model, adapter.extra)` after
  `lora.attach_adapter(model, adapter)`. Keys the model does not have are
  skipped; each tensor is cast to the parameter's dtype and placed with the
  parameter's sharding. Returns the keys loaded.

  Raises:
    ValueError naming `source` and the key whose shape differs from the model's.
  """
  return weights_lib.replace_weights(hf_targets(model), weights, source)


def from_pretrained(model_dir: str, *, task: str = "causal_lm", dtype=jnp.float32,
                    weights: Weights | None = None,
                    mesh: Mesh | None = None) -> LlamaForAnyTask:
  """Loads a HF Llama checkpoint (config.json + safetensors), without torch.

  Args:
    model_dir: a directory with config.json and model.safetensors, or a sharded
      checkpoint with model.safetensors.index.json.
    task: "causal_lm" (`LlamaForCausalLM`, logits [B, T, vocab]) or
      "sequence_classification" (`LlamaForSequenceClassification`, logits
      [B, num_labels]; needs `score.weight`).
    dtype: the parameter and compute dtype (weights are cast to it; bf16
      checkpoints load as they are with `jnp.bfloat16`).
    weights: instead of the checkpoint's tensors, a {key: array} mapping or a
      (key, array) iterator with HF key names, e.g.
      `full_model.merged_model_weights(result, model_dir)` for a merged model; keys
      the model does not use are skipped, a repeated key keeps its last value.
    mesh: a `sharding.make_mesh()` mesh: every weight is placed with
      `sharding.weight_sharding` (HF rows over the mesh when they divide its
      size, else replicated); from files each device's block is read by itself.

  The model is built abstractly (`nnx.eval_shape`) and filled tensor by
  tensor, so no random weights are ever allocated.

  Raises:
    FileNotFoundError without config.json or safetensors; ValueError for an
    unsupported config, or naming the checkpoint file and the key that is
    missing or whose shape differs from config.json's.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")
  config = read_config(model_dir)
  return weights_lib.load_pretrained(
      lambda: _CLASSES[task](config, dtype=dtype, rngs=nnx.Rngs(0)), hf_targets, model_dir,
      dtype=dtype, weights=weights, mesh=mesh, hint=_missing_hint)


__all__ = ["LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
           "from_pretrained", "forward", "make_forward", "load_weights", "hf_targets",
           "read_config", "rope_frequencies", "last_token_index", "TASKS", "ROPE_TYPES"]
