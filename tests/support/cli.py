"""The `elm` command line as a user runs it, and what a failure must look like."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_elm(*args: str, input: str | None = None, cwd: Path | None = None,
            timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `elm` command line in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "apps", *args], input=input, capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=full_env)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`elm ARGS` in this process (the same entry point as the console script), its exit code
    and output; CAPSYS is pytest's capture fixture."""
    import pytest

    from apps.cli import main as elm_main

    with pytest.raises(SystemExit) as exit_info:
        elm_main(list(args))
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def one_line_failure(result, *mentions: str) -> str:
    """One `error:` line (a command's own progress notes may precede it), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in mentions:
        assert text in lines[0], lines[0]
    return lines[0]
