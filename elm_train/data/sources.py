"""Text corpora: which files a list of sources names, and the documents in each file.

Sources are local files, directories and globs, or Hub datasets (`hf://datasets/...`, hub.py),
whose files are read by range requests without a local copy. Formats: plain text (one document
per file, or one per line), JSONL, gzipped JSONL and Parquet.
Work is cut into chunks of about `chunk_bytes` so that worker processes can read and tokenize
them in parallel while the output keeps the corpus order. Every document carries a position
(byte offset of its line, row number, or 0 for a whole file) that identifies it independently of
how the corpus was chunked, so split assignment does not depend on the number of workers.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from elm_spec import ElmError
from elm_train.data import hub

FORMATS = ("txt", "jsonl", "jsonl.gz", "parquet")
SUFFIX_FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".parquet": "parquet",
}
DEFAULT_CHUNK_BYTES = 1 << 20
LINE_MARGIN = 16 << 10  # a line range reads the rest of its last line by this much


@dataclass(frozen=True)
class SourceFile:
    index: int  # position in the expanded source list; part of every document's identity
    path: str  # a local path, or hf://datasets/ORG/NAME@COMMIT/FILE
    format: str
    size: int
    text_key: str | None = None  # this file's own text key (a Hub source's column=, a mix's)
    source: int = 0  # which source (of a mix, or on the command line) named it

    @property
    def is_local(self) -> bool:
        return not hub.is_hub_source(self.path)

    def open(self, exact: bool = False) -> BinaryIO:
        """The file's bytes. From the Hub each read is a ranged GET: of at least a chunk's bytes
        (read ahead for sequential reads), or, when EXACT, of just the bytes asked for."""
        if self.is_local:
            return open(self.path, "rb")
        return hub.open_file(self.path, self.size, DEFAULT_CHUNK_BYTES,
                             "none" if exact else "readahead")

    def key(self, options: ReadOptions) -> str:
        return self.text_key or options.text_key

    def key_hint(self) -> str:
        if not self.is_local:
            return "choose one with ?column=NAME"
        if self.text_key:
            return "its source sets it: ?column= of a Hub dataset, text_key of a mix source"
        return "choose one with --text-key"


@dataclass(frozen=True)
class ReadOptions:
    text_key: str = "text"
    text_per_line: bool = False


@dataclass
class Documents:
    """The documents of one chunk, in order, with the position identifying each in its file."""

    texts: list[str] = field(default_factory=list)
    file_indices: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    undecodable: int = 0

    def add(self, text: str, file: SourceFile, position: int) -> None:
        self.texts.append(text)
        self.file_indices.append(file.index)
        self.positions.append(position)
        self.sources.append(file.source)


# Chunks: small picklable descriptions of work; `read_chunk` turns one into Documents.

@dataclass(frozen=True)
class FileGroup:
    """Whole plain-text files, one document each."""

    files: tuple[SourceFile, ...]
    source_bytes: int


@dataclass(frozen=True)
class LineRange:
    """The lines that start within [start, end) of an uncompressed line-based file."""

    file: SourceFile
    start: int
    end: int

    @property
    def source_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LineBlock:
    """Whole lines already read (decompressed) by the planner, starting at line `first_line`."""

    file: SourceFile
    offset: int  # in the decompressed stream
    first_line: int
    data: bytes
    source_bytes: int  # compressed bytes this block accounts for


@dataclass(frozen=True)
class RowGroup:
    file: SourceFile
    row_group: int
    first_row: int
    source_bytes: int


Chunk = FileGroup | LineRange | LineBlock | RowGroup


def detect_format(path: str) -> str | None:
    name = path.rpartition("/")[2].lower()
    for suffix, fmt in sorted(SUFFIX_FORMATS.items(), key=lambda item: -len(item[0])):
        if name.endswith(suffix):
            return fmt
    return None


def expand_sources(sources: Sequence[str | os.PathLike[str]], source_format: str | None = None,
                   owners: Sequence[int] | None = None,
                   text_keys: Sequence[str | None] | None = None) -> list[SourceFile]:
    """Files named by SOURCES (files, directories searched recursively, globs, Hub datasets),
    in order; a file named twice belongs to the first source naming it.

    Each file's format comes from its name unless `source_format` forces one for all. OWNERS
    (default: each its own) and TEXT_KEYS give each source's number and text key.
    """
    if source_format is not None and source_format not in FORMATS:
        raise ElmError(f"unknown format {source_format!r} (expected one of {', '.join(FORMATS)})")
    owners = owners if owners is not None else range(len(sources))
    text_keys = text_keys if text_keys is not None else [None] * len(sources)
    paths: dict[str, tuple[int, str | None, int]] = {}  # path -> (size, text key, source)
    for source, owner, text_key in zip(sources, owners, text_keys, strict=True):
        text = str(source)
        if hub.is_hub_source(text):
            listed, column = hub.list_files(text, lambda name: (source_format or detect_format(name))
                                            is not None)
            for path, size in listed:
                paths.setdefault(path, (size, column or text_key, owner))
            continue
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise ElmError(f"{text}: no files match")
        elif Path(text).is_dir():
            files = sorted(p for p in Path(text).rglob("*")
                           if p.is_file() and not any(part.startswith(".")
                                                      for part in p.relative_to(text).parts))
            if not files:
                raise ElmError(f"{text}: directory holds no files")
        elif Path(text).is_file():
            files = [Path(text)]
        else:
            raise ElmError(f"{text}: not found")
        for file in files:
            paths.setdefault(str(file), (file.stat().st_size, text_key, owner))
    if not paths:
        raise ElmError("no sources given")
    result = []
    for index, (path, (size, text_key, owner)) in enumerate(paths.items()):
        fmt = source_format or detect_format(path)
        if fmt is None:
            raise ElmError(f"{path}: unknown file type (expected .txt, .jsonl, .json.gz, "
                           ".jsonl.gz or .parquet; --format txt|jsonl|jsonl.gz|parquet "
                           "reads any file as that format)")
        result.append(SourceFile(index, path, fmt, size, text_key, owner))
    return result


def plan_chunks(files: Sequence[SourceFile], options: ReadOptions,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Cut the corpus into chunks of about CHUNK_BYTES, in corpus order.

    Only gzipped files are read here (they cannot be split without decompressing); everything
    else is left to whoever reads the chunk.
    """
    group: list[SourceFile] = []
    group_bytes = 0
    for file in files:
        line_based = file.format != "txt" or options.text_per_line
        if (line_based or group_bytes >= chunk_bytes) and group:
            yield FileGroup(tuple(group), group_bytes)
            group, group_bytes = [], 0
        if file.format == "parquet":
            yield from _plan_parquet(file, file.key(options))
        elif file.format == "jsonl.gz":
            yield from _plan_gzip(file, chunk_bytes)
        elif line_based:
            for start in range(0, file.size, chunk_bytes):
                yield LineRange(file, start, min(start + chunk_bytes, file.size))
        else:
            group.append(file)
            group_bytes += file.size
    if group:
        yield FileGroup(tuple(group), group_bytes)


