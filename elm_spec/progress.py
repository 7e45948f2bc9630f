"""The progress bar for jobs measured in bytes (converting weights, tokenizing a corpus)."""

from __future__ import annotations

from typing import Any


def byte_progress(label: str, *extra_columns: Any, enabled: bool = True) -> Any:
    """A rich `Progress` on stderr: LABEL, bar, bytes done of total, rate, EXTRA_COLUMNS, time
    left. Transient, and disabled unless ENABLED and stderr is a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    *extra_columns, TimeRemainingColumn(), console=console, transient=True,
                    disable=not (enabled and console.is_terminal))
