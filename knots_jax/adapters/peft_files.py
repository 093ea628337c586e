"""PEFT LoRA adapters (and the reference implementation's `.pt` state dicts) as arrays.

An adapter is read into an `Adapter`: per adapted module, the LoRA factors
`a` (r x in), `b` (out x r) and the scale PEFT applies, so that the task update is
`delta = scale * b @ a` (out x in, the mathematical orientation; for
fan_in_fan_out modules PEFT stores the base weight transposed, which only
matters when a dense update is added to a base weight). Several adapters of the
same base model form an `AdapterSet`, checked to line up module by module.

Formats read (`load_adapter`):
* a PEFT directory: `adapter_config.json` + `adapter_model.safetensors`
  (or `adapter_model.bin`, read with `torch.load(weights_only=True)`);
* a single `.pt` / `.pth` / `.bin` file saved with `torch.save` (the reference
  implementation saves `model.state_dict()` of a PEFT model: keys carry
  `lora_A.default`), or a single `.safetensors` file. Without an
  `adapter_config.json` beside it the scale is 1 (the reference's alpha = r).

Only plain LoRA is accepted; everything else raises `AdapterError` naming the
file and the module: other PEFT types, DoRA, embedding and conv LoRA, LoRA
biases, other LoRA variants, a lora_A without lora_B, disagreeing inner
dimensions, ranks that disagree with the config, NaN / inf values, modules
outside `layers_to_transform`. Every `adapter_config.json` field that is used is
checked for its type and range (`_CONFIG_FIELDS`; the error names the file, the
field and the value), every module's scale must be a finite non-zero float32,
and `target_modules` must cover every module the tensors are for, as PEFT
matches it (`_check_targets`): otherwise PEFT would load the adapter as a
no-op on those modules. docs/reliability.md (## Adapter files) lists each
refusal and its test. Non-LoRA tensors of the adapter (modules_to_save,
trained biases) are kept in `Adapter.extra`, never dropped; the frozen base
weights that a whole PEFT model's state dict also holds are not adapter tensors
and are skipped. torch is imported only to read pickled files.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import safetensors

from knots_jax import checks


@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """The LoRA factors of one module of one adapter."""
  a: np.ndarray  # [r, in]  (lora_A.weight)
  b: np.ndarray  # [out, r] (lora_B.weight)
  scale: float   # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

  @property
  def rank(self) -> int:
    return self.a.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    """(out, in) of the task update."""
    return (self.b.shape[0], self.a.shape[1])

  def delta(self) -> np.ndarray:
    """The dense task update `scale * b @ a`, [out, in], in float64."""
    return self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter file or directory."""
  path: str
  name: str
  config: Mapping[str, object]          # adapter_config.json (synthesized for .pt files)
  modules: Mapping[str, LoraFactors]    # module path, e.g. "model.layers.0.self_attn.q_proj"
  extra: Mapping[str, np.ndarray]       # non-LoRA tensors (modules_to_save), key without "base_model.model."


@dataclasses.dataclass(frozen=True)
class AdapterSet:
  """Adapters of one base model whose modules line up (same names, same shapes)."""
  adapters: tuple[Adapter, ...]

  @property
  def names(self) -> list[str]:
    return [ad.name for ad in self.adapters]

  @property
  def module_names(self) -> list[str]:
    return sorted(self.adapters[0].modules)

  @property
  def fan_in_fan_out(self) -> bool:
    return bool(self.adapters[0].config.get("fan_in_fan_out", False))

  @property
  def base_model(self) -> str | None:
    return self.adapters[0].config.get("base_model_name_or_path")  # type: ignore[return-value]

  def factors(self, module: str) -> list[LoraFactors]:
    """The factors of `module`, one per adapter, in adapter order."""
    return [ad.modules[module] for ad in self.adapters]

  def __len__(self) -> int:
    return len(self.adapters)


# ------------------------------------------------------------------ errors


class AdapterError(ValueError):
  """An adapter that cannot be read as plain LoRA, or adapters that do not line up.

  The message names the file, the module and the problem.
  """


# ------------------------------------------------------------ file formats

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which a checkpoint nests its state dict (torch.save({"state_dict": ...})).
_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "lora", "weights")
# Config fields whose variants are not `scale * B @ A` on a plain weight.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true): its update is not B @ A (magnitude vector)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens): the update applies only "
                               "after the invocation tokens",
    "use_qalora": "QA-LoRA (use_qalora=true): lora_A acts on pooled inputs",
    "kasa_config": "KaSA (kasa_config): a diagonal sits between lora_A and lora_B",
    "arrow_config": "Arrow routing (arrow_config)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer_replication: modules refer to replicated layers",
}
# safetensors dtypes NumPy has no name for; read from the raw bytes with ml_dtypes.
_RAW_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?"
                       r"\.(?P<param>weight|bias)$")
