"""PEFT LoRA adapters (and the reference implementation's `.pt` state dicts) as arrays.

An adapter is read into an `Adapter`: per adapted module, the LoRA factors
`a` (r x in), `b` (out x r) and the scale PEFT applies, so that the task update is
`delta = scale * b @ a` (out x in, the mathematical orientation; for
fan_in_fan_out modules PEFT stores the base weight transposed, which only
matters when a dense update is added to a base weight). Several adapters of the
same base model form an `AdapterSet`, checked to line up module by module.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """The LoRA factors of one module of one adapter."""
  a: np.ndarray  # [r, in]  (lora_A.weight)
  b: np.ndarray  # [out, r] (lora_B.weight)
  scale: float   # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

  @property
  def rank(self) -> int:
    return self.a.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    """(out, in) of the task update."""
    return (self.b.shape[0], self.a.shape[1])

  def delta(self) -> np.ndarray:
    """The dense task update `scale * b @ a`, [out, in], in float64."""
    return self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter file or directory."""
  path: str
  name: str
  config: Mapping[str, object]          # adapter_config.json (synthesized for .pt files)
  modules: Mapping[str, LoraFactors]    # module path, e.g. "model.layers.0.self_attn.q_proj"
  extra: Mapping[str, np.ndarray]       # non-LoRA tensors (modules_to_save), key without "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterSet:
  """Adapters of one base model whose modules line up (same names, same shapes)."""
  adapters: tuple[Adapter, ...]

  @property
  def names(self) -> list[str]:
    return [ad.name for ad in self.adapters]

  @property
  def module_names(self) -> list[str]:
    return sorted(self.adapters[0].modules)

  @property
  def fan_in_fan_out(self) -> bool:
    return bool(self.adapters[0].config.get("fan_in_fan_out", False))

  @property
  def base_model(self) -> str | None:
    return self.adapters[0].config.get("base_model_name_or_path")  # type: ignore[return-value]

  def factors(self, module: str) -> list[LoraFactors]:
    """The factors of `module`, one per adapter, in adapter order."""
    return [ad.modules[module] for ad in self.adapters]

  def __len__(self) -> int:
    return len(self.adapters)
