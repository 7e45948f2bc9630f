"""Typed settings from YAML, shared by every reader of a settings file (`elm train` configs,
`elm bench` grids, `elm finetune --config`, CatLIP's data section): dataclass fields coerced by
their type hints, unknown keys named by their dotted path, dotted `key=value` overrides.

YAML 1.1 (PyYAML) reads `1e-5` as the string "1e-5" (it wants a dot: `1.0e-5`); a float field
takes such a string as the number it spells. Imports neither torch nor MLX.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from elm_spec.errors import ElmError

# libyaml's parser when PyYAML has it (a SLURM grid of explicit cells can be long); the same
# safe subset of YAML either way.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml_mapping(path: Path, what: str = "settings") -> dict[str, Any]:
    """The mapping at the top of a YAML file (empty for an empty file), or one clear error."""
    if not path.is_file():
        raise ElmError(f"{path}: not found")
    try:
        loaded = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ElmError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ElmError(f"{path}: expected a mapping of {what}")
    return loaded


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", 0.0003); values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ElmError(f"override {text!r} is not of the form key=value (e.g. train.max_steps=20)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ElmError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """DATA[a][b][c] = VALUE for KEY "a.b.c", creating sections as needed."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ElmError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def aliased(default: Any, aliases: dict[Any, Any]) -> Any:
    """A dataclass field whose former spellings still read: ALIASES maps an old value (matched
    with its type, so `true` is not `1`) to the new one, e.g. {True: "full", False: "none"} for
    a setting that was a bool."""
    return dataclasses.field(default=default, metadata={"aliases": aliases})


def _unalias(value: Any, aliases: dict[Any, Any]) -> Any:
    for old, new in aliases.items():
        if type(value) is type(old) and value == old:
            return new
    return value


def build_dataclass(cls: type, data: Any, section: str = "") -> Any:
    """CLS from the mapping DATA, each value coerced to its field's type hint; SECTION is the
    dotted path of DATA in error messages."""
    if not isinstance(data, dict):
        raise ElmError(f"{section or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ElmError(f"unknown key '{join_key(section, key)}'")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        dotted = join_key(section, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = build_dataclass(hint, data[f.name] or {}, dotted)
        else:
            value = _unalias(data[f.name], f.metadata.get("aliases", {}))
            values[f.name] = coerce(value, hint, dotted)
    return cls(**values)


def join_key(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def coerce(value: Any, hint: Any, key: str) -> Any:
    """VALUE as type HINT (bool, int, float, str, Any, unions, list, tuple, dict), or an error
    naming KEY. Integral floats pass as ints; numeric strings as floats; never bool as a number."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ElmError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ElmError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item, key) for v in value]
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ElmError(f"{key}: expected a list, got {value!r}")
        if items[-1] is Ellipsis:
            items = (items[0],) * len(value)
        if len(value) != len(items):
            raise ElmError(f"{key}: expected a list of {len(items)}, got {value!r}")
        return tuple(coerce(v, item, key) for v, item in zip(value, items, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ElmError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ElmError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ElmError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ElmError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ElmError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ElmError(f"{key}: expected a string, got {value!r}")
    if hint is typing.Any:
        return value
    raise ElmError(f"{key}: unsupported value {value!r}")
