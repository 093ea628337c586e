"""Training with optax: the base ViT on the pretraining scenes, then one LoRA per task.

* `pretrain`: every parameter of the ViT plus throwaway linear heads (one per
  scene target, scenes.TARGETS) on image_embeds, AdamW with warmup and cosine
  decay, gradient clipping. The heads are dropped afterwards.
* `finetune_lora`: LoRA of rank r on q, k, v and out_proj of every layer
  (A as PEFT initialises it, B = 0, so training starts at the base model),
  only the `lora.LoraWeight` factors trained (AdamW), the base frozen; the loss
  is the cross-entropy of the frozen class head (heads.py):
  `logit_scale * cos(image_embeds, class_embedding)`.

Both are pure jitted steps over (trainable, optimizer state) pytrees split off
the NNX model; batches are drawn from fixed pools with a seeded NumPy
generator, so a run is deterministic given its seeds (on one machine and XLA
version: floating-point reductions may differ elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from knots_jax.experiments.offline import scenes, vit
from knots_jax.experiments.offline.tasks import Split
from knots_jax.models import clip, lora


def _optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay, after global-norm clipping."""
  warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), cfg.learning_rate * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _batches(rng: np.random.Generator, n: int, batch_size: int, steps: int):
  """Index batches over a pool of n: shuffled epochs, `steps` batches in all."""
  batch_size = min(batch_size, n)
  order = np.zeros(0, int)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    yield order[:batch_size]
    order = order[batch_size:]


@dataclasses.dataclass(frozen=True)
class TrainLog:
  """Loss at the start and end of training (means over the first / last 10% of steps)."""
  steps: int
  first_loss: float
  last_loss: float
  seconds: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _log(losses: list[float], seconds: float) -> TrainLog:
  tenth = max(1, len(losses) // 10)
  return TrainLog(len(losses), float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])),
                  seconds)


# --------------------------------------------------------------- pretraining


