"""Batches of preference pairs for `task: dpo`, identical for any number of processes.

Pairs come from elm_spec.preference (JSONL through the chat template, prompts masked, both
twins alike) and are taken in `EpochOrder`. A micro-batch of B pairs is one batch of 2B rows
(elm_spec.preference.preference_batch): the chosen answers first, then the rejected ones, so
the policy and the reference each run one forward per micro-batch (DDP allows one forward per
backward). Rows are right-padded: with causal attention padding changes no position before it,
and the loss mask leaves it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from elm_spec import ElmError
from elm_spec.preference import PreferencePair, preference_batch
from elm_train.data.loader import EpochOrder


class PreferenceLoader:
    """`next(loader)` -> {"input_ids", "labels", "loss_mask"}, each [2 * micro_batch, T]:
    labels[:, t] is the token after input_ids[:, t], loss_mask[:, t] 1.0 where it is an answer
    token."""

    def __init__(self, pairs: Sequence[PreferencePair], max_seq_length: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 source: str = "data"):
        self.pairs = pairs
        self.max_seq_length = max_seq_length
        self.order = EpochOrder(len(pairs), micro_batch_size, rank, world_size, seed, shuffle)
        self.batches_per_epoch = self.order.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ElmError(f"{source}: {len(pairs)} preference pairs; a global batch needs "
                           f"{self.order.global_batch} (micro_batch_size x processes)")

    def __iter__(self) -> PreferenceLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in self.order.next_indices()]
        batch = preference_batch([self.pairs[i] for i in indices], indices, self.max_seq_length)
        return {"input_ids": torch.from_numpy(batch.inputs).long(),
                "labels": torch.from_numpy(batch.targets).long(),
                "loss_mask": torch.from_numpy(batch.weights)}

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)
