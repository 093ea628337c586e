"""Experiments built on `knots_jax.evaluation`: the offline benchmark
(`offline/`) and the paper's real settings (`paper`: the ViT tasks; `nli`:
Llama-3-8B NLI; `real_data`: image folders and JSONL files)."""

__all__ = ["nli", "offline", "paper", "real_data"]
