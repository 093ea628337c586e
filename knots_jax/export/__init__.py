"""A `MergeResult` → files.

* `peft_adapter`: a PEFT adapter (exact, or truncated to a rank).
* `merged_weights`: base + update of the adapted modules, with the base's key names.
* `full_model`: the whole merged model as HF safetensors shards.
* `orbax_model`: the whole merged model as an Orbax checkpoint (imports Orbax).
"""

__all__ = ["full_model", "merged_weights", "orbax_model", "peft_adapter"]
