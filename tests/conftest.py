"""Shared fixtures. float64 is enabled so the NumPy references can be matched tightly;
the library itself computes in the dtypes it is given (float32 by default)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile into memory only; tests/parallel/test_programs.py checks the persistent cache.
os.environ.setdefault("KNOTS_JAX_COMPILE_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
  """A tiny random Llama and three PEFT adapters of ranks 4, 8, 6 (alpha != r in two)."""
  from tests import peft_factory
  root = tmp_path_factory.mktemp("llama_family")
  return peft_factory.make_adapter_family(str(root))
