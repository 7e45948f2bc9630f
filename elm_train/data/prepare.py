"""`elm data prepare`: text corpora to packed token shards (the format of elm_train/data/format.py).

Worker processes read and tokenize chunks of the corpus (sources.py); the calling process only
writes, in corpus order, so the output is the same for any number of workers. At most a few
chunks per worker are in flight, so corpora larger than memory stream through.

Filters follow CoreNet: a document is dropped when it has fewer than `min_chars` characters
after SlimPajama's normalisation (lowercase, ASCII punctuation removed, whitespace runs
collapsed, stripped), or fewer than `min_tokens` tokens. Every kept document is followed by EOS.
A document goes to the `valid` split when a hash of (seed, source file, position in the file)
falls under `valid_fraction`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import string
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.modeldir import atomic_output_dir
from elm_spec.outputs import crash_point, refuse_overlap
from elm_spec.platform import usable_cores as default_workers
from elm_spec.progress import byte_progress
from elm_spec.tokenizer import EOS_ID, Tokenizer, write_tokenizer_files
from elm_train.data.format import Shard, shard_name, token_dtype, write_index
from elm_train.data.sources import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    ReadOptions,
    SourceFile,
    expand_sources,
    plan_chunks,
    read_chunk,
)

DEFAULT_SHARD_TOKENS = 100_000_000
CHUNKS_IN_FLIGHT_PER_WORKER = 3


@dataclass(frozen=True)
class PrepareOptions:
    text_key: str = "text"
    text_per_line: bool = False
    source_format: str | None = None
    min_chars: int = 200
    min_tokens: int = 256
    valid_fraction: float = 0.01
    seed: int = 0
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = field(default_factory=default_workers)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise ElmError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.shard_tokens < 1:
            raise ElmError(f"--shard-tokens must be positive, got {self.shard_tokens}")
        if self.workers < 1:
            raise ElmError(f"--workers must be at least 1, got {self.workers}")

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_key, self.text_per_line)


# The character filter, as CoreNet computes it (after SlimPajama's text processing).

_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def normalized_length(text: str) -> int:
    return len(_WHITESPACE.sub(" ", text.lower().translate(_DELETE_PUNCTUATION).strip()))


def has_min_chars(text: str, min_chars: int) -> bool:
    if min_chars <= 0:
        return True
    # The normalised length of a prefix never exceeds that of the whole text, so a prefix that
    # already passes decides it without normalising a long document.
    prefix = text[: 4 * min_chars + 64]
    if normalized_length(prefix) >= min_chars:
        return True
    return len(prefix) < len(text) and normalized_length(text) >= min_chars


def valid_mask(seed: int, file_indices: Sequence[int], positions: Sequence[int],
               fraction: float) -> np.ndarray:
    """Which documents go to the valid split: a seeded hash of each document's identity."""
    if fraction <= 0 or not positions:
        return np.zeros(len(positions), dtype=bool)
    seeds = np.full(len(positions), seed % 2**64, dtype=np.uint64)
    keys = _splitmix64(_splitmix64(seeds ^ np.asarray(file_indices, dtype=np.uint64))
                       ^ np.asarray(positions, dtype=np.uint64))
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclass
class ChunkResult:
    train: np.ndarray
    valid: np.ndarray
    counts: Counter
    source_bytes: int