def _plan_gzip(file: SourceFile, chunk_bytes: int) -> Iterator[LineBlock]:
    offset, line, consumed = 0, 1, 0
    with file.open() as raw, gzip.GzipFile(fileobj=raw) as stream:
        pending = b""
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError, gzip.BadGzipFile) as error:
                raise ElmError(f"{file.path}: not a readable gzip file ({error})") from None
            data = pending + block
            if not block:
                if data:
                    yield LineBlock(file, offset, line, data, raw.tell() - consumed)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                pending = data
                continue
            pending = data[cut:]
            whole = data[:cut]
            yield LineBlock(file, offset, line, whole, raw.tell() - consumed)
            consumed = raw.tell()
            offset += len(whole)
            line += whole.count(b"\n")


def _plan_parquet(file: SourceFile, text_key: str) -> Iterator[RowGroup]:
    import pyarrow.parquet as pq

    try:
        with file.open() as handle:
            metadata = pq.ParquetFile(handle).metadata
    except ElmError:
        raise
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise ElmError(f"{file.path}: not a readable Parquet file ({error})") from None
    columns = metadata.schema.names
    if text_key not in columns:
        raise ElmError(f"{file.path}: no column {text_key!r} (columns: {', '.join(columns)}; "
                       f"{file.key_hint()})")
    size = file.size
    total_rows = max(metadata.num_rows, 1)
    first_row = 0
    for number in range(metadata.num_row_groups):
        rows = metadata.row_group(number).num_rows
        yield RowGroup(file, number, first_row, size * rows // total_rows)
        first_row += rows


def read_chunk(chunk: Chunk, options: ReadOptions) -> Documents:
    try:
        return _read_chunk(chunk, options)
    except OSError as error:
        raise ElmError(f"{error.filename or _chunk_path(chunk)}: cannot read "
                       f"({error.strerror or error})") from None


def _chunk_path(chunk: Chunk) -> str:
    return chunk.files[0].path if isinstance(chunk, FileGroup) else chunk.file.path


def _read_chunk(chunk: Chunk, options: ReadOptions) -> Documents:
    documents = Documents()
    if isinstance(chunk, FileGroup):
        for file in chunk.files:
            try:
                with file.open() as handle:
                    documents.add(handle.read().decode("utf-8"), file, 0)
            except UnicodeDecodeError:
                documents.undecodable += 1
    elif isinstance(chunk, LineRange):
        offset, data = _read_line_range(chunk)
        _read_lines(chunk.file, data, offset, None, options, documents)
    elif isinstance(chunk, LineBlock):
        _read_lines(chunk.file, chunk.data, chunk.offset, chunk.first_line, options, documents)
    else:
        _read_row_group(chunk, chunk.file.key(options), documents)
    return documents


def _read_line_range(chunk: LineRange) -> tuple[int, bytes]:
    """The bytes of every line starting in [start, end): a line belongs to the range it starts in.

    Read as the range (from the byte before it) and then LINE_MARGIN bytes at a time until its
    last line ends: from the Hub, that many ranged GETs and no byte more.
    """
    begin = max(chunk.start - 1, 0)
    with chunk.file.open(exact=True) as handle:
        handle.seek(begin)
        data = handle.read(chunk.end - begin)
        offset = begin
        if chunk.start > 0:  # skip the rest of a line that started in the previous range
            cut = data.find(b"\n")
            if cut < 0:
                return chunk.end, b""
            data, offset = data[cut + 1:], begin + cut + 1
        while data and not data.endswith(b"\n"):
            more = handle.read(LINE_MARGIN)
            if not more:
                break
            cut = more.find(b"\n")
            data += more if cut < 0 else more[:cut + 1]
            if cut >= 0:
                break
    return offset, data


def _read_lines(file: SourceFile, data: bytes, offset: int, first_line: int | None,
                options: ReadOptions, documents: Documents) -> None:
    is_json = file.format != "txt"
    position = 0
    for raw_line in data.split(b"\n"):
        start = position
        position += len(raw_line) + 1
        line = raw_line.rstrip(b"\r")
        if not line.strip():
            continue
        if not is_json:
            try:
                documents.add(line.decode("utf-8"), file, offset + start)
            except UnicodeDecodeError:
                documents.undecodable += 1
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            documents.undecodable += 1
            continue
        except json.JSONDecodeError as error:
            where = _line_name(file, data, offset, first_line, start)
            raise ElmError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
        text_key = file.key(options)
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            where = _line_name(file, data, offset, first_line, start)
            if not isinstance(record, dict):
                raise ElmError(f"{where}: expected a JSON object, found {type(record).__name__}")
            if text_key not in record:
                keys = ", ".join(map(repr, list(record)[:8])) or "none"
                raise ElmError(f"{where}: no {text_key!r} key (keys: {keys}; {file.key_hint()})")
            raise ElmError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
        documents.add(text, file, offset + start)


def _line_name(file: SourceFile, data: bytes, offset: int, first_line: int | None,
               start: int) -> str:
    """FILE:LINE for the line at START of DATA (counted from the file only on this error path)."""
    if first_line is None:
        first_line = 1 + _count_newlines(file, offset)
    line = first_line + data.count(b"\n", 0, start)
    return f"{file.path}:{line}"


def _count_newlines(file: SourceFile, limit: int) -> int:
    count = 0
    with file.open() as handle:
        while limit > 0:
            block = handle.read(min(limit, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            limit -= len(block)
    return count


def _read_row_group(chunk: RowGroup, text_key: str, documents: Documents) -> None:
    import pyarrow.parquet as pq

    try:
        with chunk.file.open() as handle:
            column = pq.ParquetFile(handle).read_row_group(chunk.row_group, columns=[text_key])
    except (OSError, ElmError):
        raise
    except Exception as error:  # pyarrow raises several types for corrupt data
        raise ElmError(f"{chunk.file.path}: row group {chunk.row_group} is unreadable "
                       f"({error})") from None
    values = column.column(0).to_pylist()
    for row, value in enumerate(values, start=chunk.first_row):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                documents.undecodable += 1
                continue
        if not isinstance(value, str):
            raise ElmError(f"{chunk.file.path}: row {row}: {text_key!r} is "
                           f"{type(value).__name__}, not a string")
        documents.add(value, chunk.file, row)


def iter_texts(files: Sequence[SourceFile], options: ReadOptions) -> Iterator[str]:
    """Every decodable document of FILES in order, read in this process."""
    for chunk in plan_chunks(files, options):
        yield from read_chunk(chunk, options).texts
