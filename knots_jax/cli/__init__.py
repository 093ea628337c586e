"""`knots-jax`: flags in, one library call, a summary out (`main.run`)."""

from knots_jax.cli.main import run

__all__ = ["run"]
