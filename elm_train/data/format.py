"""The on-disk format of prepared token data (`elm data prepare` writes it, the loader reads it).

DATA_DIR/
  index.json          {"format": FORMAT, "dtype": "uint16"|"uint32", "vocab_size", "eos_id",
                       "splits": {"train": [{"file", "tokens"}, ...], "valid": [...]},
                       "stats": {...}}
  tokenizer.model     the SentencePiece model the tokens come from (plus its configs)
  train-00000.bin     raw little-endian token ids: documents joined, each followed by EOS
  valid-00000.bin

Shards are flat token streams; the loader cuts them into windows of seq_len + 1 tokens.

Data prepared with `--layout corenet` (CoreNet's rows, docs/reference.md section 3) adds to
index.json `"layout": "corenet"`, `"bos_id"`, `"pad_id"` and `"rows": {split: {"file",
"rows"}}`; each stream is then rows of BOS ... EOS, and `train-rows.bin` holds the end of each
row in its split's stream (little-endian uint64), so row i is stream[end[i-1]:end[i]]. Packed
data has none of these keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.modeldir import listed_file, read_json, write_json
from elm_spec.names import DATA_LAYOUTS

FORMAT = "elm-tokens-v1"
ROW_ENDS_DTYPE = np.dtype("<u8")
INDEX_FILE = "index.json"
SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def rows_name(split: str) -> str:
    return f"{split}-rows.bin"


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: int


@dataclass(frozen=True)
class TokenData:
    directory: Path
    dtype: np.dtype
    vocab_size: int
    eos_id: int
    splits: dict[str, list[Shard]]
    stats: dict[str, Any]
    layout: str = "packed"
    bos_id: int | None = None
    pad_id: int | None = None
    # corenet: each split's file of row ends, its `tokens` the number of rows
    rows: dict[str, Shard] = field(default_factory=dict)

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits or not self.splits[split]:
            raise ElmError(f"{self.directory / INDEX_FILE}: no {split!r} split")
        return self.splits[split]

    def memmap(self, shard: Shard) -> np.memmap:
        return np.memmap(shard.path, dtype=self.dtype, mode="r", shape=(shard.tokens,))

    def row_ends(self, split: str) -> np.ndarray:
        """Where each row of SPLIT ends in its token stream (corenet layout)."""
        rows = self.rows.get(split)
        if rows is None or not rows.tokens:
            return np.empty(0, dtype=ROW_ENDS_DTYPE)
        return np.memmap(rows.path, dtype=ROW_ENDS_DTYPE, mode="r", shape=(rows.tokens,))


def read_index(directory: str | os.PathLike[str]) -> TokenData:
    root = Path(directory)
    index = read_json(root / INDEX_FILE)
    if index.get("format") != FORMAT:
        raise ElmError(f"{root / INDEX_FILE}: format is {index.get('format')!r}, expected {FORMAT!r}")
    try:
        dtype = np.dtype(index["dtype"])
        splits = {name: [Shard(listed_file(root, entry["file"], root / INDEX_FILE), int(entry["tokens"]))
                         for entry in entries]
                  for name, entries in index["splits"].items()}
        layout = index.get("layout", "packed")
        rows = {name: Shard(listed_file(root, entry["file"], root / INDEX_FILE), int(entry["rows"]))
                for name, entry in index.get("rows", {}).items()}
        data = TokenData(root, dtype, int(index["vocab_size"]), int(index["eos_id"]), splits,
                         index.get("stats", {}), layout,
                         None if index.get("bos_id") is None else int(index["bos_id"]),
                         None if index.get("pad_id") is None else int(index["pad_id"]), rows)
    except (KeyError, TypeError, ValueError) as error:
        raise ElmError(f"{root / INDEX_FILE}: malformed ({error!r})") from None
    if layout not in DATA_LAYOUTS:
        raise ElmError(f"{root / INDEX_FILE}: layout {layout!r} is not one of {', '.join(DATA_LAYOUTS)}")
    if layout == "corenet" and (data.pad_id is None or set(rows) != set(splits)):
        raise ElmError(f"{root / INDEX_FILE}: layout corenet needs pad_id and rows for every split")
    for shard_list in splits.values():
        for shard in shard_list:
            _check_size(shard, shard.tokens * dtype.itemsize)
    for name, row_file in rows.items():
        _check_size(row_file, row_file.tokens * ROW_ENDS_DTYPE.itemsize)
        ends = data.row_ends(name)
        stream = sum(shard.tokens for shard in splits[name])
        if (int(ends[-1]) if ends.size else 0) != stream:
            raise ElmError(f"{row_file.path}: its rows end at token {int(ends[-1]) if ends.size else 0}, "
                           f"the {name!r} shards hold {stream}")
    return data


def _check_size(shard: Shard, expected: int) -> None:
    if not shard.path.is_file() or shard.path.stat().st_size != expected:
        raise ElmError(f"{shard.path}: missing or not {expected} bytes as index.json says")


def write_index(directory: Path, dtype: np.dtype, vocab_size: int, eos_id: int,
                splits: dict[str, list[Shard]], stats: dict[str, Any],
                rows: dict[str, Shard] | None = None, bos_id: int | None = None,
                pad_id: int | None = None) -> None:
    """index.json; ROWS (with BOS_ID and PAD_ID) only for the corenet layout."""
    corenet = {} if rows is None else {
        "layout": "corenet", "bos_id": bos_id, "pad_id": pad_id,
        "rows": {name: {"file": r.path.name, "rows": r.tokens} for name, r in rows.items()}}
    write_json(directory / INDEX_FILE, {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        **corenet,
        "splits": {name: [{"file": s.path.name, "tokens": s.tokens} for s in shards]
                   for name, shards in splits.items()},
        "stats": stats,
    })
