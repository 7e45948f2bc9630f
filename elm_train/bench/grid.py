"""The benchmark grid: which cells to measure, read from YAML and validated before anything runs.

A grid file holds settings and axes at the top level and, optionally, a list of `sweeps`
(mappings of the same keys that override the top level); each sweep is the cross product of
its axes. Axes take one value or a list:

    models: [llama-100M, my_spec.yaml]   # elm presets or spec files (relative to the grid file)
    batch_sizes: [4, 8, 16]              # per device
    attention: [eager, sdpa, flash]
    strategies: [ddp, fsdp, fsdp-grad-op]
    gpus: [1, 2, 4, 8]                   # per node (torchrun's --nproc_per_node)
    nodes: 1
    seq_len: 1024
    dtype: bfloat16
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elm_spec import ElmError, ModelSpec
from elm_spec.names import ATTENTION_KINDS, STRATEGIES, TRAIN_DTYPES
from elm_spec.presets import PRESETS
from elm_spec.settings import coerce, read_yaml_mapping
from elm_spec.spec_file import is_spec_file, spec_from_preset_or_file

PRESET_DIR = Path(__file__).parent / "grids"
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# Axis name in the grid file -> field of Cell.
AXES = {"models": "model", "batch_sizes": "batch_size", "attention": "attention",
        "strategies": "strategy", "gpus": "gpus", "nodes": "nodes", "seq_len": "seq_len",
        "dtype": "dtype"}
AXIS_DEFAULTS: dict[str, list[Any]] = {"attention": ["sdpa"], "strategies": ["ddp"], "gpus": [1],
                                       "nodes": [1], "seq_len": [1024], "dtype": ["bfloat16"]}


@dataclass(frozen=True)
class Settings:
    """How each cell is measured; set at the top of a grid file or per sweep."""

    warmup_steps: int = 5
    repeats: int = 3
    steps_per_repeat: int = 10
    timeout_s: float = 1800.0
    memory_limit_gb: float | None = None
    loss_budget_tokens: int | None = None
    data_path: str | None = None
    lr: float = 3e-4
    target_loss: float | None = None
    # Extra `elm train` keys (dotted, e.g. train.activation_checkpointing: true).
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def measured_steps(self) -> int:
        return self.repeats * self.steps_per_repeat

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.measured_steps


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(Settings))
# Minimum of each integer setting; at least 3 repeats, as in the study.
INTEGER_SETTINGS = {"warmup_steps": 0, "repeats": 3, "steps_per_repeat": 1, "loss_budget_tokens": 1}
NULLABLE_SETTINGS = ("memory_limit_gb", "loss_budget_tokens", "data_path", "target_loss")


@dataclass(frozen=True)
class Cell:
    model: str           # a preset name, or the absolute path of a spec file
    batch_size: int      # per device
    attention: str
    strategy: str
    gpus: int            # per node
    nodes: int
    seq_len: int
    dtype: str
    settings: Settings = field(default_factory=Settings, compare=False)

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def model_name(self) -> str:
        """What reports call the model: the preset name or the spec file's stem."""
        return Path(self.model).stem if is_spec_file(self.model) else self.model

    def spec(self) -> ModelSpec:
        return load_model_spec(self.model)

    def parameters(self) -> dict[str, Any]:
        """The values that identify a cell (with the device type, a result's key)."""
        values = {name: getattr(self, name) for name in AXES.values()}
        values["loss_budget_tokens"] = self.settings.loss_budget_tokens
        values["train"] = dict(self.settings.train)
        return values

    @property
    def key(self) -> str:
        return json.dumps(self.parameters(), sort_keys=True)

    @property
    def slug(self) -> str:
        """A directory name for the cell's files."""
        text = (f"{self.model_name}_b{self.batch_size}_{self.attention}_{self.strategy}"
                f"_{self.nodes}x{self.gpus}_s{self.seq_len}_{self.dtype}")
        if self.settings.loss_budget_tokens:
            text += f"_loss{self.settings.loss_budget_tokens}"
        if self.settings.train:
            text += "_" + hashlib.sha1(self.key.encode()).hexdigest()[:8]
        return re.sub(r"[^A-Za-z0-9_.-]", "-", text)

    def describe(self) -> str:
        return (f"{self.model_name} batch {self.batch_size} {self.attention} {self.strategy} "
                f"{self.nodes}x{self.gpus} seq {self.seq_len} {self.dtype}")


