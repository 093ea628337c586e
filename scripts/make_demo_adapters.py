r"""Writes the demo files under assets/demo/: a tiny random Llama and three LoRA adapters.

  python scripts/make_demo_adapters.py            # from the repository root

The base model is random (fixed seed). Each adapter is trained briefly with
PEFT on the CPU (Adam, a few seconds) on its own synthetic next-token task, on
q, k, v and o of both layers; ranks 4, 8, 8 with lora_alpha 8, 16, 8, so PEFT's
scale is 2 for two of them and 1 for the third. Needs torch, transformers, peft
(`pip install -e ".[test]"`). The losses before and after training are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Callable

import peft
import torch
import transformers

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                     "assets", "demo"))
BASE_NAME = "assets/demo/base"   # recorded as base_model_name_or_path, relative to the repo
VOCAB = 128
SEQ = 16
BATCH = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def shift_task(shift: int) -> Callable[[torch.Tensor], torch.Tensor]:
  """Next token = (current token + shift) mod vocab."""
  return lambda x: (x + shift) % VOCAB


def previous_token(x: torch.Tensor) -> torch.Tensor:
  """Next token = the token before the current one (needs attention)."""
  return torch.cat([x[:, :1], x[:, :-1]], dim=1)


def mirror(x: torch.Tensor) -> torch.Tensor:
  """Next token = vocab - 1 - current token."""
  return VOCAB - 1 - x


# name: (task, rank, lora_alpha, seed)
TASKS = {
    "task_a": (shift_task(1), 4, 8, 1),
    "task_b": (previous_token, 8, 16, 2),
    "task_c": (mirror, 8, 8, 3),
}


def base_config() -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False)


def task_loss(model: torch.nn.Module, task, x: torch.Tensor) -> torch.Tensor:
  """Cross-entropy of the task's target at every position."""
  logits = model(input_ids=x).logits
  return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), task(x).reshape(-1))


def train_adapter(base_dir: str, out_dir: str, task, rank: int, alpha: int, seed: int,
                  steps: int, lr: float) -> tuple[float, float]:
  """Trains one LoRA on `task`; returns the held-out loss before and after."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model.config._name_or_path = BASE_NAME   # not this machine's absolute path
  model.name_or_path = BASE_NAME
  config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
  model = peft.get_peft_model(model, config)
  gen = torch.Generator().manual_seed(1000 + seed)
  held_out = torch.randint(0, VOCAB, (64, SEQ), generator=gen)
  model.eval()
  with torch.no_grad():
    before = float(task_loss(model, task, held_out))
  model.train()
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
  for _ in range(steps):
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    loss = task_loss(model, task, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
  model.eval()
  with torch.no_grad():
    after = float(task_loss(model, task, held_out))
  model.save_pretrained(out_dir)
  os.remove(os.path.join(out_dir, "README.md"))   # PEFT's empty model-card template
  return before, after


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=ROOT, help="output directory (default: assets/demo)")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--lr", type=float, default=1e-2)
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)

  base_dir = os.path.join(args.out, "base")
  shutil.rmtree(base_dir, ignore_errors=True)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(base_config()).save_pretrained(base_dir)
  for name, (task, rank, alpha, seed) in TASKS.items():
    out_dir = os.path.join(args.out, "adapters", name)
    shutil.rmtree(out_dir, ignore_errors=True)
    before, after = train_adapter(base_dir, out_dir, task, rank, alpha, seed, args.steps, args.lr)
    print(f"{name}: r={rank} lora_alpha={alpha}  loss {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
  main()
