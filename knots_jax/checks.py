"""Validators for values a user passes: config fields, flags, adapter_config.json entries.

Each validator takes a value and returns it normalised (an int as int, a number
as float) or raises `ValueError` saying what was expected and what was given;
the caller names the option and where it came from (`named`). Every range check
of the package is one of these, so each exists once. Nothing here imports JAX.

  >>> fraction(0.5)
  0.5
  >>> named("top_k", number, "nan")
  Traceback (most recent call last):
  ValueError: top_k must be a finite number, got 'nan'
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Callable, Iterable

Check = Callable[[object], object]

SEED_LIMIT = 2**32   # jax.random.key takes a 32-bit seed: larger ones would wrap around


def named(name: str, check: Check, value: object) -> object:
  """`check(value)`, with `name` in front of the message when it fails."""
  try:
    return check(value)
  except ValueError as e:
    raise ValueError(f"{name} {e}") from None


def number(value: object) -> float:
  """A finite real number (not a bool, not NaN or ±inf)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"must be a finite number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"must be a finite number, got {value!r}")
  return value


def integer(value: object) -> int:
  """An int (not a bool; a float only if it is integral, e.g. 16.0 from JSON)."""
  if isinstance(value, bool):
    raise ValueError(f"must be an integer, got {value!r}")
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    return int(value)
  raise ValueError(f"must be an integer, got {value!r}")


def non_negative_int(value: object) -> int:
  value = integer(value)
  if value < 0:
    raise ValueError(f"must be a non-negative integer, got {value}")
  return value


def positive_int(value: object) -> int:
  value = integer(value)
  if value < 1:
    raise ValueError(f"must be a positive integer, got {value}")
  return value


def seed(value: object) -> int:
  """A random seed: an integer in [0, 2**32)."""
  value = integer(value)
  if not 0 <= value < SEED_LIMIT:
    raise ValueError(f"must be an integer in [0, 2**32), got {value}")
  return value


def interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
  """A finite number in [lo, hi] (either end open)."""
  text = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

  def check(value: object) -> float:
    value = number(value)
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
      raise ValueError(f"must be in {text}, got {value:g}")
    return value
  return check


fraction = interval(0.0, 1.0)


def positive(value: object) -> float:
  """A finite number > 0."""
  value = number(value)
  if value <= 0:
    raise ValueError(f"must be a positive finite number, got {value:g}")
  return value


def at_most(limit: float) -> Check:
  """A finite number in [0, limit]."""
  def check(value: object) -> float:
    value = number(value)
    if not 0 <= value <= limit:
      raise ValueError(f"must be in [0, {limit:g}], got {value:g}")
    return value
  return check


def one_of(choices: Iterable[str]) -> Check:
  """One of `choices` (strings)."""
  choices = tuple(choices)

  def check(value: object) -> str:
    if not isinstance(value, str) or value not in choices:
      raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
    return value
  return check


def boolean(value: object) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"must be true or false, got {value!r}")
  return value


def text(value: object) -> str:
  if not isinstance(value, str):
    raise ValueError(f"must be a string, got {value!r}")
  return value


def strings(value: object) -> tuple[str, ...]:
  """A tuple of strings, from a sequence of strings or one comma-separated string."""
  if isinstance(value, str):
    return split_list(value)
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(v.strip() for v in value if v.strip())
  raise ValueError(f"must be a list of strings (or one comma-separated string), got {value!r}")


def split_list(value: str) -> tuple[str, ...]:
  """`"a, b,,c"` -> `("a", "b", "c")`: the one parser of comma-separated lists."""
  return tuple(v.strip() for v in value.split(",") if v.strip())


def number_list(value: object) -> tuple[float, ...]:
  """A tuple of finite numbers, from a sequence or one comma-separated string
  (`"0.5, 1, 0.7"`); empty: none given."""
  items = split_list(value) if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)):
    raise ValueError(f"must be a list of numbers (or one comma-separated string), got {value!r}")
  out = []
  for i, item in enumerate(items):
    if isinstance(item, str):
      try:
        item = float(item)
      except ValueError:
        raise ValueError(f"item {i} must be a finite number, got {item!r}") from None
    out.append(named(f"item {i}", number, item).__float__())
  return tuple(out)


def optional(check: Check) -> Check:
  """None, or a value that passes `check` (JSON's null for "not set")."""
  def check_optional(value: object) -> object:
    return None if value is None else check(value)
  return check_optional


def list_of(check: Check) -> Check:
  """A JSON list (list or tuple) whose every item passes `check`; returned as a tuple."""
  def check_list(value: object) -> tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"must be a list, got {value!r}")
    items = []
    for i, item in enumerate(value):
      try:
        items.append(check(item))
      except ValueError as e:
        raise ValueError(f"item {i} {e}") from None
    return tuple(items)
  return check_list


def mapping_of(check: Check) -> Check:
  """A JSON object (dict with string keys) whose every value passes `check`."""
  def check_mapping(value: object) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
      raise ValueError(f"must be an object of string keys, got {value!r}")
    out = {}
    for key, item in value.items():
      try:
        out[key] = check(item)
      except ValueError as e:
        raise ValueError(f"entry {key!r} {e}") from None
    return out
  return check_mapping


def regex(value: object) -> str:
  """A string that compiles as a Python regular expression."""
  value = text(value)
  try:
    re.compile(value)
  except re.error as e:
    raise ValueError(f"must be a valid regular expression, got {value!r} ({e})") from None
  return value
