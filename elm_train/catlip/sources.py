"""Image-caption data on disk, read without torch: webdataset tar shards and CSV/JSONL lists.

- Tar shards as img2dataset writes them: members `KEY.jpg` (or .jpeg/.png/.webp) with
  `KEY.txt` (the caption) and optionally `KEY.json`, grouped by KEY.
- CSV with a header naming `image` and `caption` columns, or JSONL objects with those keys;
  relative image paths are taken from the list file's directory.
- Plain `.txt` files (one caption per line, no images) for counting a vocabulary.

A sample is (source, key, image reference, caption). Images are not decoded here: a tar
sample keeps the member's byte range, so loader workers read just those bytes.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from elm_spec import ElmError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SOURCE_SUFFIXES = (".tar", ".csv", ".jsonl", ".txt")


@dataclass(frozen=True)
class Sample:
    source: str
    key: str
    caption: str
    image_path: str | None = None  # a file on disk (CSV/JSONL)
    tar_offset: int = -1  # byte range inside the tar shard `source`
    tar_size: int = 0

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.tar_offset >= 0

    def read_image_bytes(self) -> bytes:
        if self.image_path is not None:
            return Path(self.image_path).read_bytes()
        if self.tar_offset < 0:
            raise ElmError(f"{self.source}: sample {self.key!r} has no image")
        with open(self.source, "rb") as handle:
            handle.seek(self.tar_offset)
            return handle.read(self.tar_size)


def expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files given directly, or the data files inside given directories, in sorted order."""
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SOURCE_SUFFIXES)
            if not found:
                raise ElmError(f"{path}: no .tar, .csv, .jsonl or .txt files in this directory")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SOURCE_SUFFIXES:
                raise ElmError(f"{path}: unknown data file type (expected .tar, .csv, .jsonl or .txt)")
            files.append(path)
        else:
            raise ElmError(f"{path}: not found")
    return files


def read_samples(path: Path) -> Iterator[Sample]:
    """The samples of one data file, in file order."""
    if path.suffix == ".tar":
        yield from _tar_samples(path)
    elif path.suffix == ".csv":
        yield from _csv_samples(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_samples(path)
    elif path.suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                yield Sample(str(path), str(number), line.rstrip("\n"))
    else:
        raise ElmError(f"{path}: unknown data file type")


def _tar_samples(path: Path) -> Iterator[Sample]:
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name
                key, dot, suffix = name.rpartition(".")
                if not dot:
                    continue
                suffix = "." + suffix.lower()
                if key not in images and key not in captions:
                    order.append(key)
                if suffix in IMAGE_SUFFIXES:
                    images[key] = member
                elif suffix == ".txt":
                    data = archive.extractfile(member)
                    captions[key] = data.read().decode("utf-8", errors="replace") if data else ""
    except (tarfile.TarError, OSError) as error:
        raise ElmError(f"{path}: not a readable tar shard ({error})") from None
    for key in order:
        member = images.get(key)
        if member is None and key not in captions:
            continue  # e.g. only a .json
        yield Sample(str(path), key, captions.get(key, ""),
                     tar_offset=member.offset_data if member else -1,
                     tar_size=member.size if member else 0)


def _resolve(base: Path, image: str) -> str:
    candidate = Path(image)
    return str(candidate if candidate.is_absolute() else base / candidate)


def _csv_samples(path: Path) -> Iterator[Sample]:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        for column in ("image", "caption"):
            if column not in fields:
                raise ElmError(f"{path}: no {column!r} column in the header (found {fields})")
        for number, row in enumerate(reader, start=2):
            yield Sample(str(path), str(number), row["caption"] or "",
                         image_path=_resolve(path.parent, row["image"] or ""))


def _jsonl_samples(path: Path) -> Iterator[Sample]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ElmError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or "image" not in record:
                raise ElmError(f"{path}:{number}: expected an object with 'image' and 'caption'")
            yield Sample(str(path), str(number), str(record.get("caption") or ""),
                         image_path=_resolve(path.parent, str(record["image"])))


def decode_image(data: bytes):
    """Pillow RGB image from encoded bytes (raises OSError/ValueError when unreadable)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
