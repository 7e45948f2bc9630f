"""Training checkpoints: torch.distributed.checkpoint for model and optimizer, plus everything
else an exact resume needs, written atomically.

CHECKPOINT_DIR/
  step-20/                  a complete checkpoint (the rename from step-20.tmp is the commit)
    .metadata, *.distcp     DCP: {"model": {...HF tensor names...}, "optim": {...}}
    trainer.json            step, world size, scheduler, data loader position
    rank-00000.pt ...       per-rank RNG states (torch, numpy, python, cuda)
    train_config.yaml       the resolved training config
    config.json, tokenizer.model, ...   (lm task) what makes the checkpoint a self-describing model
  step-20.tmp/              a write in progress (or killed): never read, removed on the next save

Model and optimizer states come from torch.distributed.checkpoint.state_dict.get_state_dict, so
they are keyed by parameter name, not by rank: a checkpoint written by N processes loads into M.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from elm_spec import ElmError
from elm_train.parallel import DistContext

# DCP warns when it runs without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_PATTERN = re.compile(r"^step-(\d+)$")
TRAINER_FILE = "trainer.json"
CONFIG_COPY = "train_config.yaml"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def complete_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ROOT, oldest first."""
    directory = Path(root)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_PATTERN.match(child.name)
        if match and child.is_dir() and (child / TRAINER_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A step directory, or the newest complete one under a checkpoint root."""
    directory = Path(path)
    if (directory / TRAINER_FILE).is_file():
        return directory
    found = complete_checkpoints(directory)
    if not found:
        raise ElmError(f"{directory}: no complete checkpoint (expected step-N directories with "
                       f"{TRAINER_FILE})")
    return found[-1][1]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root: str | os.PathLike[str], ctx: DistContext, keep: int):
        self.root = Path(root)
        self.ctx = ctx
        self.keep = keep

    def save(self, step: int, model, optimizer, scheduler, loader, config_text: str,
             task=None) -> Path:
        final = self.root / f"step-{step}"
        staging = self.root / f"step-{step}.tmp"
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
        self.ctx.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging),
                 no_dist=not self.ctx.distributed)
        torch.save({"rng": rng_state()}, staging / rank_file(self.ctx.rank))
        self.ctx.barrier()
        if self.ctx.is_main:
            trainer = {"step": step, "world_size": self.ctx.world_size,
                       "scheduler": scheduler.state_dict(), "loader": loader.state_dict()}
            (staging / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n")
            (staging / CONFIG_COPY).write_text(config_text)
            if task is not None and hasattr(task, "write_checkpoint_files"):
                task.write_checkpoint_files(staging)
            _fsync_dir(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(self.root)
            self._prune()
        self.ctx.barrier()
        return final

    def _prune(self) -> None:
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def load(self, path: Path, model, optimizer, scheduler, loader) -> int:
        """Restore everything from checkpoint PATH; returns the step it was written at."""
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(path), no_dist=not self.ctx.distributed)
        except Exception as error:  # DCP raises CheckpointException with per-rank details
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ElmError(f"{path}: cannot be loaded into this model ({first})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        trainer = json.loads((path / TRAINER_FILE).read_text())
        scheduler.load_state_dict(trainer["scheduler"])
        loader.load_state_dict(trainer["loader"])
        own = path / rank_file(self.ctx.rank)
        rng_path = own if own.is_file() else path / rank_file(0)
        set_rng_state(torch.load(rng_path, weights_only=False)["rng"])
        return int(trainer["step"])


def _fsync_dir(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_model_state(checkpoint: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state of a checkpoint, in one process, for MODEL (built on the CPU)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    wrapped = {"model": state}
    try:
        dcp.load(wrapped, checkpoint_id=str(checkpoint), no_dist=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ElmError(f"{checkpoint}: cannot be loaded into this model ({first})") from None
    return wrapped["model"]
