"""`key=value` items of a config argument (knots_jax/io/config_args.py)."""

import ml_collections
import pytest

from knots_jax.io import config_args


def _config():
  c = ml_collections.ConfigDict()
  c.progress, c.steps, c.rate, c.name = True, 3, 0.5, "a"
  c.sub = dict(flag=False)
  return c


@pytest.mark.parametrize("word,want", [("true", True), ("Yes", True), ("1", True), ("on", True),
                                       ("false", False), ("NO", False), ("0", False),
                                       ("off", False)])
def test_booleans_read_both_ways(word, want):
  assert config_args.apply_arg(_config(), f"progress={word}").progress is want
  assert config_args.apply_arg(_config(), f"sub.flag={word}").sub.flag is want


@pytest.mark.parametrize("item,match", [
    ("progress=ture", "`progress` is true or false"),
    ("sub.flag=2", "`sub.flag` is true or false"),
    ("steps=three", "`steps` must be of type int; got 'three'"),
    ("rate=fast", "`rate` must be of type float"),
    ("nope=1", "unknown field `nope`"),
    ("other.flag=1", "no config section `other`")])
def test_bad_values_name_the_field(item, match):
  with pytest.raises(ValueError, match=match):
    config_args.apply_arg(_config(), item, source="x.py")


def test_typed_values():
  c = config_args.apply_arg(_config(), "steps=7,rate=0.25,name=b")
  assert (c.steps, c.rate, c.name) == (7, 0.25, "b")
