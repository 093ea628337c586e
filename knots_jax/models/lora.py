"""A linear layer that knows its Hugging Face name and can carry LoRA adapters.

Every evaluation model (`models.llama`, `models.clip`) builds its projections
from `LoraLinear`, constructed with the module path the layer has in the
transformers model (e.g. "model.layers.0.self_attn.q_proj"). That one string
ties together the three ways a model meets a merge:

* weights: `load_weights` reads `<hf_name>.weight` (out x in, PyTorch layout)
  and `<hf_name>.bias` from a flat {key: array} dict, e.g. the output of
  `hf_checkpoint.read_tensors` or `full_model.merged_model_weights` (a merged
  model is simply loaded with its merged weights);
* unmerged adapters: `attach_adapter(model, adapter)` puts each module's LoRA
  factors on the layer of that name, so that
  `y = x W^T + b + scale * (x A^T) B^T`, as PEFT computes it (the per-task
  fine-tuned baselines);
* sharding: the kernel is (in, out), so `sharding` rules can split its rows.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from knots_jax.adapters.peft_files import Adapter, AdapterError
from knots_jax.models import weights as weights_lib


class LoraWeight(nnx.Variable):
  """LoRA factors A and B: not `nnx.Param`, so optimizers of the base skip them,
  and `nnx.Optimizer(model, tx, wrt=LoraWeight)` trains exactly the factors."""


class LoraScale(nnx.Variable):
  """PEFT's fixed scale (alpha / r): never trained."""


class InputGram(nnx.Variable):
  """Running sum of `x^T x` over the layer's inputs (RegMean's Gram matrix), float32."""


