"""Rich output for every command: consoles whose lines stay whole in a log, and the progress
bar for jobs measured in bytes (converting weights, tokenizing a corpus)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    """A rich Console that never breaks a printed line: piped into a log, rich would wrap it at
    80 columns mid-phrase; a terminal wraps long lines itself."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def byte_progress(label: str, *extra_columns: Any, enabled: bool = True) -> Any:
    """A rich `Progress` on stderr: LABEL, bar, bytes done of total, rate, EXTRA_COLUMNS, time
    left. Transient, and disabled unless ENABLED and stderr is a terminal."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = make_console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    *extra_columns, TimeRemainingColumn(), console=console, transient=True,
                    disable=not (enabled and console.is_terminal))
