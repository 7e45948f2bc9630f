"""The small protocol each twin implements for evaluation, and the backend-neutral work above it
(the twins' implementations: elm_eval.torch_model and elm_eval.mlx_model).

A twin supplies two primitives on token ids: `score_windows` (one batched forward pass that
sums the log-probabilities of chosen tokens and says whether each was the greedy choice) and
`greedy_tokens` (greedy decoding). `EvalModel` builds lm-eval's three request types on them:
`loglikelihood` of continuations given contexts, `loglikelihood_rolling` over long texts with a
sliding window, and `generate_until` with stop strings. Tokenization is the model directory's
SentencePiece model on both backends, so torch and MLX see the very same ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from elm_spec import ElmError
from elm_spec.tokenizer import Tokenizer

# A window is a token sequence and the index of its first scored token: tokens[start:] are
# each scored given every token before them (start >= 1).
Window = tuple[list[int], int]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class RollingScore:
    """Log-likelihood of a whole text, scored token by token."""

    logprob: float
    tokens: int


class EvalModel(ABC):
    """A loaded model that scores and generates token ids; see the module docstring."""

    backend: str

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, max_length: int, batch_size: int):
        if max_length < 2:
            raise ElmError(f"context length {max_length} is too short (at least 2 tokens)")
        if batch_size < 1:
            raise ElmError(f"batch size {batch_size} must be at least 1")
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    # ----- what a twin implements ---------------------------------------------------------
    @abstractmethod
    def score_windows(self, windows: Sequence[Window]) -> list[tuple[float, bool]]:
        """For each window, the summed log-probability of tokens[start:] and whether every one
        of them is the model's argmax. One forward pass over the (right-padded) batch."""

    @abstractmethod
    def greedy_tokens(self, prompt: list[int], max_tokens: int) -> Iterator[int]:
        """Up to MAX_TOKENS greedily decoded tokens following PROMPT, yielded one at a time."""

    # ----- lm-eval's request types --------------------------------------------------------
    def score_all(self, windows: Sequence[Window], progress: Progress | None = None
                  ) -> list[tuple[float, bool]]:
        """Score windows in batches of similar length (longest first); results in input order."""
        for tokens, start in windows:
            if not 1 <= start < len(tokens) or len(tokens) > self.max_length + 1:
                raise ValueError(f"bad window: {len(tokens)} tokens scored from {start}")
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin: begin + self.batch_size]
            for index, result in zip(chunk, self.score_windows([windows[i] for i in chunk]),
                                     strict=True):
                results[index] = result
            if progress is not None:
                progress(len(chunk))
        return results

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]],
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for (context ids, continuation ids) pairs.

        As lm-eval's causal models do, the joined sequence keeps its last max_length + 1 tokens.
        """
        windows = []
        for context, continuation in requests:
            if not continuation:
                raise ValueError("empty continuation")
            if not context:
                raise ValueError("empty context (lm-eval conditions on a prefix token)")
            tokens = (context + continuation)[-(self.max_length + 1):]
            windows.append((tokens, max(1, len(tokens) - len(continuation))))
        return self.score_all(windows, progress)

    def loglikelihood_rolling(self, texts: Sequence[list[int]], prefix_token: int,
                              stride: int | None = None, progress: Progress | None = None
                              ) -> list[RollingScore]:
        """Log-likelihood of every token of each text, the first conditioned on PREFIX_TOKEN.

        Texts longer than the context are scored in windows of max_length tokens; after the
        first, each window scores STRIDE new tokens (default max_length: disjoint windows, as
        lm-eval's loglikelihood_rolling) with the tokens before them as context.
        """
        windows: list[Window] = []
        owners: list[int] = []
        for number, tokens in enumerate(texts):
            for window in rolling_windows(tokens, prefix_token, self.max_length,
                                          stride or self.max_length):
                windows.append(window)
                owners.append(number)
        scores = self.score_all(windows, progress)
        totals = [0.0] * len(texts)
        counts = [0] * len(texts)
        for owner, (tokens, start), (logprob, _) in zip(owners, windows, scores, strict=True):
            totals[owner] += logprob
            counts[owner] += len(tokens) - start
        return [RollingScore(total, count) for total, count in zip(totals, counts, strict=True)]

    def generate_until(self, prompt: list[int], stop: Sequence[str], max_tokens: int) -> str:
        """Greedy continuation of PROMPT, cut before the first stop string (end of sequence
        also stops). The prompt keeps its last max_length - max_tokens tokens."""
        if max_tokens < 1:
            return ""
        keep = max(1, self.max_length - max_tokens)
        prompt = prompt[-keep:]
        generated: list[int] = []
        text = ""
        for token in self.greedy_tokens(prompt, max_tokens):
            if token == self.tokenizer.eos_id:
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            cut = first_stop(text, stop)
            if cut is not None:
                return text[:cut]
        return text


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest stop string in TEXT, if any."""
    positions = [text.find(s) for s in stop if s]
    positions = [p for p in positions if p >= 0]
    return min(positions) if positions else None


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int, stride: int
                    ) -> Iterator[Window]:
    """Windows covering every token of TOKENS once, each at most max_length tokens of input.

    Same windows as lm-eval's `get_rolling_token_windows(tokens, prefix_token, max_length,
    context_len=max_length - stride + 1)` followed by `make_disjoint_window`.
    """
    if not 1 <= stride <= max_length:
        raise ElmError(f"stride {stride} must be between 1 and the context length {max_length}")
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_token, *tokens[:first]], 1
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, stride)
        end = predicted + count
        window = tokens[max(0, end - max_length - 1): end]
        yield window, len(window) - count
        predicted = end


def window_count(num_tokens: int, max_length: int, stride: int) -> int:
    """How many windows `rolling_windows` makes for a text of NUM_TOKENS tokens."""
    if num_tokens == 0:
        return 0
    return 1 + max(0, -(-(num_tokens - max_length) // stride))
