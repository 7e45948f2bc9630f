"""Progress of a fine-tuning run: a rich progress bar, report lines, and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from elm_spec.progress import make_console

METRICS_FILE = "metrics.jsonl"


class Reporter:
    """Shows the bar (loss, tokens/s, peak memory) and appends each report to metrics.jsonl."""

    def __init__(self, adapter_path: Path, iters: int, start: int, console: Console | None = None):
        self.console = console or make_console()
        self.metrics = adapter_path / METRICS_FILE
        self.progress = Progress(
            TextColumn("[bold]finetune"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("peak {task.fields[memory]}"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=iters, completed=start,
                                           loss="-", tps="-", memory="-")

    def __enter__(self) -> Reporter:
        self.progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.progress.__exit__(kind, error, traceback)

    def advance(self) -> None:
        self.progress.advance(self.task)

    def record(self, **values: Any) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(values) + "\n")

    def train(self, step: int, metrics: dict[str, float], learning_rate: float,
              tokens_per_second: float, trained_tokens: int, peak_memory_gb: float) -> None:
        """METRICS: the objective's means over the steps since the last report, "loss" first."""
        self.progress.update(self.task, loss=f"{metrics['loss']:.3f}",
                             tps=f"{tokens_per_second:,.0f}", memory=f"{peak_memory_gb:.2f} GB")
        self.console.print(f"step {step}: {describe('train', metrics)}, lr {learning_rate:.2e}, "
                           f"{tokens_per_second:,.0f} tok/s, {trained_tokens:,} tokens, "
                           f"peak memory {peak_memory_gb:.3f} GB")
        self.record(step=step, **prefixed("train", metrics), learning_rate=learning_rate,
                    tokens_per_second=tokens_per_second, trained_tokens=trained_tokens,
                    peak_memory_gb=peak_memory_gb)

    def validation(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        self.console.print(f"step {step}: {describe('val', metrics)} ({seconds:.1f} s)")
        self.record(step=step, **prefixed("val", metrics))

    def message(self, text: str) -> None:
        self.console.print(text)


def prefixed(split: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{split}_{name}": value for name, value in metrics.items()}


def describe(split: str, metrics: dict[str, float]) -> str:
    """`train loss 0.6931, chosen reward 0.0120, ...`: the split named once, before the loss."""
    parts = [f"{name.replace('_', ' ')} {value:.4f}" for name, value in metrics.items()]
    return f"{split} {', '.join(parts)}"