class ChunkTokenizer:
    """Reads a chunk, filters its documents, tokenizes them and packs each split's tokens."""

    def __init__(self, tokenizer_file: Path, options: PrepareOptions):
        self.tokenizer = Tokenizer(tokenizer_file)
        self.options = options
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def __call__(self, chunk: Chunk) -> ChunkResult:
        options = self.options
        documents = read_chunk(chunk, options.read_options)
        counts = Counter(documents_read=len(documents.texts) + documents.undecodable,
                         undecodable_skipped=documents.undecodable)
        candidates = [i for i, text in enumerate(documents.texts)
                      if has_min_chars(text, options.min_chars)]
        counts["dropped_min_chars"] = len(documents.texts) - len(candidates)
        encoded = self._encode([documents.texts[i] for i in candidates])
        kept, kept_ids = [], []
        for index, ids in zip(candidates, encoded, strict=True):
            if ids is None:
                counts["undecodable_skipped"] += 1
            elif len(ids) - 1 < options.min_tokens:  # ids end with EOS
                counts["dropped_min_tokens"] += 1
            else:
                kept.append(index)
                kept_ids.append(ids)
        to_valid = valid_mask(options.seed, [documents.file_indices[i] for i in kept],
                              [documents.positions[i] for i in kept], options.valid_fraction)
        counts["documents_train"] = int((~to_valid).sum())
        counts["documents_valid"] = int(to_valid.sum())
        train = self._pack([ids for ids, valid in zip(kept_ids, to_valid, strict=True) if not valid])
        valid = self._pack([ids for ids, valid in zip(kept_ids, to_valid, strict=True) if valid])
        return ChunkResult(train, valid, counts, chunk.source_bytes)

    def _encode(self, texts: list[str]) -> list[np.ndarray | None]:
        """Token ids of each text followed by EOS; None for a text with no UTF-8 form."""
        processor = self.tokenizer.processor
        try:
            return processor.Encode(texts, add_eos=True, num_threads=1, return_type="numpy")
        except TypeError:  # a lone surrogate (from a JSON "\ud800" escape) somewhere in the batch
            return [self._encode_one(text) for text in texts]

    def _encode_one(self, text: str) -> np.ndarray | None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return self.tokenizer.processor.Encode(text, add_eos=True, return_type="numpy")

    def _pack(self, documents: list[np.ndarray]) -> np.ndarray:
        if not documents:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate(documents).astype(self.dtype)


_WORKER: ChunkTokenizer | None = None


