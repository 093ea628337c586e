"""The papers' settings as presets: each is a valid MergeConfig, applies in order on the
command line, and merges as its options say (against the float64 reference)."""

import os

import numpy as np
import pytest

import knots_jax
from knots_jax.cli import main
from knots_jax.methods import presets
from tests import reference, synthetic

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
MERGE_CONFIG = os.path.join(REPO, "configs", "merge.py")
DEMO = os.path.join(REPO, "assets", "demo", "adapters")


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_is_a_valid_config_that_keeps_its_options(name):
  preset = presets.get_preset(name)
  config = preset.config()
  for key, value in preset.options.items():
    assert getattr(config, key) == value, key
    assert config.applies(key), f"{name}: {key} is not read by {config.method}"
  assert preset.source
  # On the command line: the preset, then the flags on top.
  loaded = main.load_config(["--config", f"{MERGE_CONFIG}:{name}"])
  for key, value in preset.options.items():
    assert loaded[key] == value, key


def test_a_config_argument_applies_presets_then_options_in_order():
  loaded = main.load_config(["--config", f"{MERGE_CONFIG}:core_space_vit_b32_dare_ties,top_k=20",
                             "--config.scaling=0.9"])
  assert (loaded.method, loaded.top_k, loaded.drop_rate, loaded.scaling,
          loaded.top_k_scope) == ("dare_ties", 20.0, 0.1, 0.9, "layer")
  with pytest.raises(ValueError, match="unknown preset 'nope'; valid presets: knots_vit_b32_ties"):
    presets.get_preset("nope")
  assert presets.get_preset("sftm_vit_b32").config(eta=0.3).eta == 0.3


def test_the_core_space_preset_is_per_layer_ties_in_the_core():
  """core_space_ties = Core Space TIES with per-layer thresholds (the authors' setting)."""
  adapters = synthetic.adapter_set(ranks=(2, 3, 4), seed=4)
  got = knots_jax.merge(adapters, config=presets.get_preset("core_space_ties").config(
      dtype="float64", top_k=40))
  expected = reference.core_merge(reference.lora_factors(adapters), "core_ties", top_k=40,
                                  top_k_scope="layer")
  model = reference.core_merge(reference.lora_factors(adapters), "core_ties", top_k=40)
  for m, exp in expected.items():
    np.testing.assert_allclose(got.delta(m), exp, atol=1e-9 * np.abs(exp).max())
  assert any(np.abs(expected[m] - model[m]).max() > 1e-6 for m in expected)


def test_presets_are_listed_with_their_sources(capsys):
  assert main.run(["presets"]) == 0
  text = capsys.readouterr().out
  for name, preset in presets.PRESETS.items():
    assert name in text and preset.source in text


def test_a_preset_runs_from_the_command_line(capsys, tmp_path):
  adapters = ",".join(os.path.join(DEMO, n) for n in ("task_a", "task_b", "task_c"))
  assert main.run(["merge", "--config", f"{MERGE_CONFIG}:lora_svd_mm_svd16,output_rank=2",
                   f"--config.adapters={adapters}", f"--config.output={tmp_path / 'o'}",
                   "--config.progress=false"]) == 0
  written = knots_jax.load_adapters([str(tmp_path / "o" / "adapter")])
  assert {f.rank for f in written.adapters[0].modules.values()} == {2}