class LoraLinear(nnx.Module):
  """`y = x @ kernel + bias [+ scale * (x @ lora_a.T) @ lora_b.T]`.

  Attributes:
    hf_name: the module path in the transformers model.
    kernel: [in, out] (the transpose of PyTorch's `weight`).
    lora_a: [r, in] or None; lora_b: [out, r] or None; lora_scale: scalar.
    input_gram, input_count: while recording (`record_inputs`), the sum of
      `x^T x` [in, in] and the number of input rows seen.
    input_group: layers built with the same group receive the same input;
      `record_inputs` then records it once (`gram_from`: the layer that does).
  """

  def __init__(self, in_features: int, out_features: int, *, hf_name: str,
               use_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               input_group: str | None = None):
    self.hf_name = hf_name
    # Layers of one group always see the same input (q, k, v of one attention):
    # while recording, one of them sums the Gram and the others share it.
    self.input_group = input_group
    self.gram_from: str | None = None
    self.in_features, self.out_features = in_features, out_features
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None)
    self.lora_a: LoraWeight | None = nnx.data(None)
    self.lora_b: LoraWeight | None = nnx.data(None)
    self.lora_scale: LoraScale | None = nnx.data(None)
    self.input_gram: InputGram | None = nnx.data(None)
    self.input_count: InputGram | None = nnx.data(None)
    self.input_rows: InputGram | None = nnx.data(None)

  def __call__(self, x: jnp.ndarray, tokens: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [..., in]; `tokens` (x's leading shape, 1 = token, 0 = padding) only
    decides which input rows the recordings count: padding rows are left out."""
    if self.input_rows is not None:   # capture_inputs: eager only (the shape grows)
      rows = x.reshape(-1, self.in_features).astype(jnp.float32)
      if tokens is not None:
        rows = rows[np.asarray(tokens).reshape(-1) != 0]
      self.input_rows.set_value(jnp.concatenate([self.input_rows.get_value(), rows]))
    if self.input_gram is not None:
      rows = x.reshape(-1, self.in_features).astype(jnp.float32)
      if tokens is None:
        self.input_count[...] += rows.shape[0]
      else:
        keep = tokens.reshape(-1) != 0
        rows = jnp.where(keep[:, None], rows, 0)
        self.input_count[...] += jnp.sum(keep).astype(jnp.int32)
      self.input_gram[...] += rows.T @ rows
    y = x @ self.kernel[...]
    if self.bias is not None:
      y = y + self.bias[...]
    if self.lora_a is not None:
      low = x @ self.lora_a[...].T
      y = y + self.lora_scale[...] * (low @ self.lora_b[...].T)
    return y

  def set_lora(self, a: np.ndarray, b: np.ndarray, scale: float) -> None:
    """Attaches one adapter's factors: a [r, in], b [out, r]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
      raise AdapterError(
          f"module `{self.hf_name}`: LoRA factors a {a.shape}, b {b.shape} do not fit a "
          f"linear layer of in={self.in_features}, out={self.out_features}")
    dtype = self.kernel[...].dtype
    self.lora_a = LoraWeight(jnp.asarray(a, dtype))
    self.lora_b = LoraWeight(jnp.asarray(b, dtype))
    self.lora_scale = LoraScale(jnp.asarray(scale, dtype))

  def clear_lora(self) -> None:
    self.lora_a = self.lora_b = self.lora_scale = None


def record_inputs(model: nnx.Module, names: list[str] | None = None) -> None:
  """Starts accumulating each layer's input Gram matrix (all layers, or `names`).

  Every later forward pass (eager or under `nnx.jit`) adds `x^T x` over its
  input rows; the Llama model passes its `attention_mask` down, so padding
  positions are left out (a layer called without `tokens` counts every row).
  Read with `input_grams`, stop with `stop_recording`.
  """
  layers = linears(model)
  recorders: dict[str, str] = {}   # input group -> the layer that records it
  for name in layers if names is None else names:
    if name not in layers:
      raise ValueError(f"no layer `{name}` in the model")
    layer = layers[name]
    group = layer.input_group or name
    if group in recorders:            # same input as a recording layer: share its Gram
      layer.gram_from = recorders[group]
      continue
    recorders[group] = name
    layer.input_gram = InputGram(jnp.zeros((layer.in_features,) * 2, jnp.float32))
    layer.input_count = InputGram(jnp.zeros((), jnp.int32))


def input_grams(model: nnx.Module) -> dict[str, tuple[np.ndarray, int]]:
  """{layer name: (sum of x^T x [in, in], number of rows)} of the recording layers
  (layers sharing an input share one array)."""
  layers = linears(model)
  own = {name: (np.asarray(layer.input_gram[...]), int(layer.input_count[...]))
         for name, layer in layers.items() if layer.input_gram is not None}
  shared = {name: own[layer.gram_from] for name, layer in layers.items()
            if layer.gram_from is not None and layer.gram_from in own}
  both = own | shared
  return {name: both[name] for name in layers if name in both}   # in layer order


def capture_inputs(model: nnx.Module, run: Callable[[], object],
                   names: Iterable[str]) -> dict[str, np.ndarray]:
  """{layer name: every input row [rows, in] the layer received while `run()` ran}.

  For analyses that need the inputs themselves (CKA of task updates, not just
  RegMean's Grams). `run` must call the model eagerly (not under jit), e.g.
  `lambda: model(images)`; rows are float32.
  """
  layers = linears(model)
  names = list(names)
  missing = [n for n in names if n not in layers]
  if missing:
    raise ValueError(f"no layer {missing} in the model")
  for name in names:
    layers[name].input_rows = InputGram(jnp.zeros((0, layers[name].in_features), jnp.float32))
  try:
    run()
    return {name: np.asarray(layers[name].input_rows[...]) for name in names}
  finally:
    for name in names:
      layers[name].input_rows = None


def stop_recording(model: nnx.Module) -> None:
  for layer in linears(model).values():
    layer.input_gram = layer.input_count = None
    layer.gram_from = None


def linears(model: nnx.Module) -> dict[str, LoraLinear]:
  """Every `LoraLinear` of `model`, by its Hugging Face module path."""
  return {m.hf_name: m for _, m in nnx.iter_graph(model) if isinstance(m, LoraLinear)}


def attach_adapter(model: nnx.Module, adapter: Adapter) -> None:
  """Puts `adapter`'s LoRA on the layers of `model` (replacing any attached one).

  Raises AdapterError naming the adapter file and the modules the model lacks.
  """
  layers = linears(model)
  missing = sorted(set(adapter.modules) - set(layers))
  if missing:
    raise AdapterError(
        f"{adapter.path}: adapted modules not in the model: {', '.join(missing[:5])}"
        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
  detach_adapters(model)
  for name, f in adapter.modules.items():
    layers[name].set_lora(f.a, f.b, f.scale)


def detach_adapters(model: nnx.Module) -> None:
  """Removes every attached LoRA: the model is the base model again."""
  for layer in linears(model).values():
    layer.clear_lora()


def linear_targets(layer: LoraLinear) -> dict[str, tuple[nnx.Variable, bool]]:
  """{HF key: (variable, transposed)} of one layer, for `load_hf_tensors`."""
  out = {f"{layer.hf_name}.weight": (layer.kernel, True)}
  if layer.bias is not None:
    out[f"{layer.hf_name}.bias"] = (layer.bias, False)
  return out


def load_hf_tensors(targets: Mapping[str, tuple[nnx.Variable, bool]],
                    tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
  """Assigns HF tensors to model variables, in place, cast to each variable's dtype.

  Args:
    targets: {HF key: (variable, transposed)}; a model builds it from
      `linear_targets` of its layers plus its embeddings and norms.
    tensors: {HF key: array (NumPy or jax)}; keys not in `targets` (e.g.
      rotary caches, a head the model does not have) are ignored.
    source: names the checkpoint in errors.

  Raises:
    ValueError naming the source and the keys that are missing, or the key whose
    shape differs from the model's.
  """
  missing = sorted(set(targets) - set(tensors))
  if missing:
    raise weights_lib.missing_error(source, missing)
  weights_lib.check_shapes(targets, {k: tuple(np.shape(v)) for k, v in tensors.items()},
                           lambda key: source)
  for key, (var, transposed) in targets.items():
    value = jnp.asarray(tensors[key], var.get_value().dtype)
    var.set_value(value.T if transposed else value)