_MAX_LISTED = 5


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
  """`a, b, c (and 7 more)`: a few names then a count."""
  items = list(items)
  shown = ", ".join(items[:limit])
  return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _import_torch(path: str):
  """torch, imported only to read pickled files."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise AdapterError(
        f"{path}: reading a pickled (.bin / .pt) file needs torch, which is not installed: "
        "pip install 'knots_jax[torch]' (or re-save the adapter as safetensors)") from e
  return torch


def _find_state_dict(obj: object, path: str) -> Mapping[str, object]:
  """The state dict inside a torch.save'd object: the dict itself, or nested one level."""
  if not isinstance(obj, Mapping):
    raise AdapterError(f"{path}: expected a state dict (a dict of tensors), got "
                       f"{type(obj).__name__}")
  if any(isinstance(k, str) and ".lora_" in k for k in obj):
    return obj
  nested = [k for k in obj if isinstance(obj[k], Mapping)]
  for key in sorted(nested, key=lambda k: (k not in _NESTING_KEYS, str(k))):
    if any(isinstance(k, str) and ".lora_" in k for k in obj[key]):
      return obj[key]
  return obj


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """A torch.save'd state dict as NumPy (floats as float32), loaded with weights_only=True."""
  torch = _import_torch(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors come in many types
    raise AdapterError(
        f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); save only the state dict "
        "(torch.save(model.state_dict(), ...))") from e
  state = _find_state_dict(obj, path)
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      continue  # step counters, config entries of a checkpoint: not tensors
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.to(torch.float32)
    out[str(key)] = value.numpy()
  return out


