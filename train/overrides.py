"""`--set a.b=value` overrides of frozen dataclass configs, type-checked, parsed as Python literals."""

import ast
import dataclasses
import difflib
import types
import typing
from typing import Any


def _field_names(config: Any, prefix: str = "") -> list[str]:
  names = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    names.append(prefix + field.name)
    if dataclasses.is_dataclass(value):
      names.extend(_field_names(value, prefix + field.name + "."))
  return names


def _unknown_field_error(root: Any, dotted: str) -> ValueError:
  close = difflib.get_close_matches(dotted, _field_names(root), n=5, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else " Run `sparseformer show-config` to list fields."
  return ValueError(f"Unknown config field {dotted!r}.{hint}")


def _parse_literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word such as `bfloat16` is a string


def _coerce(value: Any, annotation: Any, dotted: str) -> Any:
  """Returns `value` converted to `annotation`, or raises a ValueError naming the field."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    errors = []
    for option in typing.get_args(annotation):
      try:
        return _coerce(value, option, dotted)
      except ValueError as error:
        errors.append(str(error))
    raise ValueError(f"{dotted}: {value!r} matches none of {annotation}.")
  if annotation is type(None):
    if value is None:
      return None
    raise ValueError(f"{dotted}: expected None, got {value!r}.")
  if origin is tuple:
    args = typing.get_args(annotation)
    if isinstance(value, (str, int, float)) and len(args) == 2 and args[1] is Ellipsis:
      value = (value,)  # `--set model.attention_pattern=local` means a one-element pattern
    if not isinstance(value, (tuple, list)):
      raise ValueError(f"{dotted}: expected a tuple such as ('a', 'b'), got {value!r}.")
    item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(value):
      raise ValueError(f"{dotted}: expected {len(item_types)} items, got {len(value)}.")
    return tuple(_coerce(item, item_type, f"{dotted}[{i}]") for i, (item, item_type) in
                 enumerate(zip(value, item_types)))
  if annotation is bool:
    if isinstance(value, bool):
      return value
    raise ValueError(f"{dotted}: expected True or False, got {value!r}.")
  if annotation is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ValueError(f"{dotted}: expected an integer, got {value!r}.")
  if annotation is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise ValueError(f"{dotted}: expected a number, got {value!r}.")
  if annotation is str:
    if isinstance(value, str):
      return value
    return str(value)  # `--set data.path=2024` is the path "2024"
  if annotation is Any:
    return value
  if isinstance(annotation, type) and isinstance(value, annotation):
    return value
  raise ValueError(f"{dotted}: cannot set a field of type {annotation} from the command line.")


def _set_in_dict(root: Any, values: dict, dotted: str, raw_value: str) -> None:
  """Parses `raw_value` for the field at `dotted` of `root`'s type and stores it in the nested dict `values`."""
  path = dotted.split(".")
  config_type = type(root)
  for depth, name in enumerate(path):
    if not dataclasses.is_dataclass(config_type) or name not in {f.name for f in dataclasses.fields(config_type)}:
      raise _unknown_field_error(root, dotted)
    annotation = typing.get_type_hints(config_type)[name]
    if depth < len(path) - 1:
      config_type, values = annotation, values[name]
      continue
    if dataclasses.is_dataclass(annotation):
      raise ValueError(f"{dotted} is a group of settings; set one of its fields, e.g. {dotted}."
                       f"{dataclasses.fields(annotation)[0].name}=...")
    values[name] = _coerce(_parse_literal(raw_value), annotation, dotted)


def apply_overrides(root: Any, assignments: list[str]) -> Any:
  """Returns a copy of the dataclass `root` with `key=value` assignments applied.

  Every value is type-checked against its field, then the config is rebuilt once, so the order of the
  assignments never matters for validation (e.g. `model.d_model=32 model.num_heads=2`).
  """
  values = to_dict(root)
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(f"--set expects key=value, got {assignment!r} (e.g. --set train.steps=100).")
    key, raw_value = assignment.split("=", 1)
    _set_in_dict(root, values, key.strip(), raw_value.strip())
  return from_dict(type(root), values)


def flatten_dict(config: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict (to_dict, config.json) keyed by dotted field names."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flatten_dict(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def to_dict(config: Any) -> dict:
  """A JSON-ready dict of a (nested) dataclass config."""
  return dataclasses.asdict(config)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
  """Rebuilds a (nested) dataclass from `to_dict` output (e.g. a run's config.json), with the same type checks."""
  hints = typing.get_type_hints(cls)
  known = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"Unknown config fields {[prefix + name for name in unknown]} for {cls.__name__}.")
  values = {}
  for name, value in data.items():
    annotation = hints[name]
    if dataclasses.is_dataclass(annotation):
      values[name] = from_dict(annotation, value, prefix + name + ".")
    else:
      values[name] = _coerce(value, annotation, prefix + name)
  return cls(**values)
