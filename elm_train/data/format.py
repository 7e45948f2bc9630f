"""The on-disk format of prepared token data (`elm data prepare` writes it, the loader reads it).

DATA_DIR/
  index.json          {"format": FORMAT, "dtype": "uint16"|"uint32", "vocab_size", "eos_id",
                       "splits": {"train": [{"file", "tokens"}, ...], "valid": [...]},
                       "stats": {...}}
  tokenizer.model     the SentencePiece model the tokens come from (plus its configs)
  train-00000.bin     raw little-endian token ids: documents joined, each followed by EOS
  valid-00000.bin

Shards are flat token streams; the loader cuts them into windows of seq_len + 1 tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.modeldir import listed_file, read_json, write_json

FORMAT = "elm-tokens-v1"
INDEX_FILE = "index.json"
SPLITS = ("train", "valid")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


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

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits or not self.splits[split]:
            raise ElmError(f"{self.directory / INDEX_FILE}: no {split!r} split")
        return self.splits[split]

    def memmap(self, shard: Shard) -> np.memmap:
        return np.memmap(shard.path, dtype=self.dtype, mode="r", shape=(shard.tokens,))


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
        data = TokenData(root, dtype, int(index["vocab_size"]), int(index["eos_id"]), splits,
                         index.get("stats", {}))
    except (KeyError, TypeError, ValueError) as error:
        raise ElmError(f"{root / INDEX_FILE}: malformed ({error!r})") from None
    for shard_list in splits.values():
        for shard in shard_list:
            expected = shard.tokens * dtype.itemsize
            if not shard.path.is_file() or shard.path.stat().st_size != expected:
                raise ElmError(f"{shard.path}: missing or not {expected} bytes as index.json says")
    return data


def write_index(directory: Path, dtype: np.dtype, vocab_size: int, eos_id: int,
                splits: dict[str, list[Shard]], stats: dict[str, Any]) -> None:
    write_json(directory / INDEX_FILE, {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "splits": {name: [{"file": s.path.name, "tokens": s.tokens} for s in shards]
                   for name, shards in splits.items()},
        "stats": stats,
    })