def _raw_safetensors(path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Tensors whose dtype NumPy cannot name (bf16, fp8), read from the raw bytes."""
  if not keys:
    return {}
  import ml_dtypes   # here, not at the top: its import takes ~1 s, and float32 files need none
  with open(path, "rb") as fh:
    size = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(size))
    out = {}
    for key in keys:
      info = header[key]
      start, end = info["data_offsets"]
      fh.seek(8 + size + start)
      dtype = np.dtype(getattr(ml_dtypes, _RAW_DTYPES[info["dtype"]]))
      out[key] = np.frombuffer(fh.read(end - start), dtype=dtype).reshape(info["shape"])
  return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as NumPy, in its stored dtype (bf16 via ml_dtypes)."""
  open(path, "rb").close()   # the real OSError (safetensors says "No such file" for EACCES)
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      out, raw = {}, []
      for key in f.keys():
        if f.get_slice(key).get_dtype() in _RAW_DTYPES:
          raw.append(key)
        else:
          out[key] = f.get_tensor(key)
  except (OSError, ValueError, TypeError, safetensors.SafetensorError) as e:
    raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e
  out.update(_raw_safetensors(path, raw))
  return out


def _to_float32(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Floating tensors as float32 (bf16, fp16, fp64 alike); other dtypes as stored."""
  out = {}
  for key, value in tensors.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating) or value.dtype.name in _RAW_DTYPES.values():
      value = value.astype(np.float32)
    out[key] = value
  return out


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """A weights file (safetensors or pickled) as float32 NumPy arrays."""
  if path.endswith(".safetensors"):
    return _to_float32(_read_safetensors(path))
  return _to_float32(_read_torch(path))


def _resolve(path: str) -> tuple[str, str | None]:
  """(weights file, adapter_config.json or None) for a PEFT directory or a single file."""
  if os.path.isdir(path):
    config = os.path.join(path, CONFIG_NAME)
    weights = [os.path.join(path, n) for n in (SAFETENSORS_NAME, BIN_NAME)]
    found = [w for w in weights if os.path.isfile(w)]
    if not os.path.isfile(config) or not found:
      missing = [CONFIG_NAME] if not os.path.isfile(config) else []
      if not found:   # either weights file will do: name them only when neither is there
        missing += [SAFETENSORS_NAME, BIN_NAME]
      raise AdapterError(
          f"{path}: not a PEFT LoRA adapter directory: looked for {CONFIG_NAME} and "
          f"{SAFETENSORS_NAME} or {BIN_NAME}; missing: {', '.join(missing)}")
    return found[0], config
  if os.path.isfile(path):
    if not path.endswith((".safetensors",) + _TORCH_SUFFIXES):
      raise AdapterError(f"{path}: unknown adapter file type; expected a PEFT directory, a "
                         ".safetensors file or a torch.save'd .pt / .pth / .bin state dict")
    config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_NAME)
    return path, (config if os.path.isfile(config) else None)
  raise AdapterError(f"{path}: no such file or directory (looked for a PEFT directory with "
                     f"{CONFIG_NAME} + {SAFETENSORS_NAME} / {BIN_NAME}, or a .safetensors / "
                     ".pt / .bin file)")


def _read_config(path: str) -> dict:
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AdapterError(f"{path}: cannot read the adapter config ({e})") from e
  if not isinstance(config, dict):
    raise AdapterError(f"{path}: the adapter config is not a JSON object")
  return config


# -------------------------------------------------------- PEFT semantics


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
  """The first of `pattern_keys` that matches the end of `key_to_match` (PEFT 0.21's rule).

  A pattern key is a regular expression matched against the whole module path or a
  suffix of it that starts after a dot; without a match the module path itself is
  returned (so `pattern.get(result, default)` falls back to the default).
  """
  for key in pattern_keys:
    if re.match(rf"(.*\.)?({key})$", key_to_match):
      return key
  return key_to_match


def _pattern_value(pattern: Mapping[str, object] | None, module: str, default: object) -> object:
  pattern = pattern or {}
  return pattern.get(get_pattern_key(pattern.keys(), module), default)


def _layer_index(module: str, layers_pattern: str | Sequence[str] | None) -> int | None:
  """The layer index PEFT reads from a module path for `layers_to_transform`."""
  if not layers_pattern:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
  else:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    match = None
    for pattern in patterns:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
      if match is not None:
        break
  return int(match.group("idx")) if match else None


def _alpha(config: Mapping[str, object], module: str) -> float:
  """lora_alpha of `module` (alpha_pattern first); PEFT's default is 8."""
  return float(_pattern_value(config.get("alpha_pattern"), module,  # type: ignore[arg-type]
                              config.get("lora_alpha", 8)))


def lora_scale(config: Mapping[str, object], module: str, rank: int) -> float:
  """PEFT's scaling of `module`: alpha / r, or alpha / sqrt(r) with use_rslora."""
  alpha = _alpha(config, module)
  if config.get("use_rslora"):
    return alpha / math.sqrt(rank)
  return alpha / rank


def _check_scale(config_path: str, module: str, scale: float, config: Mapping[str, object],
                 rank: int) -> None:
  """The scale must be a finite, non-zero float32 (the dtype the merge computes in)."""
  with np.errstate(over="ignore", under="ignore"):
    as_float32 = np.float32(scale)
  if np.isfinite(as_float32) and as_float32 != 0:
    return
  rslora = bool(config.get("use_rslora"))
  formula = (f"lora_alpha / {'sqrt(r)' if rslora else 'r'} = {_alpha(config, module):g} / "
             f"{f'sqrt({rank})' if rslora else rank}")
  raise AdapterError(
      f"{config_path}: module `{module}`: the scale {formula} = {scale:g} is "
      f"{'0' if as_float32 == 0 else 'inf'} in float32; fix lora_alpha / alpha_pattern")


# -------------------------------------------------------------- key parsing


@dataclasses.dataclass
class _Parsed:
  """The tensors of one file sorted by role."""
  lora: dict[str, dict[str, str]]  # module -> {"A": key, "B": key}
  extra: dict[str, str]            # extra name -> key
  adapter_name: str | None         # ".default" in torch.save'd PEFT models, None in PEFT files


def _refuse_key(path: str, key: str, parts: list[str]) -> None:
  """Raises for LoRA tensors that are not plain lora_A / lora_B weights."""
  for marker, what in (("lora_magnitude_vector", "DoRA magnitude vector (use_dora)"),
                       ("lora_embedding_A", "embedding LoRA (lora_embedding_A/B)"),
                       ("lora_embedding_B", "embedding LoRA (lora_embedding_A/B)")):
    if marker in parts:
      module = ".".join(parts[:parts.index(marker)])
      raise AdapterError(f"{path}: module `{module}`: {what} is not supported "
                         f"(tensor {key})")
  other = [p for p in parts if p.startswith("lora_") and p not in ("lora_A", "lora_B")]
  if other:
    module = ".".join(parts[:parts.index(other[0])])
    raise AdapterError(f"{path}: module `{module}`: tensor {key} ({other[0]}) belongs to a "
                       "LoRA variant that is not supported; only lora_A / lora_B weights are")


def _parse_keys(path: str, keys: Iterable[str], config: Mapping[str, object]) -> _Parsed:
  """Sorts keys into LoRA factors and extra tensors; refuses what is not plain LoRA.

  In a torch.save'd PEFT model (keys carry the adapter name, e.g. `.default`) only
  the adapter's own tensors are kept: LoRA factors, `modules_to_save.<adapter>`
  copies and, when the config's `bias` says they were trained, biases. The frozen
  base weights around them (`base_layer`, `original_module`, everything else) are
  not part of the adapter.
  """
  found: list[tuple[str, str, str]] = []  # (module, "A" | "B", key)
  names: set[str | None] = set()
  rest: list[tuple[str, str]] = []
  for key in keys:
    name = key.removeprefix(PEFT_PREFIX)
    parts = name.split(".")
    _refuse_key(path, key, parts)
    if "lora_A" not in parts and "lora_B" not in parts:
      rest.append((key, name))
      continue
    match = _LORA_KEY.match(name)
    if match is None:
      raise AdapterError(f"{path}: tensor {key}: not a LoRA key this loader understands "
                         "(expected <module>.lora_A[.<adapter>].weight)")
    if match.group("param") == "bias":
      raise AdapterError(f"{path}: module `{match.group('module')}`: LoRA bias (lora_bias, "
                         f"tensor {key}) is not supported")
    found.append((match.group("module"), match.group("which"), key))
    names.add(match.group("adapter"))
  if len(names) > 1:
    shown = ", ".join(sorted("(none)" if n is None else n for n in names))
    raise AdapterError(f"{path}: the file holds several adapters ({shown}); save them one "
                       "by one")
  adapter_name = next(iter(names), None)
  lora: dict[str, dict[str, str]] = {}
  for module, which, key in found:
    if which in lora.setdefault(module, {}):
      raise AdapterError(f"{path}: module `{module}`: lora_{which} appears twice "
                         f"({lora[module][which]}, {key})")
    lora[module][which] = key
  extra = {}
  for key, name in rest:
    target = _extra_name(name, key, adapter_name, lora, config, path)
    if target is not None:
      if target in extra:
        raise AdapterError(f"{path}: tensors {extra[target]} and {key} both map to `{target}`")
      extra[target] = key
  return _Parsed(lora, extra, adapter_name)


def _extra_name(name: str, key: str, adapter_name: str | None, lora: Mapping[str, object],
                config: Mapping[str, object], path: str) -> str | None:
  """Where a non-LoRA tensor goes in `Adapter.extra` (None: a frozen base weight)."""
  parts = name.split(".")
  if "modules_to_save" in parts:
    i = parts.index("modules_to_save")
    return ".".join(parts[:i] + parts[i + 2:])
  if "original_module" in parts:
    return None  # the frozen copy beside a modules_to_save copy
  if adapter_name is None:
    return name  # a PEFT adapter file holds only what was trained
  if adapter_name in parts:
    raise AdapterError(f"{path}: tensor {key} belongs to adapter `{adapter_name}` but is "
                       "neither lora_A / lora_B nor modules_to_save; not supported")
  bias = config.get("bias", "none")
  if name.endswith(".bias") and bias == "all":
    return name
  if name.endswith(".bias") and bias == "lora_only":
    module = name.removesuffix(".bias").removesuffix(".base_layer")
    return name if module in lora else None
  return None


# ---------------------------------------------------------------- checks


ALL_LINEAR = "all-linear"   # PEFT's shorthand for every linear module but the output layer
_BIAS_MODES = ("none", "all", "lora_only")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _layer_indices(value: object) -> object:
  """layers_to_transform: one layer index or a list of them (PEFT accepts both)."""
  if isinstance(value, (list, tuple)):
    return checks.list_of(checks.non_negative_int)(value)
  try:
    return checks.non_negative_int(value)
  except ValueError:
    raise ValueError(f"must be a non-negative integer or a list of them, got {value!r}") from None


def _alpha_value(value: object) -> float:
  """lora_alpha / an alpha_pattern value: positive, and finite in float32 (the merge's
  dtype), so that 1e39 is refused like inf."""
  value = checks.positive(value)
  if value > _FLOAT32_MAX:
    raise ValueError(f"must be a positive number float32 can hold (at most "
                     f"{_FLOAT32_MAX:.3g}), got {value:g}")
  return value


def _module_spec(value: object) -> object:
  """target_modules / exclude_modules: a list of module names, or one regex string."""
  if isinstance(value, str):
    return checks.regex(value)
  if isinstance(value, (list, tuple)):
    return checks.list_of(checks.text)(value)
  raise ValueError(f"must be a list of module names or a regular expression string, "
                   f"got {value!r}")


def _layer_patterns(value: object) -> object:
  """layers_pattern: one regex string or a list of them."""
  if isinstance(value, (list, tuple)):
    return checks.list_of(checks.regex)(value)
  if isinstance(value, str):
    return checks.regex(value)
  raise ValueError(f"must be a string or a list of strings, got {value!r}")


# The adapter_config.json fields this module reads, each checked when present (a
# missing field takes PEFT's default). lora_alpha and r have no null in PEFT.
_CONFIG_FIELDS: dict[str, checks.Check] = {
    "peft_type": checks.optional(checks.text),
    "r": checks.positive_int,
    "lora_alpha": _alpha_value,
    "use_rslora": checks.optional(checks.boolean),
    "rank_pattern": checks.optional(checks.mapping_of(checks.positive_int)),
    "alpha_pattern": checks.optional(checks.mapping_of(_alpha_value)),
    "layers_to_transform": checks.optional(_layer_indices),
    "layers_pattern": checks.optional(_layer_patterns),
    "target_modules": checks.optional(_module_spec),
    "exclude_modules": checks.optional(_module_spec),
    "fan_in_fan_out": checks.optional(checks.boolean),
    "bias": checks.optional(checks.one_of(_BIAS_MODES)),
    "modules_to_save": checks.optional(checks.list_of(checks.regex)),
    "base_model_name_or_path": checks.optional(checks.text),
    "use_dora": checks.optional(checks.boolean),
    "lora_bias": checks.optional(checks.boolean),
    "use_qalora": checks.optional(checks.boolean),
}


def _field(path: str, name: str, check: checks.Check, value: object) -> object:
  """`check(value)` of config field `name`; a failure is an AdapterError naming the file."""
  try:
    return checks.named(name, check, value)
  except ValueError as e:
    raise AdapterError(f"{path}: {e}; fix `{name}` in the adapter config") from None


def _check_config(path: str, config: Mapping[str, object]) -> None:
  """The fields of an adapter_config.json: types, ranges and PEFT's combination rules."""
  _field(path, "peft_type", _CONFIG_FIELDS["peft_type"], config.get("peft_type"))
  peft_type = str(config.get("peft_type") or "LORA").upper()
  if peft_type != "LORA":
    raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters "
                       "can be merged")
  for name, check in _CONFIG_FIELDS.items():
    if name in config:
      _field(path, name, check, config[name])
  for name in ("rank_pattern", "alpha_pattern"):
    for key in config.get(name) or {}:  # type: ignore[union-attr]
      _field(path, f"{name} key", checks.regex, key)
  for field, what in _UNSUPPORTED_FIELDS.items():
    if config.get(field):
      raise AdapterError(f"{path}: {what} is not supported")
  if config.get("lora_bias"):
    raise AdapterError(f"{path}: LoRA bias (lora_bias=true) is not supported: its update is "
                       "not B @ A")
  targets = config.get("target_modules")
  if targets is None:
    raise AdapterError(
        f"{path}: target_modules is missing or null: PEFT would then adapt its default "
        "modules for the model type, not necessarily those the tensors are for; set "
        "target_modules to the names of the adapted modules (e.g. [\"q_proj\", \"v_proj\"])")
  if isinstance(targets, str):
    for name in ("layers_to_transform", "layers_pattern"):
      if config.get(name) is not None:
        raise AdapterError(
            f"{path}: {name}={config[name]!r} cannot be used with a regular-expression "
            f"target_modules ({targets!r}); PEFT refuses this config. Put the layers into the "
            "regex and set the field to null, or make target_modules a list of names")
  if config.get("layers_pattern") and config.get("layers_to_transform") is None:
    raise AdapterError(f"{path}: layers_pattern={config['layers_pattern']!r} is set without "
                       "layers_to_transform; PEFT refuses this config. Set layers_to_transform "
                       "or set layers_pattern to null")


def _name_matches(spec: str | Sequence[str], module: str) -> bool:
  """PEFT's match of a module path against target_modules / exclude_modules: a string
  is a regex matched with re.fullmatch; a list entry matches the path itself or its end
  after a dot."""
  if isinstance(spec, str):
    return re.fullmatch(spec, module) is not None
  return module in spec or any(module.endswith(f".{name}") for name in spec)


def _targeted(targets: str | Sequence[str], module: str) -> bool:
  """Whether target_modules names `module` (`"all-linear"`: every linear module)."""
  if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
    return True
  return _name_matches(targets, module)


def _check_targets(config_path: str, weights_path: str, modules: Iterable[str],
                   config: Mapping[str, object]) -> None:
  """Every module with LoRA tensors is one PEFT would adapt under this config.

  PEFT creates LoRA layers where target_modules points, not where the tensors are;
  a tensor of a module it does not target is dropped, so the adapter loads as a
  no-op there. Layer indices (layers_to_transform) are checked by `_check_layers`.
  """
  modules = sorted(modules)
  targets = config["target_modules"]
  missed = [m for m in modules if not _targeted(targets, m)]  # type: ignore[arg-type]
  if missed:
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    raise AdapterError(
        f"{config_path}: target_modules={targets!r} does not cover {len(missed)} of the "
        f"{len(modules)} module(s) that {os.path.basename(weights_path)} has LoRA tensors for: "
        f"{_listing(missed)}; PEFT would load the adapter without them. Set target_modules "
        f"to the adapted modules (e.g. {names})")
  excluded = collections.defaultdict(list)
  for module in modules:
    exclude = config.get("exclude_modules")
    if exclude and _name_matches(exclude, module):  # type: ignore[arg-type]
      excluded["exclude_modules"].append(module)
    saved = config.get("modules_to_save") or ()
    if any(re.match(rf"(^|.*\.){name}($|\..*)", module) for name in saved):  # type: ignore[union-attr]
      excluded["modules_to_save"].append(module)
  if excluded:
    field, names = next(iter(excluded.items()))
    raise AdapterError(
        f"{config_path}: {field}={config[field]!r} excludes {len(names)} module(s) that "
        f"{os.path.basename(weights_path)} has LoRA tensors for: {_listing(names)}; PEFT "
        f"would not adapt them. Remove them from {field}")


def _check_finite(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  for key, value in tensors.items():
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      raise AdapterError(f"{path}: tensor {key} has {bad} NaN or inf value(s)")


def _factors(path: str, module: str, a: np.ndarray, b: np.ndarray,
             config: Mapping[str, object], config_path: str) -> LoraFactors:
  """Checked LoRA factors of one module with PEFT's scale (errors in the config name
  `config_path`, errors in the tensors `path`)."""
  if a.ndim == 4 or b.ndim == 4:
    raise AdapterError(f"{path}: module `{module}`: conv LoRA (4-D lora_A {a.shape}) is not "
                       "supported")
  if a.ndim != 2 or b.ndim != 2:
    raise AdapterError(f"{path}: module `{module}`: lora_A {a.shape} and lora_B {b.shape} "
                       "must be matrices")
  if a.shape[0] != b.shape[1]:
    raise AdapterError(f"{path}: module `{module}`: inner dimensions disagree: lora_A is "
                       f"{a.shape} (r x in) but lora_B is {b.shape} (out x r)")
  rank = a.shape[0]
  expected = _pattern_value(config.get("rank_pattern"), module,  # type: ignore[arg-type]
                            config.get("r", rank))
  if int(expected) != rank:  # type: ignore[call-overload]
    raise AdapterError(f"{path}: module `{module}`: the tensors have rank {rank} but the config "
                       f"says r={expected} (r / rank_pattern)")
  scale = lora_scale(config, module, rank)
  _check_scale(config_path, module, scale, config, rank)
  return LoraFactors(a=a, b=b, scale=scale)


def _check_layers(path: str, modules: Iterable[str], config: Mapping[str, object]) -> None:
  """Every module's layer index is in layers_to_transform, when that is set."""
  layers = config.get("layers_to_transform")
  if layers is None or (isinstance(layers, list) and not layers):
    return
  if isinstance(layers, (list, tuple)):
    allowed = {int(x) for x in layers}
  else:
    allowed = {int(layers)}  # type: ignore[call-overload]
  pattern = config.get("layers_pattern")
  for module in sorted(modules):
    index = _layer_index(module, pattern)  # type: ignore[arg-type]
    if index is None or index not in allowed:
      raise AdapterError(
          f"{path}: module `{module}`: layer {index if index is not None else '(none found)'} "
          f"is not in layers_to_transform={layers}")


def _synthesized_config(modules: Mapping[str, np.ndarray], extra: Iterable[str]) -> dict:
  """The config of a file without adapter_config.json: scale 1 (alpha = r) everywhere,
  as the reference implementation computes B @ A."""
  ranks = {m: int(a.shape[0]) for m, a in modules.items()}
  counts = collections.Counter(ranks.values())
  r = max(counts, key=lambda k: (counts[k], k))
  pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
  saved = sorted({k.rsplit(".", 1)[0] for k in extra})
  return {
      "peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern,
      "alpha_pattern": dict(pattern), "use_rslora": False, "fan_in_fan_out": False,
      "bias": "none", "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
      "modules_to_save": saved or None, "base_model_name_or_path": None,
      "layers_to_transform": None, "layers_pattern": None, "use_dora": False,
      "lora_bias": False, "init_lora_weights": True, "inference_mode": True,
  }


def _default_name(path: str) -> str:
  base = os.path.basename(os.path.normpath(os.path.abspath(path)))
  if os.path.isfile(path):
    stem, _ = os.path.splitext(base)
    return stem
  return base


# ------------------------------------------------------------------ public


def load_adapter(path: str, name: str | None = None) -> Adapter:
  """Reads one LoRA adapter: a PEFT directory, or a single state-dict file.

  Args:
    path: a PEFT directory (`adapter_config.json` + `adapter_model.safetensors` or
      `adapter_model.bin`), or a `.safetensors` / torch.save'd `.pt` file whose keys
      carry `lora_A[.default].weight` / `lora_B[...]` (the reference implementation's
      files). Without an `adapter_config.json` beside such a file the scale is 1.
    name: the adapter's name; defaults to the directory name or the file stem.

  Returns:
    An `Adapter` with float32 factors per module (module path without the
    `base_model.model.` prefix) and PEFT's scale, plus non-LoRA tensors in `extra`.

  Raises:
    AdapterError: a missing file, or anything that is not plain LoRA (see the module
      docstring); the message names the file and the module.
  """
  weights_path, config_path = _resolve(path)
  config = _read_config(config_path) if config_path else None
  if config is not None:
    _check_config(config_path, config)  # type: ignore[arg-type]
  tensors = _read_tensors(weights_path)
  parsed = _parse_keys(weights_path, tensors, config or {})
  if not parsed.lora:
    listed = f": {_listing(sorted(tensors))}" if tensors else ""
    raise AdapterError(f"{weights_path}: no LoRA tensors (no keys with lora_A / lora_B) among "
                       f"{len(tensors)} tensors{listed}")
  for module, pair in sorted(parsed.lora.items()):
    for which in ("A", "B"):
      if which not in pair:
        other = "B" if which == "A" else "A"
        raise AdapterError(f"{weights_path}: module `{module}`: has lora_{other} "
                           f"({pair[other]}) but no lora_{which}")
  used = [k for pair in parsed.lora.values() for k in pair.values()] + list(parsed.extra.values())
  _check_finite(weights_path, {k: tensors[k] for k in used})
  if config is None:
    config = _synthesized_config(
        {m: tensors[p["A"]] for m, p in parsed.lora.items()}, parsed.extra)
  else:
    _check_targets(config_path, weights_path, parsed.lora, config)  # type: ignore[arg-type]
  _check_layers(weights_path, parsed.lora, config)
  modules = {m: _factors(weights_path, m, tensors[p["A"]], tensors[p["B"]], config,
                         config_path or weights_path)
             for m, p in sorted(parsed.lora.items())}
  extra = {k: tensors[key] for k, key in sorted(parsed.extra.items())}
  return Adapter(path=path, name=name or _default_name(path), config=config,
                 modules=modules, extra=extra)


def _unique_names(names: Sequence[str]) -> list[str]:
  """Names with duplicates suffixed `_2`, `_3`, ... in order."""
  seen: set[str] = set()
  out = []
  for name in names:
    candidate, k = name, 2
    while candidate in seen:
      candidate, k = f"{name}_{k}", k + 1
    seen.add(candidate)
    out.append(candidate)
  return out


def _diff(first: Mapping[str, object], other: Mapping[str, object], what: str,
          shape: str = "shape") -> list[str]:
  """Missing, extra and differently shaped entries of `other` against `first`."""
  lines = []
  missing = sorted(set(first) - set(other))
  added = sorted(set(other) - set(first))
  if missing:
    lines.append(f"  - missing {len(missing)} {what}: {_listing(missing)}")
  if added:
    lines.append(f"  + extra {len(added)} {what}: {_listing(added)}")
  shapes = [f"{k}: {other[k].shape} vs {first[k].shape}"  # type: ignore[attr-defined]
            for k in sorted(set(first) & set(other))
            if other[k].shape != first[k].shape]  # type: ignore[attr-defined]
  if shapes:
    lines.append(f"  ~ {len(shapes)} {what} with another {shape}: {_listing(shapes, 3)}")
  return lines


def _line_up(first: Adapter, other: Adapter, check_base_model: bool) -> list[str]:
  """The ways `other` differs from `first`, one line each (empty if they line up)."""
  lines = _diff(first.modules, other.modules, "module(s)", "(out, in) shape")
  fan = [bool(ad.config.get("fan_in_fan_out", False)) for ad in (first, other)]
  if fan[0] != fan[1]:
    lines.append(f"  ~ fan_in_fan_out is {fan[1]} here but {fan[0]} in the first")
  base = [ad.config.get("base_model_name_or_path") for ad in (first, other)]
  if check_base_model and base[0] and base[1] and base[0] != base[1]:
    lines.append(f"  ~ base_model_name_or_path is {base[1]!r} here but {base[0]!r} in the first "
                 "(pass check_base_model=False if they are the same model)")
  return lines + _diff(first.extra, other.extra, "extra tensor(s) (modules_to_save)")


def load_adapters(paths: Sequence[str], names: Sequence[str] | None = None, *,
                  check_base_model: bool = True) -> AdapterSet:
  """Reads adapters of one base model and checks that they line up.

  They must adapt the same modules with the same (out, in) shapes, agree on
  fan_in_fan_out, base model (when `check_base_model` and both name one) and extra
  tensors; ranks may differ.

  Args:
    paths: one or more adapters (see `load_adapter`).
    names: their names (default: directory names / file stems); duplicates get
      `_2`, `_3`, ... appended.
    check_base_model: refuse adapters whose `base_model_name_or_path` differ.

  Raises:
    AdapterError: an adapter cannot be read, or they do not line up (the message
      lists, per adapter, what differs from the first).
  """
  if isinstance(paths, str):
    paths = [paths]
  paths = list(paths)
  if not paths:
    raise AdapterError("load_adapters: no adapters given (need at least 1)")
  if names is not None and len(names) != len(paths):
    raise AdapterError(f"load_adapters: {len(names)} names for {len(paths)} adapters")
  adapters = [load_adapter(p, n) for p, n in zip(paths, names or [None] * len(paths))]
  unique = _unique_names([ad.name for ad in adapters])
  adapters = [dataclasses.replace(ad, name=n) for ad, n in zip(adapters, unique)]
  first, problems = adapters[0], []
  for other in adapters[1:]:
    lines = _line_up(first, other, check_base_model)
    if lines:
      problems.append(f"adapter `{other.name}` ({other.path}) vs `{first.name}` "
                      f"({first.path}):\n" + "\n".join(lines))
  if problems:
    raise AdapterError("adapters do not line up:\n" + "\n".join(problems))
  return AdapterSet(tuple(adapters))


def check_against_base(adapters: AdapterSet, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
  """Checks every adapted module against the base model's weight shapes.

  Args:
    adapters: from `load_adapters`.
    base_shapes: {key: shape} of the base model, keys like
      `model.layers.0.self_attn.q_proj.weight`; with fan_in_fan_out (GPT-2's
      Conv1D) the base weight is [in, out].

  Raises:
    AdapterError: a module is not in the base model or has another shape.
  """
  fan = adapters.fan_in_fan_out
  first = adapters.adapters[0]
  missing, wrong = [], []
  for module in adapters.module_names:
    out_dim, in_dim = first.modules[module].shape
    expected = (in_dim, out_dim) if fan else (out_dim, in_dim)
    shape = base_shapes.get(f"{module}.weight")
    if shape is None:
      missing.append(module)
    elif tuple(shape) != expected:
      wrong.append(f"`{module}`: base weight {tuple(shape)}, adapter expects {expected}"
                   + (" ([in, out], fan_in_fan_out)" if fan else ""))
  lines = []
  if missing:
    lines.append(f"  - {len(missing)} module(s) not in the base model: {_listing(missing)}")
  if wrong:
    lines.append(f"  ~ {len(wrong)} module(s) with another shape: {_listing(wrong, 3)}")
  if lines:
    raise AdapterError(f"adapters ({first.path}, ...) do not fit the base model:\n"
                       + "\n".join(lines))
