"""Reading JSON Lines files the way every elm command does: a bad line is named, not skipped."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from elm_spec.errors import ElmError


def read_jsonl_objects(path: str | os.PathLike[str], limit: int | None = None
                       ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line, at most LIMIT of them.

    A line that is not a JSON object is one error naming the file and line; an empty file too.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise ElmError(f"{path}: cannot be read ({error.strerror})") from None
    with handle:
        numbered = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        rows = [(number, _parse(path, number, line))
                for number, line in itertools.islice(numbered, limit)]
    if not rows:
        raise ElmError(f"{path}: no rows (the file is empty)")
    return rows


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ElmError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise ElmError(f"{path}:{number}: not UTF-8 text") from None
    if not isinstance(row, dict):
        raise ElmError(f"{path}:{number}: expected a JSON object")
    return row
