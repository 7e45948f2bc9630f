"""JSON files as elm writes them, and JSON Lines read the way every elm command does: a bad
line is named, not skipped."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from elm_spec.errors import ElmError


def read_jsonl_objects(path: str | os.PathLike[str], limit: int | None = None,
                       allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line, at most LIMIT of them.

    A line that is not a JSON object is one error naming the file and line; an empty file too,
    unless ALLOW_EMPTY.
    """
    path = Path(path)
    if path.is_dir():
        raise ElmError(f"{path}: is a directory, not a JSON Lines file")
    try:
        handle = path.open("rb")
    except OSError as error:
        raise ElmError(f"{path}: cannot be read ({error.strerror})") from None
    with handle:
        numbered = ((number, line) for number, line in enumerate(handle, start=1) if line.strip())
        rows = [(number, _parse(path, number, line))
                for number, line in itertools.islice(numbered, limit)]
    if not rows and not allow_empty:
        raise ElmError(f"{path}: no rows (the file is empty)")
    return rows


def read_jsonl_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The objects of a log elm appends to (metrics, results), skipping any line that does not
    parse: the last one may have been cut short when its writer was killed."""
    records = []
    for line in Path(path).read_bytes().splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _parse(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ElmError(f"{path}:{number}: not UTF-8 text (byte {line[error.start]:#04x} at "
                       f"column {error.start + 1})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        ending = "" if line.endswith(b"\n") else "; the file ends mid-line: is it truncated?"
        raise ElmError(f"{path}:{number}: not valid JSON ({error.msg.removesuffix(' at')} at "
                       f"column {error.colno}{ending})") from None
    if not isinstance(row, dict):
        raise ElmError(f"{path}:{number}: expected a JSON object")
    return row


FINETUNE_SPLITS = ("train", "valid", "test")


def split_files(data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The SPLIT.jsonl files of a fine-tuning data directory (`--data`); train.jsonl is
    required, valid.jsonl and test.jsonl are optional."""
    directory = Path(data_dir)
    if not directory.is_dir():
        problem = "is a file, not a directory" if directory.exists() else "not found"
        raise ElmError(f"{directory}: {problem} (--data takes a directory holding train.jsonl)")
    if not (directory / "train.jsonl").is_file():
        raise ElmError(f"{directory}: no train.jsonl (a data directory needs train.jsonl; "
                       "valid.jsonl and test.jsonl are optional)")
    return {split: directory / f"{split}.jsonl" for split in FINETUNE_SPLITS
            if (directory / f"{split}.jsonl").is_file()}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """DATA as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=2) + "\n")
