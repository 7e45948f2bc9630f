"""`elm data prepare`: text corpora to packed token shards (the format of elm_train/data/format.py).

Worker processes read and tokenize chunks of the corpus (sources.py); the calling process only
writes, in corpus order, so the output is the same for any number of workers. At most a few
chunks per worker are in flight, so corpora larger than memory stream through.

Filters follow CoreNet: a document is dropped when it has fewer than `min_chars` characters
after SlimPajama's normalisation (lowercase, ASCII punctuation removed, whitespace runs
collapsed, stripped), or fewer than `min_tokens` tokens. Every kept document is followed by EOS.
A document goes to the `valid` split when a hash of (seed, source file, position in the file)
falls under `valid_fraction`. Under a weighted mix (mix.py) a second, independent hash decides
which documents of each source are kept; every chunk's documents are then stored first (in the
output's staging directory, or the datatrove backend's parts) and selected once every source's
token count is known.

`layout="corenet"` prepares CoreNet's own rows instead (docs/reference.md section 3): each
document is cut into chunks of `chunk_words` space-separated words; a chunk is dropped under
`min_chars` (the same count) or under `min_tokens` counting its BOS and EOS; a kept chunk is
`ftfy.fix_text(chunk, normalization="NFC")` tokenized between BOS and EOS and stored whole as
one row, its end in the split's row file (the loader cuts and pads it to seq_len + 1). A row
takes its document's split and mix bucket, so a document's chunks stay together. The stats
then count chunks: `chunks_read`, `chunks_kept`, the drops, and `rows` per split.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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
from elm_spec.names import DATA_LAYOUTS
from elm_spec.outputs import crash_point, refuse_overlap
from elm_spec.platform import usable_cores as default_workers
from elm_spec.progress import byte_progress
from elm_spec.tokenizer import BOS_ID, EOS_ID, Tokenizer, write_tokenizer_files
from elm_train.data.format import (
    ROW_ENDS_DTYPE,
    Shard,
    rows_name,
    shard_name,
    token_dtype,
    write_index,
)
from elm_train.data.mix import BUCKET_BITS, BUCKETS, Mix, as_mix, thresholds
from elm_train.data.sources import (
    DEFAULT_CHUNK_BYTES,
    Chunk,
    Documents,
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
    layout: str = "packed"
    chunk_words: int = 2048  # corenet: words per chunk (CoreNet's document_split_size)

    def __post_init__(self) -> None:
        if self.layout not in DATA_LAYOUTS:
            raise ElmError(f"--layout must be one of {', '.join(DATA_LAYOUTS)}, got {self.layout!r}")
        if self.chunk_words < 1:
            raise ElmError(f"--chunk-words must be positive, got {self.chunk_words}")
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


def document_keys(seed: int, file_indices: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """A seeded 64-bit hash of each document's identity (source file, position in it)."""
    seeds = np.full(len(positions), seed % 2**64, dtype=np.uint64)
    return _splitmix64(_splitmix64(seeds ^ np.asarray(file_indices, dtype=np.uint64))
                       ^ np.asarray(positions, dtype=np.uint64))


def valid_mask(seed: int, file_indices: Sequence[int], positions: Sequence[int],
               fraction: float) -> np.ndarray:
    """Which documents go to the valid split: a seeded hash of each document's identity."""
    if fraction <= 0 or not positions:
        return np.zeros(len(positions), dtype=bool)
    keys = document_keys(seed, file_indices, positions)
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


MIX_SEED = 0x6A09E667F3BCC908  # sets the mix's hash apart from the valid split's


