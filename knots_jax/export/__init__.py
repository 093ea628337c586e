"""A `MergeResult` → files.

* `peft_adapter`: a PEFT adapter (exact, or truncated to a rank).
* `merged_weights`: base + update of the adapted modules, with the base's key names.
* `full_model`: the whole merged model as HF safetensors shards.
* `orbax_model`: the whole merged model as an Orbax checkpoint (imports Orbax).
"""

from knots_jax.export.merged_weights import save_merged_weights
from knots_jax.export.peft_adapter import save_peft_adapter

__all__ = ["save_merged_weights", "save_peft_adapter"]
