"""The options of `knots-jax merge`: defaults and help in one table.

Config files under `configs/` start from `merge_config()` and change what they
need; `knots-jax merge --help` prints this table, so every option is explained
in one place.
"""

from __future__ import annotations

from typing import Callable, Mapping

import ml_collections

from knots_jax import checks


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, *,
              presets: Mapping[str, Callable[[ml_collections.ConfigDict], object]] | None = None,
              source: str = "config") -> ml_collections.ConfigDict:
  """Applies a config file's argument (`configs/x.py:<arg>`) in place and returns `config`.

  `arg` is comma-separated: preset names (`presets`, applied in order) and
  `key=value` items, where dotted keys reach nested sections
  (`lora.steps=200`) and values take the type of the field they replace. A
  bare word that is not a preset continues the previous value, so lists need
  no quoting: `adapters=a/,b/,c/`, `tasks=mnist,svhn,quick`.

  Raises:
    ValueError naming `source` and the unknown preset, section or field (with
    the valid names).
  """
  presets = presets or {}
  items: list[str] = []
  for item in [i.strip() for i in (arg or "").split(",") if i.strip()]:
    if "=" not in item and item not in presets and items and "=" in items[-1]:
      items[-1] += "," + item
    else:
      items.append(item)
  for item in items:
    if "=" not in item:
      if item not in presets:
        valid = f"valid presets: {', '.join(presets)} (or key=value)" if presets else (
            "expected key=value")
        raise ValueError(f"{source}: unknown preset `{item}`; {valid}")
      presets[item](config)
      continue
    key, value = item.split("=", 1)
    *path, last = key.strip().split(".")
    node = config
    for part in path:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ValueError(f"{source}: no config section `{part}` in `{key}`")
      node = node[part]
    if last not in node:
      raise ValueError(f"{source}: unknown field `{key}`; fields here: {', '.join(node.keys())}")
    node[last] = _parsed(node[last], value, key, source)
  return config


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parsed(current, value: str, key: str, source: str):
  """`value` as the type of the field's current value; a ValueError naming the field."""
  if isinstance(current, bool):
    word = value.strip().lower()
    if word not in _TRUE + _FALSE:
      raise ValueError(f"{source}: `{key}` is true or false ({'/'.join(_TRUE)} or "
                       f"{'/'.join(_FALSE)}); got {value!r}")
    return word in _TRUE
  try:
    return type(current)(value)
  except (TypeError, ValueError):
    raise ValueError(f"{source}: `{key}` must be of type {type(current).__name__}; "
                     f"got {value!r}") from None


def parse_preset(config: ml_collections.ConfigDict, arg: str | None,
                 presets: Mapping[str, Mapping[str, object]] | None = None
                 ) -> ml_collections.ConfigDict:
  """Applies a merge config's argument (`configs/x.py:<preset>,key=value`): the named
  presets' options (`methods.presets`, {name: {option: value}}) in order, then `key=value`."""
  def setter(options):
    def apply(c):
      for k, v in options.items():
        c[k] = float(v) if isinstance(c[k], float) and not isinstance(v, bool) else v
    return apply
  table = {name: setter(options) for name, options in (presets or {}).items()}
  return apply_arg(config, arg, presets=table, source="config argument")


def split_list(value: str) -> list[str]:
  """`"a, b,,c"` -> `["a", "b", "c"]` (`checks.split_list`, the one list parser)."""
  return list(checks.split_list(value))