def _start_worker(tokenizer_file: Path, options: PrepareOptions, parent: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    exit_with_parent(parent)
    _WORKER = ChunkTokenizer(tokenizer_file, options)


def exit_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when PARENT dies (even by SIGKILL, when it cannot stop
    its pool); where prctl is missing (macOS) the pool's own broken-pipe handling remains."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _tokenize_chunk(chunk: Chunk) -> ChunkResult:
    assert _WORKER is not None
    return _WORKER(chunk)


def _process_context() -> BaseContext:
    """fork on Linux: workers start at once and a script without a `__main__` guard still works
    (they only read files, tokenize and return arrays); spawn where fork is unsafe (macOS)."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def tokenize_in_order(chunks: Iterable[Chunk], tokenizer_file: Path, options: PrepareOptions
                      ) -> Iterator[ChunkResult]:
    """Results of every chunk in corpus order, computed by `options.workers` processes.

    At most CHUNKS_IN_FLIGHT_PER_WORKER chunks per worker are submitted and not yet consumed,
    which bounds memory whatever the corpus size.
    """
    pool = ProcessPoolExecutor(options.workers, mp_context=_process_context(),
                               initializer=_start_worker, initargs=(tokenizer_file, options, os.getpid()))
    pending: deque[Future] = deque()
    chunk_iterator = iter(chunks)

    def submit_more() -> None:
        while len(pending) < CHUNKS_IN_FLIGHT_PER_WORKER * options.workers:
            chunk = next(chunk_iterator, None)
            if chunk is None:
                return
            pending.append(pool.submit(_tokenize_chunk, chunk))

    try:
        submit_more()
        while pending:
            future = pending.popleft()
            submit_more()
            try:
                yield future.result()
            except BrokenProcessPool:
                raise ElmError("a tokenizing worker process died (out of memory? "
                               "try fewer --workers)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ShardWriter:
    """Appends token arrays to each split's shards, starting a new shard every `shard_tokens`."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory = directory
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.shards: dict[str, list[Shard]] = {"train": [], "valid": []}
        self._open: dict[str, tuple[Any, int]] = {}  # split -> (file, tokens written)

    def write(self, split: str, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            handle, written = self._open.get(split) or (self._start(split), 0)
            take = min(tokens.size, self.shard_tokens - written)
            handle.write(tokens[:take].data)
            tokens = tokens[take:]
            if written + take == self.shard_tokens:
                self._finish(split, handle, self.shard_tokens)
            else:
                self._open[split] = (handle, written + take)

    def close(self) -> dict[str, list[Shard]]:
        for split, (handle, written) in list(self._open.items()):
            self._finish(split, handle, written)
        return self.shards

    def _start(self, split: str):
        return (self.directory / shard_name(split, len(self.shards[split]))).open("wb")

    def _finish(self, split: str, handle, tokens: int) -> None:
        handle.close()
        self.shards[split].append(Shard(Path(handle.name), tokens))
        self._open.pop(split, None)


def prepare_data(sources: Sequence[str | os.PathLike[str]], tokenizer: str | os.PathLike[str],
                 output: str | os.PathLike[str], options: PrepareOptions | None = None,
                 force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize SOURCES into a prepared data directory OUTPUT; returns the stats of its index."""
    options = options or PrepareOptions()
    tok = Tokenizer(tokenizer)
    files = expand_sources(sources, options.source_format)
    refuse_replacing_inputs(files, tok, output)
    chunks = plan_chunks(files, options.read_options, options.chunk_bytes)
    return write_prepared(tokenize_in_order(chunks, tok.path, options), tok, files, output,
                          options, force=force, show_progress=show_progress)


def refuse_replacing_inputs(files: Sequence[SourceFile], tok: Tokenizer,
                            output: str | os.PathLike[str]) -> None:
    """Refuse an OUTPUT that holds a corpus file or the tokenizer (`--force` would delete
    them), before any work is done."""
    by_directory = {Path(f.path).parent: Path(f.path) for f in files if f.is_local}
    for file in [*by_directory.values(), tok.path]:  # one file per directory suffices
        refuse_overlap(file, output)


def write_prepared(results: Iterable[ChunkResult], tok: Tokenizer, files: Sequence[SourceFile],
                   output: str | os.PathLike[str], options: PrepareOptions, force: bool = False,
                   show_progress: bool = True) -> dict[str, Any]:
    """Write chunk RESULTS (in corpus order) as shards, tokenizer files and index.json into OUTPUT.

    Shared by every backend, so that the same results give the same bytes.
    """
    dtype = token_dtype(tok.vocab_size)
    totals: Counter = Counter()
    with atomic_output_dir(output, force=force) as staging:
        writer = ShardWriter(staging, dtype, options.shard_tokens)
        total_bytes = sum(f.size for f in files)
        with _progress_bar(total_bytes, show_progress) as advance:
            for result in results:
                writer.write("train", result.train)
                writer.write("valid", result.valid)
                totals.update(result.counts)
                totals["tokens_train"] += result.train.size
                totals["tokens_valid"] += result.valid.size
                advance(result.source_bytes, totals)
                crash_point("data-prepare")
        splits = writer.close()
        stats = _stats(totals, options, files_count=len(files), source_bytes=total_bytes)
        kept = stats["documents_kept"]
        if kept == 0:
            raise ElmError(f"no documents kept: {stats['documents_read']} read, "
                           f"{stats['dropped_min_chars']} under {options.min_chars} characters "
                           f"(--min-chars), {stats['dropped_min_tokens']} under {options.min_tokens} "
                           f"tokens (--min-tokens), {stats['undecodable_skipped']} undecodable")
        if not splits["train"]:
            raise ElmError(f"all {kept} kept documents fell in the valid split "
                           f"(--valid-fraction {options.valid_fraction} is too large for this corpus)")
        write_tokenizer_files(tok.path, staging)
        write_index(staging, dtype, tok.vocab_size, EOS_ID, splits, stats)
    return stats


def _stats(totals: Counter, options: PrepareOptions, files_count: int, source_bytes: int
           ) -> dict[str, Any]:
    dropped = (totals["dropped_min_chars"] + totals["dropped_min_tokens"]
               + totals["undecodable_skipped"])
    settings = asdict(options)
    for key in ("workers", "chunk_bytes"):  # they change how fast, never what is written
        settings.pop(key)
    return {
        "source_files": files_count,
        "source_bytes": source_bytes,
        "documents_read": totals["documents_read"],
        "documents_kept": totals["documents_read"] - dropped,
        "dropped_min_chars": totals["dropped_min_chars"],
        "dropped_min_tokens": totals["dropped_min_tokens"],
        "undecodable_skipped": totals["undecodable_skipped"],
        "documents": {"train": totals["documents_train"], "valid": totals["documents_valid"]},
        "tokens": {"train": totals["tokens_train"], "valid": totals["tokens_valid"]},
        "settings": settings,
    }


@contextlib.contextmanager
def _progress_bar(total_bytes: int, enabled: bool) -> Iterator[Callable[[int, Counter], None]]:
    """A rich progress bar over source bytes that also shows documents and tokens so far."""
    if not enabled:
        yield lambda *_: None
        return
    from rich.progress import TextColumn

    progress = byte_progress(
        "tokenizing", TextColumn("{task.fields[documents]} docs, {task.fields[tokens]} tokens"))
    task = progress.add_task("prepare", total=total_bytes, documents=0, tokens=0)

    def advance(source_bytes: int, totals: Counter) -> None:
        progress.update(task, advance=source_bytes, documents=totals["documents_read"],
                        tokens=totals["tokens_train"] + totals["tokens_valid"])

    with progress:
        yield advance
