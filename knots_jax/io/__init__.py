"""Files in and out that know nothing of merging: the bottom layer of the package.

* `hf_checkpoint`: Hugging Face safetensors checkpoints in (headers, chosen
  tensors, sharded reads onto a mesh).
* `safetensors_slots`: safetensors files written slot by slot, in any order.
* `output_dir`: atomic output directories and the one JSON writer.
* `config_args`: the `configs/x.py:key=value,...` argument of a config file.
"""

__all__ = ["config_args", "hf_checkpoint", "output_dir", "safetensors_slots"]
