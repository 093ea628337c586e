"""`knots-jax`: flags in, one library call, a summary out (`knots_jax.cli.main.run`).

`main` is not imported here, so that `python -m knots_jax.cli.main` runs it once,
without runpy's warning about a module already in sys.modules.
"""
