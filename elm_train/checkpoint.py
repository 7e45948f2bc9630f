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

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from elm_spec import ElmError
from elm_spec.errors import first_line
from elm_spec.outputs import output_lock
from elm_train.parallel import DistContext
from elm_train.safe_dcp import (
    SINGLE_PROCESS_WARNING,
    read_metadata,
    safe_load,
    single_process_quiet,
)

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
    """A step directory (an error if damaged), or the newest intact one under a checkpoint root:
    a damaged newer one is skipped with one `warning:` line (and left where it is)."""
    directory = Path(path)
    if (directory / TRAINER_FILE).is_file():
        check_intact(directory)
        return directory
    found = complete_checkpoints(directory)
    if not found:
        raise ElmError(f"{directory}: no complete checkpoint (expected step-N directories with "
                       f"{TRAINER_FILE})")
    for index in range(len(found) - 1, -1, -1):
        step_dir = found[index][1]
        try:
            check_intact(step_dir)
            return step_dir
        except ElmError as error:
            if index == 0:
                raise ElmError(f"{error}; no intact checkpoint in {directory}") from None
            print(f"warning: {error}; reading {found[index - 1][1].name}, the previous checkpoint",
                  file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def check_intact(step_dir: Path) -> None:
    """One ElmError naming the first damaged file of checkpoint STEP_DIR: trainer.json, a rank
    file, `.metadata`, or a shard shorter than the metadata says. The small files are read
    whole, the shards only measured. Resuming, `elm export` and `elm convert` agree through
    this on which checkpoint is the newest intact one."""
    read_trainer_file(step_dir)
    for file in sorted(step_dir.glob("rank-*.pt")):
        read_rank_file(file)
    read_metadata(step_dir)


def read_trainer_file(step_dir: Path) -> dict[str, Any]:
    trainer_file = step_dir / TRAINER_FILE
    try:
        trainer = json.loads(trainer_file.read_text())
        _require_keys(trainer, ("step", "scheduler", "loader"))
        int(trainer["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ElmError(f"{trainer_file}: damaged ({first_line(error)})") from None
    return trainer


def read_rank_file(file: Path) -> dict[str, Any]:
    """The RNG states a rank saved in FILE."""
    try:
        rng = torch.load(file, weights_only=True)["rng"]
        _require_keys(rng, ("python", "numpy", "torch"))
    except pickle.UnpicklingError as error:
        raise ElmError(f"{file}: holds something other than RNG states; refused to "
                       f"unpickle it ({first_line(error)})") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for a damaged zip
        raise ElmError(f"{file}: damaged ({first_line(error)})") from None
    return rng


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so that `torch.load(weights_only=True)`
    reads it back (numpy's key array would need numpy's pickled reconstructors)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def checkpoint_lock(root: str | os.PathLike[str] | None, ctx: DistContext) -> Iterator[None]:
    """The exclusive lock on checkpoint directory ROOT, held by the main rank for the whole run;
    a second run on ROOT is refused on every rank (before any of them touches it)."""
    if root is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        refused: ElmError | None = None
        if ctx.is_main:
            try:
                stack.enter_context(output_lock(root))
            except ElmError as error:
                refused = error
        if ctx.all_reduce_max(float(refused is not None)) > 0:
            raise refused or ElmError(f"{root}: in use by another elm process")
        yield


@dataclass
class _PendingSave:
    """An asynchronous save whose shards are still being written; the rest is committed once
    they are."""
    upload: Future
    staging: Path
    final: Path
    trainer: dict[str, Any]
    config_text: str
    task: Any


class Checkpointer:
    """Writes and finds checkpoints under ROOT.

    With ASYNC_SAVE the model and optimizer state are copied to host memory (pinned on a GPU,
    the buffers reused from one save to the next) and the step goes on while a thread writes
    them (`dcp.async_save`, over a gloo group of its own so that it never interleaves with the
    training's collectives). The commit (trainer.json, the rename) follows once every rank's
    shards are written: at the next log step that finds them done, before the next save, or at
    the end of the run; until then the checkpoint is a `step-N.tmp` like any write in progress.
    """

    def __init__(self, root: str | os.PathLike[str], ctx: DistContext, keep: int,
                 async_save: bool = False):
        self.root = Path(root)
        self.ctx = ctx
        self.keep = keep
        self.newest = self.latest()
        self.pending: _PendingSave | None = None
        self.stager = None
        self.group = None
        if async_save:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(StagingOptions(
                use_pinned_memory=ctx.device.type == "cuda", use_shared_memory=False,
                use_async_staging=False, use_non_blocking_copy=False))
            if ctx.distributed:
                self.group = dist.new_group(backend="gloo")
            else:  # the writer thread's own warning, which single_process_quiet cannot reach
                warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)

    def save(self, step: int, model, optimizer, scheduler, loader, config_text: str,
             task=None) -> Path | None:
        """Checkpoint STEP; returns the newest committed checkpoint (this one unless the write
        goes on asynchronously)."""
        self.finish()
        final = self.root / f"step-{step}"
        staging = self.root / f"step-{step}.tmp"
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
        self.ctx.barrier()
        trainer = {"step": step, "world_size": self.ctx.world_size,
                   "scheduler": scheduler.state_dict(), "loader": loader.state_dict()}
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            with single_process_quiet():
                if self.stager is None:
                    dcp.save(state, checkpoint_id=str(staging), no_dist=not self.ctx.distributed)
                else:
                    upload = dcp.async_save(state, checkpoint_id=str(staging),
                                            process_group=self.group, async_stager=self.stager,
                                            no_dist=not self.ctx.distributed)
            torch.save({"rng": rng_state()}, staging / rank_file(self.ctx.rank))
        except BaseException:
            self._discard(staging)
            raise
        pending = _PendingSave(upload if self.stager is not None else None, staging, final,
                               trainer, config_text, task)
        if self.stager is None:
            self._commit(pending)
        else:
            self.pending = pending
        return self.newest

    def poll(self) -> Path | None:
        """Commit the asynchronous save if every rank has written its shards (a collective:
        call it on every rank at the same step); returns the newest committed checkpoint."""
        if self.pending is not None and self.ctx.all_reduce_max(
                float(not self.pending.upload.done())) == 0:
            self.finish()
        return self.newest

    def finish(self) -> Path | None:
        """Wait for the asynchronous save, if any, and commit it (on every rank alike)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                pending.upload.result()
            except BaseException:
                self._discard(pending.staging)
                raise
            self._commit(pending)
        return self.newest

    def close(self, failed: bool = False) -> None:
        """End of the run: commit the asynchronous save (wait for it without committing when
        FAILED: the ranks may no longer agree) and release the staging buffers."""
        try:
            if not failed:
                self.finish()
            elif self.pending is not None:
                wait([self.pending.upload])
                self.pending = None
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None

    def _commit(self, pending: _PendingSave) -> None:
        staging = pending.staging
        try:
            self.ctx.barrier()
            if self.ctx.is_main:
                (staging / TRAINER_FILE).write_text(json.dumps(pending.trainer, indent=2) + "\n")
                (staging / CONFIG_COPY).write_text(pending.config_text)
                if pending.task is not None:
                    pending.task.write_checkpoint_files(staging)
                _fsync_dir(staging)
        except BaseException:
            self._discard(staging)
            raise
        if self.ctx.is_main:
            if pending.final.exists():
                shutil.rmtree(pending.final)
            os.replace(staging, pending.final)
            _fsync_dir(self.root)
            self._prune()
        self.ctx.barrier()
        self.newest = pending.final

    def _discard(self, staging: Path) -> None:
        """A failed write (a full disk, say) leaves no half checkpoint behind."""
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)

    def _prune(self) -> None:
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1][1] if found else None

    def refuse_earlier_run(self) -> None:
        """With `checkpoint.resume: false` a run must not share a directory with an earlier
        run's checkpoints: pruning keeps the highest steps, so the new ones would be deleted."""
        latest = self.latest()
        if latest is not None:
            raise ElmError(f"{self.root}: holds checkpoints of an earlier run (newest {latest.name}) "
                           "and checkpoint.resume is false; set checkpoint.resume=true to continue "
                           "it, or choose an empty checkpoint.dir (nothing was deleted)")

    def resume(self, model, optimizer, scheduler, loader) -> tuple[int, Path] | None:
        """Load the newest intact checkpoint; damaged newer ones are moved aside to
        `step-N.damaged` (kept for inspection, no longer counted), one line each."""
        found = complete_checkpoints(self.root)
        for remaining, (_, path) in reversed(list(enumerate(found))):
            try:
                return self.load(path, model, optimizer, scheduler, loader), path
            except ElmError as error:
                aside = path.with_name(f"{path.name}.damaged")
                if self.ctx.is_main:
                    os.replace(path, aside)
                self.ctx.barrier()
                if remaining == 0:
                    raise ElmError(f"{error}; moved it aside to {aside.name}; no intact checkpoint "
                                   f"left in {self.root} (run again to start afresh)") from None
                if self.ctx.is_main:
                    print(f"warning: {error}; moved it aside to {aside.name}, resuming from the "
                          "previous checkpoint", file=sys.stderr, flush=True)
        return None

    def load(self, path: Path, model, optimizer, scheduler, loader) -> int:
        """Restore everything from checkpoint PATH; returns the step it was written at.

        Damage anywhere (trainer.json, the rank files, the DCP shards) is one ElmError, raised
        on every rank alike."""
        trainer, rng = self._agreed(lambda: self._read_small_files(path))
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        safe_load(state, path, no_dist=not self.ctx.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        scheduler.load_state_dict(trainer["scheduler"])
        self._agreed(lambda: _restore_loader(loader, trainer["loader"], path))
        set_rng_state(rng)
        return int(trainer["step"])

    def _agreed(self, read):
        """READ() on every rank; if any rank fails, all raise (a collective must not hang)."""
        error: ElmError | None = None
        result = None
        try:
            result = read()
        except ElmError as raised:
            error = raised
        if self.ctx.all_reduce_max(float(error is not None)) > 0:
            raise error or ElmError(f"{self.root}: another rank could not read its checkpoint files")
        return result

    def _read_small_files(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.ctx.is_main:
            check_intact(path)  # every rank file, not only those of this run's ranks
        own = path / rank_file(self.ctx.rank)
        return read_trainer_file(path), read_rank_file(own if own.is_file() else path / rank_file(0))


def _require_keys(mapping: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(mapping, dict):
        raise TypeError(f"expected a mapping, found {type(mapping).__name__}")
    for key in keys:
        if key not in mapping:
            raise KeyError(key)


def _restore_loader(loader, state: Any, path: Path) -> None:
    try:
        loader.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ElmError(f"{path / TRAINER_FILE}: damaged data loader position "
                       f"({first_line(error)})") from None


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
    safe_load(wrapped, checkpoint)
    return wrapped["model"]