@dataclass(frozen=True)
class Grid:
    source: str
    cells: tuple[Cell, ...]

    def to_yaml(self) -> str:
        """The grid as explicit single-cell sweeps: reading it back gives the same cells in the
        same order (a SLURM array task finds its cell by index in this file)."""
        sweeps = []
        for cell in self.cells:
            sweep: dict[str, Any] = {axis: getattr(cell, name) for axis, name in AXES.items()}
            for key in SETTING_KEYS:
                value = getattr(cell.settings, key)
                sweep[key] = dict(value) if key == "train" else value
            sweeps.append(sweep)
        return yaml.dump({"sweeps": sweeps}, Dumper=SAFE_DUMPER, sort_keys=False)


def load_model_spec(entry: str) -> ModelSpec:
    """A preset by name or a YAML/JSON file of spec (or config.json) keys."""
    return spec_from_preset_or_file(entry)


# ----- reading ------------------------------------------------------------------------------

def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Reader:
    def __init__(self, source: str, base_dir: Path):
        self.source = source
        self.base_dir = base_dir

    def fail(self, where: str, message: str) -> ElmError:
        return ElmError(f"{self.source}: {where}: {message}")

    def settings(self, raw: Mapping[str, Any], inherited: Settings, where: str) -> Settings:
        changes = {key: self.setting(key, raw[key], f"{where}{key}", inherited)
                   for key in SETTING_KEYS if key in raw}
        return dataclasses.replace(inherited, **changes)

    def setting(self, key: str, value: Any, entry: str, inherited: Settings) -> Any:
        if key == "train":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise self.fail(entry, "expected a mapping of dotted `elm train` keys")
            return tuple(sorted({**dict(inherited.train), **value}.items()))
        if value is None and key in NULLABLE_SETTINGS:
            return None
        if key == "data_path":
            path = Path(os.path.expanduser(str(value)))
            return str(path if path.is_absolute() else (self.base_dir / path).resolve())
        if key in INTEGER_SETTINGS:
            minimum = INTEGER_SETTINGS[key]
            number = self.number(value, int, entry, f"must be an integer >= {minimum}")
            if number < minimum:
                raise self.fail(entry, f"must be an integer >= {minimum}, got {value!r}")
            return number
        number = self.number(value, float, entry, "must be a positive number")
        if number <= 0:
            raise self.fail(entry, f"must be a positive number, got {value!r}")
        return number

    def number(self, value: Any, kind: type, entry: str, expected: str) -> Any:
        try:
            return coerce(value, kind, entry)
        except ElmError:
            raise self.fail(entry, f"{expected}, got {value!r}") from None

    def model(self, entry: Any, where: str) -> str:
        if not isinstance(entry, str) or not entry:
            raise self.fail(where, f"expected a preset name or spec file, got {entry!r}")
        if is_spec_file(entry):
            path = Path(os.path.expanduser(entry))
            path = path if path.is_absolute() else (self.base_dir / path).resolve()
            if not path.is_file():
                raise self.fail(where, f"spec file {path} not found")
            try:
                load_model_spec(str(path))
            except ElmError as error:
                raise self.fail(where, str(error)) from None
            return str(path)
        if entry not in PRESETS:
            raise self.fail(where, f"unknown preset {entry!r}; known presets: "
                            f"{', '.join(sorted(PRESETS))}, or a .yaml/.json spec file")
        return entry

    def axis_values(self, axis: str, raw: Any, where: str) -> list[Any]:
        values = _as_list(raw)
        if not values:
            raise self.fail(where + axis, "is empty")
        checked = []
        for i, value in enumerate(values):
            entry = f"{where}{axis}[{i}]" if isinstance(raw, (list, tuple)) else where + axis
            if axis == "models":
                checked.append(self.model(value, entry))
            elif axis in ("batch_sizes", "gpus", "nodes", "seq_len"):
                if not _positive_int(value):
                    raise self.fail(entry, f"must be a positive integer, got {value!r}")
                checked.append(value)
            else:
                choices = {"attention": ATTENTION_KINDS, "strategies": STRATEGIES,
                           "dtype": TRAIN_DTYPES}[axis]
                if value not in choices:
                    kind = {"attention": "attention backend", "strategies": "strategy",
                            "dtype": "dtype"}[axis]
                    raise self.fail(entry, f"unknown {kind} {value!r}; choose from "
                                    f"{', '.join(choices)}")
                checked.append(value)
        return checked

    def sweep(self, raw: Mapping[str, Any], top: Mapping[str, Any], settings: Settings,
              where: str) -> list[Cell]:
        allowed = set(AXES) | set(SETTING_KEYS)
        for key in raw:
            if key not in allowed:
                raise self.fail(f"{where}{key}", f"unknown key; expected one of {', '.join(sorted(allowed))}")
        settings = self.settings(raw, settings, where)
        axes = {}
        for axis in AXES:
            if axis in raw:
                axes[axis] = self.axis_values(axis, raw[axis], where)
            elif axis in top:
                axes[axis] = self.axis_values(axis, top[axis], "")
            elif axis in AXIS_DEFAULTS:
                axes[axis] = AXIS_DEFAULTS[axis]
            else:
                raise self.fail(where.rstrip(".") or "grid", f"no {axis!r} given")
        cells = []
        for values in itertools.product(*axes.values()):
            cell = Cell(**dict(zip(AXES.values(), values, strict=True)), settings=settings)
            self.check_cell(cell, where)
            cells.append(cell)
        return cells

    def check_cell(self, cell: Cell, where: str) -> None:
        spec = load_model_spec(cell.model)
        entry = f"{where}cell '{cell.describe()}'"
        if cell.seq_len > spec.max_context_length:
            raise self.fail(entry, f"seq_len {cell.seq_len} is longer than {cell.model_name}'s "
                            f"max_context_length {spec.max_context_length}")
        if cell.strategy == "none" and cell.world_size > 1:
            raise self.fail(entry, f"strategy 'none' cannot run on {cell.world_size} devices "
                            "(gpus x nodes); use ddp or fsdp")
        if cell.settings.loss_budget_tokens:
            if not cell.settings.data_path:
                raise self.fail(f"{where}loss_budget_tokens", "needs data_path (a prepared "
                                "token directory from `elm data prepare`)")
            if not (Path(cell.settings.data_path) / "index.json").is_file():
                raise self.fail(f"{where}data_path", f"{cell.settings.data_path} has no index.json "
                                "(prepare it with `elm data prepare`)")


