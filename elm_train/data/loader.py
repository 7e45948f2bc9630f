"""Batches of token windows from prepared shards, identical for any number of processes.

A split is one token stream (its shards in index order) cut into non-overlapping windows of
seq_len + 1 tokens, taken in the order of `EpochOrder` (shuffled per epoch, the same global
batches for any number of processes, resumable from (epoch, step)).

`DocumentRowLoader` is CoreNet's layout (data prepared with `--layout corenet`,
docs/reference.md section 3): the same order and batches over rows instead of windows, row i
being document chunk i (BOS ... EOS) cut to seq_len + 1 tokens, the rest dropped, and padded
with the data's pad id, which the loss ignores.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch

from elm_spec import ElmError
from elm_train.data.format import INDEX_FILE, TokenData, read_index


class TokenWindowLoader:
    """`next(loader)` -> {"input_ids": [micro_batch, seq_len], "labels": [micro_batch, seq_len]}."""

    layout = "packed"

    def __init__(self, data: TokenData | str | os.PathLike[str], split: str, seq_len: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.data = data if isinstance(data, TokenData) else read_index(data)
        self.split = split
        self.window = seq_len + 1
        shards = self.data.shards(split)
        self.arrays = [self.data.memmap(shard) for shard in shards]
        self.starts = np.cumsum([0] + [shard.tokens for shard in shards])
        self.num_windows = self._count_windows()
        self.order = EpochOrder(self.num_windows, micro_batch_size, rank, world_size, seed, shuffle)
        self.global_batch = self.order.global_batch
        self.batches_per_epoch = self.order.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ElmError(
                f"{self.data.directory / INDEX_FILE}: the {split!r} split has {int(self.starts[-1])} "
                f"tokens, {self._units()}; a global batch needs {self.global_batch}")

    def __iter__(self) -> TokenWindowLoader:
        return self

    def _count_windows(self) -> int:
        return int(self.starts[-1]) // self.window

    def _units(self) -> str:
        return f"{self.num_windows} windows of seq_len+1 = {self.window}"

    def _read_window(self, window: int) -> np.ndarray:
        return self._read(window * self.window, (window + 1) * self.window)

    def _read(self, start: int, end: int) -> np.ndarray:
        """Tokens [START, END) of the split's stream, across shards, checked against the vocabulary."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        shard = first
        while start < end:
            offset = start - int(self.starts[shard])
            take = min(end, int(self.starts[shard + 1])) - start
            pieces.append(self.arrays[shard][offset: offset + take])
            start += take
            shard += 1
        tokens = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if tokens.size and int(tokens.max()) >= self.data.vocab_size:
            raise ElmError(f"{self.data.directory}: the {self.split!r} shards hold token id "
                           f"{int(tokens.max())}, not below the vocab_size {self.data.vocab_size} "
                           f"of {INDEX_FILE} (shards and index do not match)")
        return tokens

    def __next__(self) -> dict[str, torch.Tensor]:
        windows = self.order.next_indices()
        tokens = np.stack([self._read_window(int(w)) for w in windows]).astype(np.int64)
        batch = torch.from_numpy(tokens)
        return {"input_ids": batch[:, :-1], "labels": batch[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        state = self.order.state_dict()
        return state if self.layout == "packed" else {**state, "layout": self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout", "packed") != self.layout:
            raise ElmError(f"data.layout is {self.layout} but the checkpoint was written with "
                           f"{state.get('layout', 'packed')}; resuming would change the data order")
        self.order.load_state_dict(state)


def require_corenet_rows(data: TokenData) -> None:
    if data.layout != "corenet":
        raise ElmError(f"{data.directory / INDEX_FILE}: data.layout corenet needs data prepared "
                       f"with `elm data prepare --layout corenet` (this is {data.layout})")


class DocumentRowLoader(TokenWindowLoader):
    """CoreNet's rows: one document chunk per row, cut to seq_len + 1 tokens, padded with pad_id."""

    layout = "corenet"

    def _count_windows(self) -> int:
        require_corenet_rows(self.data)
        self.pad_id = int(self.data.pad_id)
        self.ends = self.data.row_ends(self.split)
        return int(self.ends.size)

    def _units(self) -> str:
        return f"{self.num_windows} rows"

    def _read_window(self, window: int) -> np.ndarray:
        start = int(self.ends[window - 1]) if window else 0
        tokens = self._read(start, min(int(self.ends[window]), start + self.window))
        if tokens.size == self.window:
            return tokens
        padding = np.full(self.window - tokens.size, self.pad_id, dtype=np.int64)
        return np.concatenate([tokens.astype(np.int64), padding])


class EpochOrder:
    """Which items each rank takes: each epoch orders ITEMS with a permutation seeded by
    (seed, epoch); global batch k is order[k*G : (k+1)*G] with G = micro_batch_size *
    world_size, and rank r takes its micro_batch_size slice. (epoch, step) is the whole state,
    so a loader built on it resumes exactly, on any number of processes."""

    def __init__(self, items: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        self.items = items
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * world_size
        self.batches_per_epoch = items // self.global_batch
        self.epoch = 0
        self.step = 0
        self._order_epoch = -1
        self._order = np.arange(items)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.items)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """This rank's items of the next batch; the position moves on by one global batch."""
        begin = self.step * self.global_batch + self.rank * self.micro_batch_size
        indices = self._epoch_order()[begin: begin + self.micro_batch_size]
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch += 1
            self.step = 0
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ElmError(f"data.seed is {self.seed} but the checkpoint was written with seed "
                           f"{state['seed']}; resuming would change the data order")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class SyntheticTokenLoader:
    """Uniform random tokens (for benchmarks). Row j of batch k is a pure function of
    (seed, k, j) and rank r holds rows r*B ... (r+1)*B - 1 of each batch (B: the micro-batch),
    so N processes of B rows see the batches one process of N*B rows sees."""

    batches_per_epoch = sys.maxsize  # endless: no batch repeats

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, rank: int = 0,
                 seed: int = 0):
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.seed = seed
        self.step = 0

    def __iter__(self) -> SyntheticTokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.rank * self.micro_batch_size
        tokens = torch.stack([self._row(first + row) for row in range(self.micro_batch_size)])
        self.step += 1
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def _row(self, row: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash((self.seed, self.step, row)) & 0x7FFFFFFF)
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
