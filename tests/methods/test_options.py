"""`MergeConfig`: every option declared once, checked once, and what derives from it."""

import dataclasses
import math

import numpy as np
import pytest

import knots_jax
from knots_jax.methods import registry
from knots_jax.methods.options import MergeConfig, users
from knots_jax.pipeline import config as job_config
from tests import synthetic


@pytest.mark.parametrize("options,match", [
    (dict(scaling=math.nan), "scaling must be a finite number"),
    (dict(scaling=math.inf), "scaling must be a finite number"),
    (dict(scaling="0.5"), "scaling must be a finite number"),
    (dict(top_k=math.nan), "top_k must be a finite number"),
    (dict(top_k=0), "top_k must be positive"),
    (dict(top_k=101), "top_k must be positive and at most 100"),
    (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(tol=math.nan), "tol must be a finite number"),
    (dict(tol=math.inf), "tol"),
    (dict(tol=-1e-5), "tol"),
    (dict(method="nope"), "valid methods: ta, mean, ties"),
    (dict(path="fast"), "alignment path"),
    (dict(concat="diagonal"), "concat must be one of columns, rows"),
    (dict(dtype="float16"), "dtype must be one of float32, float64"),
    (dict(modules_to_save="all"), "modules_to_save"),
    (dict(method="iso_cts", common_fraction=1.5), r"common_fraction must be in \[0, 1\]"),
    (dict(method="tsv_m", tsv_keep=-1), "tsv_keep must be a non-negative integer"),
    (dict(method="sftm", eta=0.0), r"eta must be in \(0, 1\]"),
    (dict(method="knots_ta", eta=0.5), "eta=0.5 applies to sftm, not to `knots_ta`"),
])
def test_every_bad_value_is_refused_with_its_name(options, match):
  with pytest.raises(ValueError, match=match):
    MergeConfig(**options)


def test_values_are_normalised_and_the_old_path_name_is_accepted():
  config = MergeConfig(top_k=20, seed=np.int64(3), path="core", scaling=np.float32(0.5))
  assert config.top_k == 20.0 and isinstance(config.top_k, float)
  assert config.seed == 3 and type(config.seed) is int
  assert config.path == "factors" and config.scaling == 0.5


def test_merge_takes_its_options_from_the_config():
  adapters = synthetic.adapter_set(ranks=(2, 3), seed=0)
  with pytest.raises(ValueError, match="unknown merge option.*'topk'.*valid: method, scaling"):
    knots_jax.merge(adapters, "ties", topk=20)
  with pytest.raises(ValueError, match="seed must be an integer"):
    knots_jax.merge(adapters, "dare", seed=2**32)
  config = MergeConfig(method="ties", top_k=20, scaling=0.5)
  a = knots_jax.merge(adapters, config=config, dtype="float64")
  b = knots_jax.merge(adapters, "ties", top_k=20, scaling=0.5, dtype="float64")
  for m in adapters.module_names:
    np.testing.assert_array_equal(a.delta(m), b.delta(m))
  assert a.config == config.replace(dtype="float64")


def test_settings_list_only_the_options_the_method_reads():
  adapters = synthetic.adapter_set(ranks=(2, 3), seed=0)
  ta = knots_jax.merge(adapters, "knots_ta").settings
  assert "top_k" not in ta and "drop_rate" not in ta and "seed" not in ta
  assert {"method", "scaling", "path", "concat", "tol", "dtype"} <= set(ta)
  ties = knots_jax.merge(adapters, "ties").settings
  assert {"top_k", "top_k_scope"} <= set(ties) and "path" not in ties and "seed" not in ties
  dare = knots_jax.merge(adapters, "dare").settings
  assert {"drop_rate", "seed"} <= set(dare) and "top_k" not in dare


def test_who_reads_each_option_follows_the_method_table():
  ties_like = {name for name, m in registry.METHODS.items() if m.combine == "ties"}
  # ... and TIES on each LoRA factor (dm_ties, dm_dare_ties, "LoRA Merging with SVD" Table 1).
  assert set(users("top_k")) == ties_like | {"dm_ties", "dm_dare_ties"}
  assert set(users("drop_rate")) == {n for n, m in registry.METHODS.items() if m.dare}
  assert set(users("path")) == {n for n, m in registry.METHODS.items() if m.space == "knots"}
  assert users("eta") == ["sftm"] and set(users("scaling")) == set(registry.METHODS)


def test_the_command_line_config_is_the_two_declarations():
  flat = job_config.merge_config()
  fields = dataclasses.fields(MergeConfig) + dataclasses.fields(job_config.JobConfig)
  assert set(flat.keys()) == {f.name for f in fields}
  job, merge = job_config.job_from_configdict(
      {**flat.to_dict(), "adapters": "a/, b/", "method": "ties", "top_k": 20})
  assert job.adapters == ("a/", "b/") and merge == MergeConfig(method="ties", top_k=20)
  with pytest.raises(ValueError, match="config: unknown option.*nope"):
    job_config.job_from_configdict({**flat.to_dict(), "adapters": "a", "nope": 1})
  with pytest.raises(ValueError, match="config: rank must be a non-negative integer"):
    job_config.job_from_configdict({**flat.to_dict(), "adapters": "a", "rank": -1})
  with pytest.raises(ValueError, match="full_model needs the base model"):
    job_config.JobConfig(adapters=("a",), full_model=True)
