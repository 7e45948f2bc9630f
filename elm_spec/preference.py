"""Preference data for DPO and ORPO, shared by both twins: JSONL pairs to token ids and batches.

Each row holds a prompt and two answers to it, the preferred one and the other:

- `prompt`: a string (one user turn), or a list of chat messages (`messages` is accepted for
  it too);
- `chosen` and `rejected`: each a string, an assistant message `{"role": "assistant",
  "content": ...}`, or a list of messages ending with the assistant's answer whose earlier
  messages are the prompt (UltraFeedback's layout; `prompt` may then be left out).

Prompt and answers are tokenized through the chat template exactly as SFT chat rows are
(elm_spec.chat_encoding), so the prompt is what generation feeds the model and each answer
ends with the template's end of turn; without a template (`--chat-template none` and none in
the tokenizer) a string prompt becomes bos + prompt and an answer answer + eos. Only answer
tokens are scored (the prompt is masked). A pair longer than the sequence limit loses
tokens from the start of its prompt (after its first token, bos); a pair whose answer alone
does not fit is dropped. Both are counted in the split's summary line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec.chat_encoding import ChatCodec, Message, check_messages, conversation_pieces
from elm_spec.errors import ElmError
from elm_spec.jsonl import read_jsonl_objects, split_files

ANSWERS = ("chosen", "rejected")
PAD_MULTIPLE = 32  # batches are padded as SFT's are, to bound recompiles


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PreferenceSplit:
    """One tokenized JSONL file of pairs and what happened to its rows."""

    path: Path
    pairs: list[PreferencePair]
    rows: int
    truncated: int = 0
    dropped: int = 0
    ties: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in self.pairs)

    def summary(self) -> str:
        parts = [f"{self.path.name}: {self.rows} preference pairs, {self.num_tokens} tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated from the prompt side to --max-seq-length")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (an answer alone is longer than "
                         "--max-seq-length)")
        if self.ties:
            parts.append(f"{self.ties} skipped (chosen and rejected are the same)")
        return ", ".join(parts)


# ----- rows to token ids --------------------------------------------------------------------

def _prompt(row: dict[str, Any], where: str) -> tuple[str, str | list[Message] | None]:
    for key in ("prompt", "messages"):
        if key in row:
            value = row[key]
            if isinstance(value, str):
                return key, value
            messages = check_messages(value, where, key)
            if messages[-1]["role"] == "assistant":
                raise ElmError(f"{where}: \"{key}\" ends with an assistant message; the answers "
                               "belong in \"chosen\" and \"rejected\"")
            return key, messages
    return "prompt", None


def _answer(row: dict[str, Any], key: str, where: str) -> tuple[list[Message] | None, str]:
    """(the messages before the answer, if the row gives them; the answer's text)."""
    if key not in row:
        raise ElmError(f"{where}: missing \"{key}\" (a string or an assistant message)")
    value = row[key]
    context: list[Message] | None = None
    if isinstance(value, dict):
        value = check_messages([value], where, key)[0]
    elif isinstance(value, list):
        messages = check_messages(value, where, key)
        context, value = messages[:-1] or None, messages[-1]
    if isinstance(value, dict):
        if value["role"] != "assistant":
            raise ElmError(f"{where}: \"{key}\" must end with an assistant message")
        value = value["content"]
    if not isinstance(value, str):
        raise ElmError(f"{where}: \"{key}\" must be a string, an assistant message or a list "
                       "of messages")
    if not value.strip():
        raise ElmError(f"{where}: \"{key}\" is empty")
    return context, value


def _as_messages(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_pair(codec: ChatCodec, row: dict[str, Any], where: str) -> PreferencePair:
    """Token ids of one row's prompt and answers (see the module docstring for the layout)."""
    key, prompt = _prompt(row, where)
    answers = {}
    for answer in ANSWERS:
        context, text = _answer(row, answer, where)
        if context is not None:
            if prompt is None:
                prompt = context
            elif context != _as_messages(prompt):
                raise ElmError(f"{where}: the messages before the answer in \"{answer}\" differ "
                               f"from \"{key}\"")
        answers[answer] = text
    if prompt is None:
        raise ElmError(f"{where}: missing \"prompt\" (a string or a list of messages)")
    if codec.chat_template is None:
        if not isinstance(prompt, str):
            raise ElmError(f"{where}: chat prompts need a chat template; the tokenizer has none "
                           "and --chat-template none disabled the shipped one")
        head = [codec.bos_id, *codec.encode(prompt)]
        return PreferencePair(head, *([*codec.encode(answers[a]), codec.eos_id] for a in ANSWERS))
    tokens = {}
    for answer in ANSWERS:
        messages = [*_as_messages(prompt), {"role": "assistant", "content": answers[answer]}]
        pieces = conversation_pieces(codec, messages, where)
        head = [t for piece in pieces[:-1] for t in piece[0] + piece[1]] + pieces[-1][0]
        tokens[answer] = (head, pieces[-1][1])
    return PreferencePair(tokens["chosen"][0], tokens["chosen"][1], tokens["rejected"][1])


def fit_pair(pair: PreferencePair, max_seq_length: int) -> PreferencePair | None:
    """PAIR within MAX_SEQ_LENGTH tokens per sequence, cutting the prompt after its first
    token; None when an answer alone leaves no room for that token."""
    if len(pair) <= max_seq_length:
        return pair
    keep = max_seq_length - max(len(pair.chosen), len(pair.rejected))
    if keep < 1:
        return None
    prompt = pair.prompt[:1] + pair.prompt[len(pair.prompt) - (keep - 1):]
    return PreferencePair(prompt, pair.chosen, pair.rejected)


def load_preference_split(path: str | os.PathLike[str], codec: ChatCodec, max_seq_length: int
                          ) -> PreferenceSplit:
    path = Path(path)
    rows = read_jsonl_objects(path)
    split = PreferenceSplit(path, [], len(rows))
    for number, row in rows:
        pair = encode_pair(codec, row, f"{path}:{number}")
        if pair.chosen == pair.rejected:
            split.ties += 1
            continue
        fitted = fit_pair(pair, max_seq_length)
        if fitted is None:
            split.dropped += 1
            continue
        split.truncated += fitted is not pair
        split.pairs.append(fitted)
    if not split.pairs:
        raise ElmError(f"{path}: none of its {split.rows} pairs fits --max-seq-length "
                       f"{max_seq_length} with distinct answers")
    return split


def load_preference_dir(data_dir: str | os.PathLike[str], codec: ChatCodec, max_seq_length: int
                        ) -> dict[str, PreferenceSplit]:
    """The splits present in DATA_DIR; train.jsonl is required."""
    return {split: load_preference_split(path, codec, max_seq_length)
            for split, path in split_files(data_dir).items()}


# ----- batches ------------------------------------------------------------------------------

@dataclass
class PreferenceBatch:
    """Both answers of each pair as rows: chosen answers in rows [0, B), rejected in [B, 2B).

    The log-probability of a row's answer is the sum over t of weights[r, t] * log p(targets[r,
    t] | inputs[r, :t + 1]); `indices` are the pairs' positions in their split."""

    inputs: np.ndarray  # [2B, T] int32
    targets: np.ndarray  # [2B, T] int32
    weights: np.ndarray  # [2B, T] float32: 1 where targets[r, t] is an answer token
    indices: np.ndarray  # [B] int64
    lengths: np.ndarray  # [2B] int64: tokens of each row before padding

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        """Tokens the model reads: prompt and answer of both rows of every pair."""
        return int(self.lengths.sum())


def preference_batch(pairs: list[PreferencePair], indices: list[int], max_seq_length: int
                     ) -> PreferenceBatch:
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    longest = max(len(prompt) + len(answer) for prompt, answer in rows)
    length = min(1 + PAD_MULTIPLE * -(-longest // PAD_MULTIPLE), max_seq_length)
    tokens = np.zeros((len(rows), length), np.int32)
    scored = np.zeros((len(rows), length), bool)
    lengths = np.zeros(len(rows), np.int64)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        tokens[r, :n] = prompt + answer
        scored[r, len(prompt):n] = True
        lengths[r] = n
    return PreferenceBatch(tokens[:, :-1], tokens[:, 1:], scored[:, 1:].astype(np.float32),
                           np.asarray(indices, np.int64), lengths)


@dataclass
class PreferenceStream:
    """Batches of one split in an order that is a pure function of (seed, step), as SFT's
    BatchStream: pairs of similar length batched together, the batches shuffled per epoch."""

    pairs: list[PreferencePair]
    plan: list[list[int]]
    max_seq_length: int
    seed: int

    def batch(self, index: int) -> PreferenceBatch:
        indices = self.plan[index]
        return preference_batch([self.pairs[i] for i in indices], indices, self.max_seq_length)

    def training_batch(self, step: int) -> PreferenceBatch:
        """The batch of 0-based training step STEP."""
        epoch, position = divmod(step, len(self.plan))
        order = np.random.RandomState((self.seed, epoch)).permutation(len(self.plan))
        return self.batch(int(order[position]))

    def __len__(self) -> int:
        return len(self.plan)


def preference_stream(split: PreferenceSplit, batch_size: int, max_seq_length: int, seed: int,
                      training: bool) -> PreferenceStream:
    """A training stream drops a remainder smaller than BATCH_SIZE; an evaluation one keeps it."""
    if training and len(split.pairs) < batch_size:
        raise ElmError(f"{split.path}: {len(split.pairs)} pairs, fewer than --batch-size "
                       f"{batch_size}")
    order = sorted(range(len(split.pairs)), key=lambda i: len(split.pairs[i]))
    end = len(order) - batch_size + 1 if training else len(order)
    plan = [order[i: i + batch_size] for i in range(0, end, batch_size)]
    return PreferenceStream(split.pairs, plan, max_seq_length, seed)
