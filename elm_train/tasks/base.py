"""The contract between the training engine and what it trains.

`elm train`, `elm export` and checkpointing call only what `Task` declares; a task subclasses it
and implements the abstract methods. The rest have defaults a task overrides when it needs to.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from elm_spec import ElmError


class BatchLoader(Protocol):
    """Batches (dicts of tensors) for one split, resumable from its state."""

    batches_per_epoch: int

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Task(abc.ABC):
    """What the engine trains: the model, its batches, its loss and its exported form.

    `config` is the whole validated `elm_train.config.Config`. Keys of the task's own under
    `data:` are validated into `config.task_data` by the dataclass named in `data_config`.
    """

    data_config: ClassVar[type | None] = None
    # What a batch is counted in: "tokens", or e.g. "images" (such tasks also log items_per_s).
    item_name: ClassVar[str] = "tokens"
    # Whether a micro-batch is micro_batch_size rows of exactly seq_len tokens, so that the batch
    # plan (train.global_batch_tokens) can count its tokens.
    full_rows: ClassVar[bool] = True
    # Parts of `loss` averaged over the held-out batches, logged as valid_<name>.
    valid_metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def for_export(cls, config: Any, checkpoint_dir: Path) -> Task:
        """A task able to export from CHECKPOINT_DIR alone (the training inputs may be gone)."""
        return cls(config)

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The initialised model on the CPU; the engine moves, casts and wraps it."""

    def setup(self, wrap_frozen: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Called once the trained model is wrapped. WRAP_FROZEN(module) freezes a module that is
        only run forward (a reference model), moves it to the device and, under FSDP, shards it
        as the trained model is. Nothing to do by default."""
        return None

    @abc.abstractmethod
    def build_loader(self, split: str, rank: int, world_size: int) -> BatchLoader:
        """This rank's batches of SPLIT ("train" or "valid")."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss to back-propagate, {name: float tensor or float} to log; "loss" among them)."""

    @abc.abstractmethod
    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items (see `item_name`) BATCH holds, for throughput."""

    @abc.abstractmethod
    def flops_per_item(self) -> float:
        """Training FLOPs per item, for MFU."""

    @abc.abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether the data has SPLIT (validation runs only when "valid" exists)."""

    def write_checkpoint_files(self, directory: Path) -> None:
        """Files that make a checkpoint self-describing (none by default)."""
        return None

    @abc.abstractmethod
    def export(self, model_state: Mapping[str, torch.Tensor], destination: str | Path,
               dtype: str = "float32", force: bool = False) -> Path:
        """Write the task's model directory at DESTINATION from MODEL_STATE."""


def refuse_dtype(dtype: str, task: str) -> None:
    """For tasks whose model directories hold float32 weights only."""
    if dtype != "float32":
        raise ElmError(f"--dtype {dtype}: {task} model directories are written in float32")