def _masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the examples whose label is not scenes.IGNORE (-1)."""
  valid = labels != scenes.IGNORE
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def whitening_patch_embedding(images: np.ndarray, patch_size: int, dim: int,
                              eps: float = 1e-2) -> np.ndarray:
  """A patch embedding [dim, C, p, p] that whitens image patches (PCA, top `dim` components).

  Starting the patch projection from the principal components of the training
  patches (scaled to unit variance) keeps as much of each patch as `dim`
  numbers can, before any training: the first layer no longer has to be
  learned from scratch, which matters with a few hundred steps on a CPU.
  """
  n, c, size, _ = images.shape
  g = size // patch_size
  patches = images.reshape(n, c, g, patch_size, g, patch_size).transpose(0, 2, 4, 1, 3, 5)
  patches = patches.reshape(-1, c * patch_size * patch_size).astype(np.float64)
  patches = patches - patches.mean(0)
  values, vectors = np.linalg.eigh(patches.T @ patches / len(patches))
  order = np.argsort(values)[::-1][:dim]
  weight = (vectors[:, order] / np.sqrt(values[order] + eps)).T
  if weight.shape[0] < dim:                 # fewer patch values than dims: pad with zeros
    weight = np.concatenate([weight, np.zeros((dim - weight.shape[0], weight.shape[1]))])
  return weight.reshape(dim, c, patch_size, patch_size).astype(np.float32)


def sincos_position_embedding(grid: int, dim: int) -> np.ndarray:
  """[1 + grid^2, dim]: 2-D sine-cosine position codes (MAE's), a zero row for the CLS token.

  An initial value only (the embedding is trained): with whitened patches of
  unit variance, the default 0.02-scaled random positions are too faint for
  attention to find where things are within a short training run.
  """
  quarter = dim // 4
  freqs = 1.0 / (100.0 ** (np.arange(quarter) / max(quarter, 1)))
  ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  parts = []
  for coord in (ys.ravel(), xs.ravel()):
    angles = coord[:, None] * freqs[None]
    parts += [np.sin(angles), np.cos(angles)]
  codes = np.concatenate(parts, axis=1)
  codes = np.pad(codes, ((0, 0), (0, dim - codes.shape[1])))
  return np.concatenate([np.zeros((1, dim)), codes]).astype(np.float32)


def pretrain(config: clip.CLIPVisionConfig, cfg: ml_collections.ConfigDict, *, seed: int,
             progress: bool = False) -> tuple[clip.CLIPVisionModelWithProjection, TrainLog]:
  """A ViT trained on `cfg.examples` pretraining scenes for `cfg.steps` steps.

  cfg: steps, batch_size, examples, learning_rate, weight_decay, warmup_fraction,
  whiten_patches (start the patch embedding from `whitening_patch_embedding`),
  sincos_positions (start the position embedding from `sincos_position_embedding`).
  """
  model = vit.init_vit(config, seed)
  rng = np.random.default_rng([seed, 1])
  images, targets = scenes.make_scenes(rng, cfg.examples, config.image_size)
  if cfg.whiten_patches:
    model.embeddings.patch_embedding[...] = jnp.asarray(whitening_patch_embedding(
        images[:2000], config.patch_size, config.hidden_size))
  if cfg.sincos_positions:
    model.embeddings.position_embedding[...] = jnp.asarray(sincos_position_embedding(
        config.image_size // config.patch_size, config.hidden_size))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  key = jax.random.key(seed)
  heads = {name: jax.random.normal(jax.random.fold_in(key, i), (config.projection_dim, c))
           * config.projection_dim ** -0.5
           for i, (name, c) in enumerate(scenes.TARGETS.items())}
  trainable = {"vit": params, "heads": heads}
  tx = _optimizer(cfg)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state, x, y):
    def loss_fn(t):
      embeds = nnx.merge(graphdef, t["vit"], rest)(x)
      return sum(_masked_cross_entropy(embeds @ t["heads"][k], y[k]) for k in scenes.TARGETS)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  losses = []
  start = time.perf_counter()
  batches = _batches(rng, len(images), cfg.batch_size, cfg.steps)
  for idx in tqdm.tqdm(batches, total=cfg.steps, desc="pretrain", disable=not progress):
    trainable, opt_state, loss = step(trainable, opt_state, images[idx],
                                      {k: v[idx] for k, v in targets.items()})
    losses.append(float(loss))
  nnx.update(model, trainable["vit"])
  return model, _log(losses, time.perf_counter() - start)


# ----------------------------------------------------------------------- LoRA


def init_lora(model: clip.CLIPVisionModelWithProjection, modules: list[str], rank: int,
              alpha: float, seed: int) -> None:
  """Attaches fresh LoRA factors to `modules`: A ~ U(+-1/sqrt(in)) as PEFT's
  kaiming_uniform(a=sqrt(5)), B = 0; PEFT's scale alpha / r."""
  layers = lora.linears(model)
  key = jax.random.key(seed)
  for i, name in enumerate(modules):
    layer = layers[name]
    bound = 1.0 / math.sqrt(layer.in_features)
    a = jax.random.uniform(jax.random.fold_in(key, i), (rank, layer.in_features),
                           minval=-bound, maxval=bound)
    layer.set_lora(np.asarray(a), np.zeros((layer.out_features, rank), np.float32), alpha / rank)


def lora_factors(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{module: (a [r, in], b [out, r])} of every layer with attached LoRA factors."""
  return {name: (np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...]))
          for name, layer in lora.linears(model).items() if layer.lora_a is not None}


def finetune_lora(model: clip.CLIPVisionModelWithProjection, train: Split, head: np.ndarray,
                  logit_scale: float, cfg: ml_collections.ConfigDict, *, seed: int,
                  progress: bool = False) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                   TrainLog]:
  """Trains one LoRA on `train` against the frozen `head` [C, D]; returns its factors.

  The model's own weights are not changed (the LoRA is detached at the end).
  cfg: rank, alpha, steps, batch_size, learning_rate, weight_decay, warmup_fraction.
  """
  modules = vit.lora_module_names(model.config)
  init_lora(model, modules, cfg.rank, cfg.alpha, seed)
  try:
    graphdef, factors, rest = nnx.split(model, lora.LoraWeight, ...)
    tx = _optimizer(cfg)
    opt_state = tx.init(factors)
    head = jnp.asarray(head, jnp.float32)

    @jax.jit
    def step(factors, opt_state, x, y):
      def loss_fn(f):
        embeds = nnx.merge(graphdef, f, rest)(x)
        unit = embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)
        logits = logit_scale * unit @ head.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      loss, grads = jax.value_and_grad(loss_fn)(factors)
      updates, opt_state = tx.update(grads, opt_state, factors)
      return optax.apply_updates(factors, updates), opt_state, loss

    rng = np.random.default_rng([seed, 2])
    losses = []
    start = time.perf_counter()
    batches = _batches(rng, len(train), cfg.batch_size, cfg.steps)
    for idx in tqdm.tqdm(batches, total=cfg.steps, desc=f"LoRA {train.task}",
                         disable=not progress):
      factors, opt_state, loss = step(factors, opt_state, train.images[idx], train.labels[idx])
      losses.append(float(loss))
    nnx.update(model, factors)
    return lora_factors(model), _log(losses, time.perf_counter() - start)
  finally:
    lora.detach_adapters(model)


__all__ = ["pretrain", "finetune_lora", "init_lora", "lora_factors", "TrainLog"]
