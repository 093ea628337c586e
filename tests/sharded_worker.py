"""Runs merges on a mesh of CPU host devices, in its own process (see test_sharding.py).

  python tests/sharded_worker.py '<json config>'

config: {"devices": local host devices, "out": path of the .npz (written by
process 0), "cases": [case, ...], "distributed": optional kwargs of
`sharding.initialize` (coordinator_address, num_processes, process_id),
optional "ingredients" and "model" (below)}.
A case: {"name", "layers", "method", "kwargs", optional "big": wider modules,
optional "align": kwargs of `decompose.align` (path, concat, dtype)}.
"ingredients": {"dir", "case"}: the case's alignment saved with Orbax by every
process, restored onto the mesh, merged again: `ingredients/<module>` deltas.
"model": {"base", "adapters", "dir"}: KnOTS-TIES of the PEFT adapters on the
mesh, the full merged model saved with `save_merged_model_orbax` and restored
with `restore_merged_model` onto the mesh: `model/<HF key>` arrays.
The .npz holds `<case>/<module>` merged deltas; `<out>.json` the timings and
the shardings seen. Nothing here touches JAX at import time, so the test
process can import `case_adapters` without XLA_FLAGS.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def case_adapters(case: dict):
  """The in-memory adapters of a case: q_proj and k_proj in `layers` layers."""
  from tests import synthetic
  q, k = ((64, 256), (32, 256)) if case.get("big") else ((12, 10), (6, 10))
  shapes = {**{f"model.layers.{l}.self_attn.q_proj": q for l in range(case["layers"])},
            **{f"model.layers.{l}.self_attn.k_proj": k for l in range(case["layers"])}}
  ranks = (8, 8, 6) if case.get("big") else (2, 3, 4)
  return synthetic.adapter_set(ranks=ranks, seed=case.get("seed", 0), shapes=shapes)


def main(config: dict) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={config['devices']}")
  sys.path.insert(0, ROOT)
  import jax
  jax.config.update("jax_enable_x64", True)   # as tests/conftest.py (computations stay float32)
  import numpy as np

  import knots_jax
  from knots_jax.methods import registry
  from knots_jax.parallel import sharding

  sharding.initialize(**config.get("distributed", {}))
  mesh = sharding.make_mesh()
  out, info = {}, {"process_count": jax.process_count(), "devices": jax.device_count(),
                   "local_devices": jax.local_device_count(), "cases": {}}
  for case in config["cases"]:
    adapters = case_adapters(case)
    method = registry.get_method(case["method"])
    start = time.perf_counter()
    if method.knots:
      alignment = knots_jax.align(adapters, mesh=mesh, **case.get("align", {}))
      rep = alignment.aligned[0].rep
      spec = tuple(rep.sharding.spec)
      seen = {"rep_shape": list(rep.shape), "rep_spec": str(rep.sharding.spec),
              "rep_axes": [spec[i] if i < len(spec) else None for i in range(rep.ndim)],
              "rep_devices": len(rep.sharding.device_set)}
      result = knots_jax.merge(alignment, case["method"], **case["kwargs"])
    else:
      seen = {}
      result = knots_jax.merge(adapters, case["method"], mesh=mesh, **case["kwargs"])
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = knots_jax.merge(alignment if method.knots else adapters, case["method"], mesh=mesh,
                          **case["kwargs"])
    for s in again.stacks:
      jax.block_until_ready(s.delta if s.delta is not None else s.a)
    warm = time.perf_counter() - start
    for module, delta in result.deltas():
      out[f"{case['name']}/{module}"] = delta
    info["cases"][case["name"]] = dict(seen, seconds_first=first, seconds_warm_merge=warm,
                                       threshold=result.stats.get("threshold"))
    if config.get("ingredients", {}).get("case") == case["name"]:
      start = time.perf_counter()
      out.update(_ingredients_round_trip(config["ingredients"]["dir"], alignment, case, mesh,
                                         info))
      info["ingredients"]["seconds"] = time.perf_counter() - start
  bar = sharding.progress_bar(desc="merge", total=1)   # each process: its own labelled line
  bar.update(1)
  with open(config["out"] + f".progress{jax.process_index()}.json", "w") as f:
    json.dump({"label": sharding.host_label(), "desc": bar.desc, "position": abs(bar.pos)}, f)
  bar.close()
  if "model" in config:
    start = time.perf_counter()
    out.update(_model_round_trip(config["model"], mesh, info))
    info["model_seconds"] = time.perf_counter() - start
  if jax.process_index() == 0:
    np.savez(config["out"], **out)
    with open(config["out"] + ".json", "w") as f:
      json.dump(info, f, indent=1)
  if config.get("distributed"):
    jax.distributed.shutdown()


def _ingredients_round_trip(directory, alignment, case, mesh, info) -> dict:
  """Every process saves the alignment, restores it onto the mesh, merges again."""
  import knots_jax
  from knots_jax.alignment import cache
  cache.save_alignment(alignment, directory)
  restored = cache.restore_alignment(directory, mesh=mesh)
  rep = restored.aligned[0].rep
  info["ingredients"] = {"rep_shape": list(rep.shape), "rep_spec": str(rep.sharding.spec),
                         "rep_local_shards": len(rep.addressable_shards),
                         "rep_fully_addressable": rep.is_fully_addressable}
  result = knots_jax.merge(restored, case["method"], **case["kwargs"])
  return {f"ingredients/{m}": d for m, d in result.deltas()}


def _model_round_trip(model, mesh, info) -> dict:
  """The full merged model through Orbax on every process (save, restore onto the mesh),
  and as HF safetensors shards."""
  import knots_jax
  from knots_jax.export import full_model, orbax_model
  from knots_jax.parallel import sharding
  result = knots_jax.merge(knots_jax.load_adapters(model["adapters"]), "knots_ties", top_k=30,
                           mesh=mesh)
  orbax_model.save_merged_model_orbax(result, model["base"], model["dir"], mesh=mesh)
  # HF safetensors too: every process computes the merged tensors, process 0 writes
  full_model.save_merged_model(result, model["base"], model["dir"] + "_safetensors",
                             max_shard_size="20KB", mesh=mesh)
  restored = orbax_model.restore_merged_model(model["dir"], mesh=mesh)
  info["model"] = {key: {"spec": str(v.sharding.spec), "local_shards": len(v.addressable_shards),
                         "fully_addressable": v.is_fully_addressable}
                   for key, v in restored.items()}
  return {f"model/{key}": sharding.to_host(v) for key, v in restored.items()}


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
