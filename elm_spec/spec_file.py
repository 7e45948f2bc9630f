"""Model specs written by hand: a YAML or JSON file of ModelSpec (or config.json) keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from elm_spec.errors import ElmError
from elm_spec.spec import ModelSpec

SPEC_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def is_spec_file(entry: str | os.PathLike[str]) -> bool:
    return str(entry).endswith(SPEC_FILE_SUFFIXES)


def read_spec_file(path: str | os.PathLike[str]) -> ModelSpec:
    """The ModelSpec in PATH; any problem is one error naming the file (and the key)."""
    path = Path(path)
    if not path.is_file():
        raise ElmError(f"{path}: spec file not found")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ElmError(f"{path}: not valid YAML or JSON ({error})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ElmError(f"{path}: expected a mapping of spec keys")
    try:
        return ModelSpec.from_config(data)
    except (ElmError, TypeError) as error:
        raise ElmError(f"{path}: {error}") from None


def spec_from_preset_or_file(entry: str) -> ModelSpec:
    """A preset by name, or the spec in a YAML/JSON file."""
    return read_spec_file(entry) if is_spec_file(entry) else ModelSpec.from_preset(entry)