def read_grid(data: Any, source: str, base_dir: Path) -> Grid:
    reader = _Reader(source, base_dir)
    if not isinstance(data, Mapping):
        raise ElmError(f"{source}: expected a mapping of grid keys")
    allowed = set(AXES) | set(SETTING_KEYS) | {"sweeps"}
    for key in data:
        if key not in allowed:
            raise reader.fail(str(key), f"unknown key; expected one of {', '.join(sorted(allowed))}")
    settings = reader.settings(data, Settings(), "")
    top = {k: v for k, v in data.items() if k in AXES}
    sweeps = data.get("sweeps")
    if sweeps is None:
        cells = reader.sweep({}, top, settings, "")
    else:
        if not isinstance(sweeps, Sequence) or isinstance(sweeps, str) or not sweeps:
            raise reader.fail("sweeps", "expected a non-empty list of mappings")
        cells = []
        for i, sweep in enumerate(sweeps):
            if not isinstance(sweep, Mapping):
                raise reader.fail(f"sweeps[{i}]", "expected a mapping")
            cells.extend(reader.sweep(sweep, top, settings, f"sweeps[{i}]."))
    unique: dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    return Grid(source, tuple(unique.values()))


def load_grid(path: Path | None = None, preset: str | None = None) -> Grid:
    """A grid from a YAML file or a named preset (elm_train/bench/grids/NAME.yaml)."""
    if (path is None) == (preset is None):
        raise ElmError("give exactly one of --grid FILE or --preset NAME")
    if preset is not None:
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        if preset not in known:
            raise ElmError(f"unknown grid preset {preset!r}; known: {', '.join(known)}")
        path = PRESET_DIR / f"{preset}.yaml"
    return read_grid(read_yaml_mapping(path, "grid keys"), str(path), path.resolve().parent)


# ----- the machine ----------------------------------------------------------------------------

def check_devices(grid: Grid, devices_per_node: int, kind: str, flash_available: bool,
                  multi_node: bool) -> None:
    """Reject cells this launcher cannot run: more devices per node than exist, several nodes
    without a cluster launcher, or flash attention where flash-attn cannot run."""
    for cell in grid.cells:
        where = f"{grid.source}: cell '{cell.describe()}'"
        if cell.gpus > devices_per_node:
            limit = ("processes allowed on this CPU machine (raise it with --max-cpu-processes)"
                     if kind == "cpu" else f"{kind} devices per node")
            raise ElmError(f"{where}: gpus {cell.gpus} is more than the {devices_per_node} {limit}")
        if cell.nodes > 1 and not multi_node:
            raise ElmError(f"{where}: nodes {cell.nodes} needs a cluster; write a SLURM array "
                           "with `elm bench slurm`")
        if cell.attention == "flash" and not flash_available:
            raise ElmError(f"{where}: attention 'flash' needs the flash-attn package and a "
                           "CUDA device")