def mix_buckets(seed: int, file_indices: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """Each document's mix key bucket (mix.py): an independent seeded hash of its identity."""
    keys = document_keys(seed ^ MIX_SEED, file_indices, positions)
    return (keys >> np.uint64(64 - BUCKET_BITS)).astype(np.int32)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_chunks(text: str, words: int) -> list[str]:
    """CoreNet's `_split_document_into_sequences`: WORDS words at a time, split on single spaces."""
    pieces = text.split(" ")
    return [" ".join(pieces[i: i + words]) for i in range(0, len(pieces), words)]


@dataclass
class SplitPart:
    """One split's documents of a chunk: their tokens (each followed by EOS) in corpus order,
    and each document's token count, source (mix.Mix.sources) and mix key bucket."""

    tokens: np.ndarray
    lengths: np.ndarray
    sources: np.ndarray
    buckets: np.ndarray

    @classmethod
    def pack(cls, documents: list[np.ndarray], sources: Sequence[int], buckets: np.ndarray,
             dtype: np.dtype) -> SplitPart:
        tokens = np.concatenate(documents).astype(dtype) if documents else np.empty(0, dtype)
        return cls(tokens, np.array([d.size for d in documents], dtype=np.int64),
                   np.asarray(sources, dtype=np.int32), np.asarray(buckets, dtype=np.int32))

    def select(self, keep: np.ndarray) -> SplitPart:
        """The documents whose bucket is under their source's KEEP."""
        kept = self.buckets < keep[self.sources]
        return SplitPart(self.tokens[np.repeat(kept, self.lengths)], self.lengths[kept],
                         self.sources[kept], self.buckets[kept])

    def add_tokens(self, histogram: np.ndarray) -> None:
        """Add each document's tokens to HISTOGRAM[source, bucket]."""
        np.add.at(histogram, (self.sources, self.buckets), self.lengths)


@dataclass
class ChunkResult:
    train: SplitPart
    valid: SplitPart
    counts: Counter
    source_bytes: int

    def select(self, keep: np.ndarray) -> ChunkResult:
        train, valid = self.train.select(keep), self.valid.select(keep)
        counts = self.counts.copy()
        counts["dropped_mix"] = (counts["documents_train"] + counts["documents_valid"]
                                 - train.lengths.size - valid.lengths.size)
        counts["documents_train"], counts["documents_valid"] = train.lengths.size, valid.lengths.size
        return ChunkResult(train, valid, counts, self.source_bytes)


_SPLIT_ARRAYS = ("tokens", "lengths", "sources", "buckets")


def save_part(path: Path, result: ChunkResult) -> None:
    """RESULT as one .npz file, which appears at PATH only when complete."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {f"{split}_{name}": getattr(getattr(result, split), name)
              for split in ("train", "valid") for name in _SPLIT_ARRAYS}
    with temporary.open("wb") as handle:
        np.savez(handle, **arrays,
                 counts=np.frombuffer(json.dumps(dict(result.counts)).encode(), dtype=np.uint8),
                 source_bytes=np.int64(result.source_bytes),
                 tokens=np.int64(result.train.tokens.size + result.valid.tokens.size))
    os.replace(temporary, path)


def load_part(path: Path, tokens: bool = True) -> ChunkResult:
    """A saved ChunkResult; without TOKENS, only its per-document arrays are read."""
    with np.load(path) as part:
        def split(name: str) -> SplitPart:
            return SplitPart(*(part[f"{name}_{array}"] if tokens or array != "tokens"
                               else np.empty(0) for array in _SPLIT_ARRAYS))

        return ChunkResult(split("train"), split("valid"),
                           Counter(json.loads(part["counts"].tobytes())), int(part["source_bytes"]))


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
        if options.layout == "corenet":
            return self._corenet_rows(documents, counts, chunk.source_bytes)
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
        return self._split(documents, kept, kept_ids, counts, chunk.source_bytes)

    def _corenet_rows(self, documents: Documents, counts: Counter, source_bytes: int
                      ) -> ChunkResult:
        """CoreNet's rows: chunks that pass both filters, BOS ... EOS, each with its document's
        split, source and mix bucket (`documents_*` count rows)."""
        import ftfy

        options = self.options
        owners, texts = [], []  # the chunks that pass the character filter, and their document
        for index, text in enumerate(documents.texts):
            for piece in word_chunks(text, options.chunk_words):
                counts["chunks_read"] += 1
                if has_min_chars(piece, options.min_chars):
                    owners.append(index)
                    texts.append(ftfy.fix_text(piece, normalization="NFC"))
                else:
                    counts["dropped_min_chars"] += 1
        rows, row_owners = [], []
        for owner, ids in zip(owners, self._encode(texts, bos=True), strict=True):
            if ids is None:
                counts["undecodable_skipped"] += 1
            elif len(ids) < options.min_tokens:  # BOS and EOS count, as in CoreNet
                counts["dropped_min_tokens"] += 1
            else:
                rows.append(ids)
                row_owners.append(owner)
        return self._split(documents, row_owners, rows, counts, source_bytes)

    def _split(self, documents: Documents, owners: list[int], rows: list[list[int]],
               counts: Counter, source_bytes: int) -> ChunkResult:
        """ROWS (of the documents at OWNERS) into train and valid by their document's seeded
        hash, each with its source and mix bucket."""
        options = self.options
        file_indices = [documents.file_indices[i] for i in owners]
        positions = [documents.positions[i] for i in owners]
        to_valid = valid_mask(options.seed, file_indices, positions, options.valid_fraction)
        buckets = mix_buckets(options.seed, file_indices, positions)
        sources = np.array([documents.sources[i] for i in owners], dtype=np.int32)
        counts["documents_train"] = int((~to_valid).sum())
        counts["documents_valid"] = int(to_valid.sum())
        train, valid = (SplitPart.pack([ids for ids, v in zip(rows, to_valid, strict=True)
                                        if v == split], sources[to_valid == split],
                                       buckets[to_valid == split], self.dtype)
                        for split in (False, True))
        return ChunkResult(train, valid, counts, source_bytes)

    def _encode(self, texts: list[str], bos: bool = False) -> list[np.ndarray | None]:
        """Token ids of each text followed by EOS (after BOS when BOS); None for a text with no
        UTF-8 form."""
        processor = self.tokenizer.processor
        try:
            return processor.Encode(texts, add_bos=bos, add_eos=True, num_threads=1,
                                    return_type="numpy")
        except TypeError:  # a lone surrogate (from a JSON "\ud800" escape) somewhere in the batch
            return [self._encode_one(text, bos) for text in texts]

    def _encode_one(self, text: str, bos: bool) -> np.ndarray | None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return self.tokenizer.processor.Encode(text, add_bos=bos, add_eos=True, return_type="numpy")


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


class RowEndsWriter:
    """Appends the end of each row (corenet layout) to each split's row file."""

    def __init__(self, directory: Path):
        self.paths = {split: directory / rows_name(split) for split in ("train", "valid")}
        self.handles = {split: path.open("wb") for split, path in self.paths.items()}
        self.ends = dict.fromkeys(self.paths, 0)
        self.rows = dict.fromkeys(self.paths, 0)

    def write(self, split: str, lengths: np.ndarray) -> None:
        ends = self.ends[split] + np.cumsum(lengths, dtype=np.uint64)
        self.handles[split].write(ends.astype(ROW_ENDS_DTYPE).data)
        if ends.size:
            self.ends[split] = int(ends[-1])
        self.rows[split] += int(ends.size)

    def close(self) -> dict[str, Shard]:
        for handle in self.handles.values():
            handle.close()
        return {split: Shard(path, self.rows[split]) for split, path in self.paths.items()}


def prepare_data(sources: Sequence[str | os.PathLike[str]] | Mix,
                 tokenizer: str | os.PathLike[str], output: str | os.PathLike[str],
                 options: PrepareOptions | None = None, force: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """Tokenize SOURCES (paths, or a mix) into a prepared data directory OUTPUT; returns the
    stats of its index."""
    options = options or PrepareOptions()
    tok = Tokenizer(tokenizer)
    mix = as_mix(sources).pinned()
    files = expand_mix(mix, options)
    refuse_replacing_inputs(files, tok, output)
    chunks = plan_chunks(files, options.read_options, options.chunk_bytes)
    return write_prepared(tokenize_in_order(chunks, tok.path, options), tok, files, output,
                          options, mix, force=force, show_progress=show_progress)


def expand_mix(mix: Mix, options: PrepareOptions) -> list[SourceFile]:
    paths, owners, text_keys = mix.flat()
    return expand_sources(paths, options.source_format, owners, text_keys)


def refuse_replacing_inputs(files: Sequence[SourceFile], tok: Tokenizer,
                            output: str | os.PathLike[str]) -> None:
    """Refuse an OUTPUT that holds a corpus file or the tokenizer (`--force` would delete
    them), before any work is done."""
    by_directory = {Path(f.path).parent: Path(f.path) for f in files if f.is_local}
    for file in [*by_directory.values(), tok.path]:  # one file per directory suffices
        refuse_overlap(file, output)


def write_prepared(results: Iterable[ChunkResult] | None, tok: Tokenizer,
                   files: Sequence[SourceFile], output: str | os.PathLike[str],
                   options: PrepareOptions, mix: Mix, force: bool = False,
                   show_progress: bool = True, parts: Sequence[Path] | None = None
                   ) -> dict[str, Any]:
    """Write chunk RESULTS (in corpus order), or the saved PARTS holding them, as shards,
    tokenizer files and index.json into OUTPUT.

    Shared by every backend, so that the same results give the same bytes. A weighted MIX needs
    every result before it writes the first: RESULTS are saved as parts in the staging directory
    first (and removed at the end).
    """
    dtype = token_dtype(tok.vocab_size)
    totals: Counter = Counter()
    total_bytes = sum(f.size for f in files)
    per_source = {split: np.zeros((2, len(mix.sources)), dtype=np.int64)  # tokens, documents
                  for split in ("train", "valid")}
    with atomic_output_dir(output, force=force) as staging:
        available = None
        if mix.weighted:
            if parts is None:
                parts = _save_parts(results, staging / ".mix-parts", total_bytes, show_progress)
            keep, available = mix_keep(parts, mix)
            results = (load_part(path).select(keep) for path in parts)
        elif parts is not None:
            results = (load_part(path) for path in parts)
        writer = ShardWriter(staging, dtype, options.shard_tokens)
        row_writer = RowEndsWriter(staging) if options.layout == "corenet" else None
        # under a mix the chunks were tokenized above: this pass selects and writes
        label = "writing" if mix.weighted or parts is not None else "tokenizing"
        with _progress_bar(total_bytes, show_progress, label) as advance:
            for result in results:
                for split in ("train", "valid"):
                    part = getattr(result, split)
                    writer.write(split, part.tokens)
                    if row_writer is not None:
                        row_writer.write(split, part.lengths)
                    totals[f"tokens_{split}"] += part.tokens.size
                    np.add.at(per_source[split][0], part.sources, part.lengths)
                    np.add.at(per_source[split][1], part.sources, 1)
                totals.update(result.counts)
                advance(result.source_bytes, totals)
                crash_point("data-prepare")
        splits = writer.close()
        rows = row_writer.close() if row_writer is not None else None
        shutil.rmtree(staging / ".mix-parts", ignore_errors=True)
        stats = _stats(totals, options, files_count=len(files), source_bytes=total_bytes)
        stats["sources"] = _source_stats(mix, per_source, available)
        if mix.weighted:
            stats["mix_tokens"] = mix.tokens
        kept = stats.get("chunks_kept", stats.get("documents_kept"))
        if kept == 0:
            chunks = f" in {stats['chunks_read']} chunks" if "chunks_read" in stats else ""
            raise ElmError(f"no documents kept: {stats['documents_read']} read{chunks}, "
                           f"{stats['dropped_min_chars']} under {options.min_chars} characters "
                           f"(--min-chars), {stats['dropped_min_tokens']} under {options.min_tokens} "
                           f"tokens (--min-tokens), {stats['undecodable_skipped']} undecodable")
        if not splits["train"]:
            raise ElmError(f"all {kept} kept {'rows' if rows else 'documents'} fell in the valid split "
                           f"(--valid-fraction {options.valid_fraction} is too large for this corpus)")
        write_tokenizer_files(tok.path, staging)
        if rows is None:
            write_index(staging, dtype, tok.vocab_size, EOS_ID, splits, stats)
        else:
            write_index(staging, dtype, tok.vocab_size, EOS_ID, splits, stats, rows, BOS_ID,
                        corenet_pad_id(tok))
    return stats


def corenet_pad_id(tok: Tokenizer) -> int:
    """CoreNet's padding id: the tokenizer's own, or else the vocabulary size (32000 for Llama-2)."""
    pad = int(tok.processor.pad_id())
    return pad if pad >= 0 else tok.vocab_size


def _save_parts(results: Iterable[ChunkResult], directory: Path, total_bytes: int,
                show_progress: bool) -> list[Path]:
    directory.mkdir()
    paths, totals = [], Counter()
    with _progress_bar(total_bytes, show_progress) as advance:
        for number, result in enumerate(results):
            paths.append(directory / f"part-{number:08d}.npz")
            save_part(paths[-1], result)
            totals.update(result.counts)
            totals["tokens_train"] += result.train.tokens.size
            totals["tokens_valid"] += result.valid.tokens.size
            advance(result.source_bytes, totals)
    return paths


def mix_keep(parts: Sequence[Path], mix: Mix) -> tuple[np.ndarray, list[int]]:
    """How many key buckets each source keeps (mix.thresholds), from the saved PARTS; and each
    source's tokens before the mix."""
    histogram = np.zeros((len(mix.sources), BUCKETS), dtype=np.int64)
    for path in parts:
        result = load_part(path, tokens=False)
        result.train.add_tokens(histogram)
        result.valid.add_tokens(histogram)
    return thresholds(histogram, mix)


def _source_stats(mix: Mix, per_source: dict[str, np.ndarray], available: list[int] | None
                  ) -> list[dict[str, Any]]:
    """Per source: its weight, the tokens and documents it put in each split, and under a
    weighted mix the tokens it had before the mix."""
    result = []
    for number, source in enumerate(mix.sources):
        entry: dict[str, Any] = {
            "name": source.name, "paths": list(source.paths), "weight": source.weight,
            "tokens": {split: int(per_source[split][0][number]) for split in per_source},
            "documents": {split: int(per_source[split][1][number]) for split in per_source}}
        if available is not None:
            entry["tokens_before_mix"] = available[number]
        result.append(entry)
    return result


def _stats(totals: Counter, options: PrepareOptions, files_count: int, source_bytes: int
           ) -> dict[str, Any]:
    dropped = (totals["dropped_min_chars"] + totals["dropped_min_tokens"]
               + totals["undecodable_skipped"] + totals["dropped_mix"])
    settings = asdict(options)
    for key in ("workers", "chunk_bytes"):  # they change how fast, never what is written
        settings.pop(key)
    stored = {"train": totals["documents_train"], "valid": totals["documents_valid"]}
    if options.layout == "corenet":  # filters, mix and splits count chunks, each kept one a row
        return {
            "source_files": files_count,
            "source_bytes": source_bytes,
            "documents_read": totals["documents_read"],
            "chunks_read": totals["chunks_read"],
            "chunks_kept": stored["train"] + stored["valid"],
            "dropped_min_chars": totals["dropped_min_chars"],
            "dropped_min_tokens": totals["dropped_min_tokens"],
            "undecodable_skipped": totals["undecodable_skipped"],
            "dropped_mix": totals["dropped_mix"],
            "rows": stored,
            "tokens": {"train": totals["tokens_train"], "valid": totals["tokens_valid"]},
            "settings": settings,
        }
    for key in ("layout", "chunk_words"):  # packed data's index.json is as before layouts
        settings.pop(key)
    return {
        "source_files": files_count,
        "source_bytes": source_bytes,
        "documents_read": totals["documents_read"],
        "documents_kept": totals["documents_read"] - dropped,
        "dropped_min_chars": totals["dropped_min_chars"],
        "dropped_min_tokens": totals["dropped_min_tokens"],
        "undecodable_skipped": totals["undecodable_skipped"],
        "dropped_mix": totals["dropped_mix"],
        "documents": stored,
        "tokens": {"train": totals["tokens_train"], "valid": totals["tokens_valid"]},
        "settings": settings,
    }


@contextlib.contextmanager
def _progress_bar(total_bytes: int, enabled: bool, label: str = "tokenizing"
                  ) -> Iterator[Callable[[int, Counter], None]]:
    """A rich progress bar over source bytes that also shows documents and tokens so far."""
    if not enabled:
        yield lambda *_: None
        return
    from rich.progress import TextColumn

    progress = byte_progress(
        label, TextColumn("{task.fields[documents]} docs, {task.fields[tokens]} tokens"))
    task = progress.add_task("prepare", total=total_bytes, documents=0, tokens=0)

    def advance(source_bytes: int, totals: Counter) -> None:
        progress.update(task, advance=source_bytes, documents=totals["documents_read"],
                        tokens=totals["tokens_train"] + totals["tokens_valid"])

    with progress:
        yield advance
