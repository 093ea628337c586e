"""A merge job from files to files (what `knots-jax merge` runs).

* `config`: `JobConfig` (what to read and write) and the flat config of the
  command line, with its help; no JAX.
* `run`: `run(job, config)`: load, check, align or restore the cache, merge,
  write, and the summary.
"""

__all__ = ["config", "run"]
