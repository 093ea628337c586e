"""Runs merges on a mesh of CPU host devices, in its own process (see test_sharding.py).

  python tests/sharded_worker.py '<json config>'

config: {"devices": local host devices, "out": path of the .npz (written by
process 0), "cases": [case, ...], "distributed": optional kwargs of
`sharding.initialize` (coordinator_address, num_processes, process_id)}.
A case: {"name", "layers", "method", "kwargs", optional "big": wider modules}.
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
  from knots_jax import merging, sharding

  sharding.initialize(**config.get("distributed", {}))
  mesh = sharding.make_mesh()
  out, info = {}, {"process_count": jax.process_count(), "devices": jax.device_count(),
                   "local_devices": jax.local_device_count(), "cases": {}}
  for case in config["cases"]:
    adapters = case_adapters(case)
    method = merging.get_method(case["method"])
    start = time.perf_counter()
    if method.knots:
      alignment = merging.align(adapters, mesh=mesh)
      rep = alignment.aligned[0].rep
      seen = {"rep_shape": list(rep.shape), "rep_spec": str(rep.sharding.spec),
              "rep_devices": len(rep.sharding.device_set)}
      result = merging.merge(alignment, case["method"], **case["kwargs"])
    else:
      seen = {}
      result = merging.merge(adapters, case["method"], mesh=mesh, **case["kwargs"])
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = merging.merge(alignment if method.knots else adapters, case["method"], mesh=mesh,
                          **case["kwargs"])
    for s in again.stacks:
      jax.block_until_ready(s.delta if s.delta is not None else s.a)
    warm = time.perf_counter() - start
    for module, delta in result.deltas():
      out[f"{case['name']}/{module}"] = delta
    info["cases"][case["name"]] = dict(seen, seconds_first=first, seconds_warm_merge=warm,
                                       threshold=result.stats.get("threshold"))
  if jax.process_index() == 0:
    np.savez(config["out"], **out)
    with open(config["out"] + ".json", "w") as f:
      json.dump(info, f, indent=1)
  if config.get("distributed"):
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
