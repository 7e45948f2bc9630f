"""Resumable checkpoints: adapter weights, optimizer state, step and the run's settings.

Each checkpoint is a directory `checkpoints/step-NNNNNNN/` written under a temporary name and
renamed into place, so a run killed at any moment leaves only whole checkpoints. The data
position and the dropout stream are functions of the step (see data.BatchStream and
train.seed_step), so the step number restores them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from elm_mlx.lora.adapters import ADAPTER_WEIGHTS
from elm_spec import ElmError
from elm_spec.outputs import publish_permissions, remove

CHECKPOINT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
KEEP_CHECKPOINTS = 2


def checkpoint_root(adapter_path: Path) -> Path:
    return adapter_path / CHECKPOINT_DIR


def list_checkpoints(adapter_path: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of a killed write are skipped)."""
    root = checkpoint_root(adapter_path)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(adapter_path: Path, step: int, model: nn.Module, optimizer: optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    root = checkpoint_root(adapter_path)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        mx.save_safetensors(str(staging / ADAPTER_WEIGHTS),
                            dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        publish_permissions(staging)  # mkdtemp's 0700 would make the checkpoint private
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(adapter_path)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_leftovers(adapter_path: Path) -> None:
    """Temporary files and checkpoint directories of killed runs (call with the lock held)."""
    for pattern in (".*.tmp-*", f"{CHECKPOINT_DIR}/.step-*.tmp-*"):
        for leftover in adapter_path.glob(pattern):
            remove(leftover)


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Restore trainable weights and the optimizer state (moments, step, learning rate) in place."""
    weights = mx.load(str(checkpoint / ADAPTER_WEIGHTS))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights)) or sorted(set(weights) - set(expected))
        raise ElmError(f"{checkpoint}: does not match this run's trainable tensors "
                       f"(first difference: {missing[0]})")
    model.load_weights(list(weights.items()), strict=False)
    saved = mx.load(str(checkpoint / OPTIMIZER_FILE))

    def restore(path: str, value: mx.array) -> mx.array:
        if path not in saved:
            raise ElmError(f"{checkpoint / OPTIMIZER_FILE}: missing optimizer tensor {path!r}")
        return saved[path]

    optimizer.state = tree_map_with_path(restore, optimizer.state)


def check_resumable(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must train the same thing the same way; name the first setting that differs."""
    for key, value in current.items():
        if saved.get("settings", {}).get(key) != value:
            raise ElmError(f"{checkpoint}: was written with {key}={saved.get('settings', {}).get(key)!r}, "
                           f"this run has {key}={value!r}; resume with the same settings")
