"""`elm export`: a training checkpoint to the task's model directory (consolidated weights)."""

from __future__ import annotations

import os
from pathlib import Path

from elm_spec import ElmError
from elm_spec.outputs import refuse_overlap
from elm_train.checkpoint import CONFIG_COPY, load_model_state, resolve_checkpoint
from elm_train.config import load_config
from elm_train.tasks import task_class


def export_checkpoint(checkpoint: str | os.PathLike[str], destination: str | os.PathLike[str],
                      dtype: str = "float32", force: bool = False) -> Path:
    """Write DESTINATION from CHECKPOINT (a step-N dir, or a checkpoint root: its newest)."""
    refuse_overlap(checkpoint, destination)
    step_dir = resolve_checkpoint(checkpoint)
    if not (step_dir / CONFIG_COPY).is_file():
        raise ElmError(f"{step_dir}: no {CONFIG_COPY} (not written by `elm train`)")
    config = load_config(step_dir / CONFIG_COPY)
    cls = task_class(config.task)
    task = cls.for_export(config, step_dir)
    model = task.build_model()
    state = load_model_state(step_dir, model)
    if not force and Path(destination).is_dir() and any(Path(destination).iterdir()):
        raise ElmError(f"{destination}: already exists and is not empty (use --force to replace it)")
    return Path(task.export(state, destination, dtype=dtype, force=force))
