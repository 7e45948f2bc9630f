"""Fine-tuning data: JSONL files in three formats, tokenized with loss masks, truncated, packed.

A data directory holds `train.jsonl` (required), `valid.jsonl` and `test.jsonl` (optional).
Each file's format is detected from its rows, as mlx-lm does:

- `{"text": ...}`: the whole text is trained on (bos + text + eos).
- `{"prompt": ..., "completion": ...}`: a user turn and an assistant turn of the chat template.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation through the chat template.

Every example becomes tokens plus a per-token loss mask, so that only completion or assistant
tokens are trained on when prompts are masked; chat rows are tokenized as
elm_spec.chat_encoding does for both twins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.chat_encoding import Message, check_messages, conversation_pieces
from elm_spec.jsonl import read_jsonl_objects, split_files

FORMATS = ("text", "completions", "chat")


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[bool]  # loss_mask[t]: token t is a training target


@dataclass
class SplitData:
    """One tokenized JSONL file and what happened to its rows."""

    path: Path
    format: str
    examples: list[Example]
    rows: int
    truncated: int = 0
    dropped: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)

    def summary(self) -> str:
        parts = [f"{self.path.name}: {self.rows} {self.format} rows, {self.num_tokens} tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-seq-length")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (nothing to train on within --max-seq-length)")
        return ", ".join(parts)


def row_format(row: dict[str, Any]) -> str | None:
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


@dataclass
class Encoder:
    """Turns rows into Examples with a tokenizer (mlx-lm's TokenizerWrapper or HF tokenizer);
    also the elm_spec.chat_encoding.ChatCodec of that tokenizer."""

    tokenizer: Any
    chat_template: str | None
    mask_prompt: bool = True
    _bos: int = field(init=False)
    _eos: int = field(init=False)

    def __post_init__(self) -> None:
        self._bos = self.tokenizer.bos_token_id
        self._eos = self.tokenizer.eos_token_id

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, row: dict[str, Any], where: str) -> Example:
        text = _string(row, "text", where)
        tokens = [self._bos, *self.encode(text), self._eos]
        return Example(tokens, [True] * len(tokens))

    def completion(self, row: dict[str, Any], where: str) -> Example:
        prompt = _string(row, "prompt", where)
        completion = _string(row, "completion", where)
        if not completion.strip():
            raise ElmError(f"{where}: empty completion")
        if self.chat_template is None:
            # No template at all: bos + prompt, then completion + eos.
            head = [self._bos, *self.encode(prompt)]
            tail = [*self.encode(completion), self._eos]
            return Example(head + tail, [not self.mask_prompt] * len(head) + [True] * len(tail))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return self._conversation(messages, where)

    def chat(self, row: dict[str, Any], where: str) -> Example:
        messages = check_messages(row.get("messages"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ElmError(f"{where}: no assistant message to train on")
        if self.chat_template is None:
            raise ElmError(f"{where}: chat rows need a chat template; the tokenizer has none "
                           "and --chat-template none disabled the shipped one")
        return self._conversation(messages, where)

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=generation_prompt)

    def _conversation(self, messages: list[Message], where: str) -> Example:
        tokens: list[int] = []
        loss_mask: list[bool] = []
        for head, tail in conversation_pieces(self, messages, where):
            tokens += head + tail
            loss_mask += [not self.mask_prompt] * len(head) + [True] * len(tail)
        return Example(tokens, loss_mask)


def _string(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ElmError(f"{where}: \"{key}\" must be a string")
    return value


def load_split(path: Path, encoder: Encoder, max_seq_length: int) -> SplitData:
    """Read and tokenize one JSONL file; rows over `max_seq_length` tokens are truncated, and
    dropped when no training target is left within the limit."""
    rows = read_jsonl_objects(path)
    first_line, first = rows[0]
    fmt = row_format(first)
    if fmt is None:
        raise ElmError(f"{path}:{first_line}: unknown row format (keys {sorted(first)}); expected "
                       "\"text\", \"prompt\"+\"completion\" or \"messages\"")
    encode = {"text": encoder.text, "completions": encoder.completion, "chat": encoder.chat}[fmt]
    split = SplitData(path, fmt, [], len(rows))
    for number, row in rows:
        where = f"{path}:{number}"
        if row_format(row) != fmt:
            raise ElmError(f"{where}: row format differs from line {first_line} ({fmt})")
        example = encode(row, where)
        if len(example.tokens) > max_seq_length:
            example = Example(example.tokens[:max_seq_length], example.loss_mask[:max_seq_length])
            if not any(example.loss_mask[1:]):
                split.dropped += 1
                continue
            split.truncated += 1
        split.examples.append(example)
    if not split.examples:
        raise ElmError(f"{path}: all {split.rows} rows are longer than --max-seq-length "
                       f"{max_seq_length} before any training target")
    return split


def load_data_dir(data_dir: str | Path, encoder: Encoder, max_seq_length: int,
                  ) -> dict[str, SplitData]:
    """The splits present in DATA_DIR; train.jsonl is required."""
    return {split: load_split(path, encoder, max_seq_length)
            for split, path in split_files(data_dir).items()}


# ----- rows and batches ------------------------------------------------------------------

@dataclass
class Row:
    """One sequence of the batch: one example, or several packed back to back."""

    tokens: list[int]
    loss_mask: list[bool]
    segments: list[int]  # 1, 2, ... per packed document


def single_rows(examples: list[Example]) -> list[Row]:
    return [Row(e.tokens, e.loss_mask, [1] * len(e.tokens)) for e in examples]


def packed_rows(examples: list[Example], max_seq_length: int, seed: int) -> list[Row]:
    """Pack examples (in a seeded random order) greedily into rows of at most max_seq_length."""
    order = np.random.RandomState(seed).permutation(len(examples))
    rows: list[Row] = []
    current = Row([], [], [])
    for index in order:
        example = examples[index]
        if current.tokens and len(current.tokens) + len(example.tokens) > max_seq_length:
            rows.append(current)
            current = Row([], [], [])
        segment = (current.segments[-1] + 1) if current.segments else 1
        current.tokens += example.tokens
        current.loss_mask += example.loss_mask
        current.segments += [segment] * len(example.tokens)
    if current.tokens:
        rows.append(current)
    return rows


@dataclass
class Batch:
    """Model inputs and targets; `segments` is None when every row holds a single example."""

    inputs: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32
    weights: np.ndarray  # [B, T] float32: 1 where targets[b, t] is trained on
    segments: np.ndarray | None  # [B, T] int32, 0 for padding

    @property
    def num_target_tokens(self) -> int:
        return int(self.weights.sum())


PAD_MULTIPLE = 32


def make_batch(rows: list[Row], max_seq_length: int, packed: bool) -> Batch:
    longest = max(len(r.tokens) for r in rows)
    # Pad to a multiple of 32 (plus the shifted target), as mlx-lm does, to bound recompiles.
    length = min(1 + PAD_MULTIPLE * -(-longest // PAD_MULTIPLE), max_seq_length)
    tokens = np.zeros((len(rows), length), np.int32)
    loss_mask = np.zeros((len(rows), length), bool)
    segments = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens[i, :n] = row.tokens
        loss_mask[i, :n] = row.loss_mask
        segments[i, :n] = row.segments
    # A target counts when it is marked and belongs to the same document as its input.
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    weights = (loss_mask[:, 1:] & same_document).astype(np.float32)
    return Batch(tokens[:, :-1], tokens[:, 1:], weights, segments[:, :-1] if packed else None)


def batch_plan(rows: list[Row], batch_size: int, sort_by_length: bool,
               keep_remainder: bool) -> list[list[int]]:
    """Row indices of each batch; a remainder smaller than batch_size is kept only if asked."""
    order = list(range(len(rows)))
    if sort_by_length:
        order.sort(key=lambda i: len(rows[i].tokens))
    end = len(order) if keep_remainder else len(order) - batch_size + 1
    return [order[i: i + batch_size] for i in range(0, end, batch_size)]


@dataclass
class BatchStream:
    """Batches of one split in an order that is a pure function of (seed, step), so a resumed
    run continues at the same data position from the step number alone."""

    rows: list[Row]
    plan: list[list[int]]
    max_seq_length: int
    packed: bool
    seed: int

    def batch(self, index: int) -> Batch:
        return make_batch([self.rows[i] for i in self.plan[index]], self.max_seq_length, self.packed)

    def training_batch(self, step: int) -> Batch:
        """The batch of 0-based training step STEP: epochs of the batches in seeded orders."""
        epoch, position = divmod(step, len(self.plan))
        order = np.random.RandomState((self.seed, epoch)).permutation(len(self.plan))
        return self.batch(int(order[position]))

    def __len__(self) -> int:
        return len(self.plan)


def batch_stream(split: SplitData, batch_size: int, max_seq_length: int, pack: bool, seed: int,
                 training: bool) -> BatchStream:
    rows = packed_rows(split.examples, max_seq_length, seed) if pack else single_rows(split.examples)
    if training and len(rows) < batch_size:
        what = "packed rows" if pack else "examples"
        raise ElmError(f"{split.path}: {len(rows)} {what}, fewer than --batch-size {batch_size}")
    plan = batch_plan(rows, batch_size, sort_by_length=not pack, keep_remainder=not training)
    return BatchStream(rows, plan, max_seq_length, pack, seed)
