"""Real PEFT adapters on tiny random transformers models, for the tests.

Everything here is written by `transformers` and `peft` themselves, so the tests
read files in exactly the format users have. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import peft
import torch
import transformers

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama_config(**overrides: Any) -> transformers.LlamaConfig:
  """A 2-layer Llama with grouped-query attention (k, v narrower than q, o)."""
  kwargs = dict(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False)
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def make_base_model(path: str, seed: int = 0, **config_overrides: Any) -> str:
  """Writes a random tiny Llama to `path` (model.safetensors + config.json)."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(tiny_llama_config(**config_overrides))
  model.save_pretrained(path)
  return path


def load_base_model(path: str) -> torch.nn.Module:
  model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def make_lora_adapter(
    base_path: str,
    out_path: str,
    *,
    seed: int,
    r: int = 4,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    safe_serialization: bool = True,
    **lora_kwargs: Any,
) -> str:
  """Writes a PEFT LoRA adapter with random (non-zero) A and B to `out_path`."""
  torch.manual_seed(seed)
  model = load_base_model(base_path)
  config = peft.LoraConfig(
      r=r, lora_alpha=r if lora_alpha is None else lora_alpha,
      target_modules=list(target_modules), init_lora_weights=False,
      **lora_kwargs)
  peft_model = peft.get_peft_model(model, config)
  # init_lora_weights=False draws B at random too; make the scale of A and B
  # comparable so that updates are O(0.1) like a fine-tuned adapter.
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if "lora_" in name:
        param.normal_(0.0, 0.2)
  peft_model.save_pretrained(out_path, safe_serialization=safe_serialization)
  return out_path


def peft_delta_weights(base_path: str, adapter_path: str) -> dict[str, torch.Tensor]:
  """PEFT's own `get_delta_weight` for every LoRA module, keyed by module path.

  The key is the module path in the base model (e.g.
  `model.layers.0.self_attn.q_proj`), the value is in the base weight's layout
  (PEFT transposes for fan_in_fan_out).
  """
  model = peft.PeftModel.from_pretrained(load_base_model(base_path), adapter_path)
  deltas = {}
  for name, module in model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
      key = name.removeprefix("base_model.model.")
      deltas[key] = module.get_delta_weight("default").detach().clone()
  return deltas


def make_adapter_family(
    root: str,
    ranks: Sequence[int] = (4, 8, 6),
    alphas: Sequence[float | None] = (None, 16, 3),
    base_seed: int = 0,
) -> tuple[str, list[str]]:
  """A base model and one adapter per rank under `root`; returns their paths."""
  base = make_base_model(os.path.join(root, "base"), seed=base_seed)
  adapters = []
  for i, (r, alpha) in enumerate(zip(ranks, alphas)):
    adapters.append(make_lora_adapter(
        base, os.path.join(root, f"task{i}"), seed=100 + i, r=r, lora_alpha=alpha))
  return base, adapters


CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_clip_adapter(base: str, out: str, seed: int, r: int = 4, alpha: float = 8) -> str:
  """A PEFT LoRA on q/k/v/out_proj of a saved CLIPVisionModelWithProjection, random
  non-zero A and B (N(0, 0.2))."""
  torch.manual_seed(seed)
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(base, dtype=torch.float32)
  config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(CLIP_ATTENTION),
                           init_lora_weights=False)
  model = peft.get_peft_model(model.eval(), config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name:
        param.normal_(0.0, 0.2)
  model.save_pretrained(out)
  return out
