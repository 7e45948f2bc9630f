"""The PyTorch twin behind `elm eval` and the lm-eval-harness backend (`elm_eval.model`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from elm_eval.model import EvalModel, Window
from elm_spec.tokenizer import Tokenizer
from elm_train.modeldir import load_model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchEvalModel(EvalModel):
    backend = "torch"

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, max_length: int, batch_size: int,
                 dtype: str | None = None, device: str | None = None):
        super().__init__(model_dir, tokenizer, max_length, batch_size)
        self.device = torch.device(device or default_device())
        self.model = load_model(model_dir, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def score_windows(self, windows: Sequence[Window]) -> list[tuple[float, bool]]:
        # Right padding: with causal attention, padding never changes the scored positions.
        width = max(len(tokens) for tokens, _ in windows) - 1
        inputs = torch.zeros(len(windows), width, dtype=torch.long)
        for row, (tokens, _) in enumerate(windows):
            inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        logits = self.model(inputs.to(self.device))
        totals, greedy = [], []
        for row, (tokens, start) in enumerate(windows):
            scored = logits[row, start - 1: len(tokens) - 1].float()
            logprobs = torch.log_softmax(scored, dim=-1)
            targets = torch.tensor(tokens[start:], device=self.device)
            totals.append(logprobs.gather(-1, targets[:, None]).sum())
            greedy.append((scored.argmax(dim=-1) == targets).all())
        # One device-to-host copy for the whole batch.
        return list(zip(torch.stack(totals).tolist(), torch.stack(greedy).tolist(), strict=True))

    @torch.inference_mode()
    def greedy_tokens(self, prompt: list[int], max_tokens: int) -> Iterator[int]:
        # The PyTorch twin has no KV cache: each step re-reads the (at most max_length) window.
        ids = list(prompt)
        for _ in range(max_tokens):
            window = torch.tensor([ids[-self.max_length:]], device=self.device)
            token = int(self.model(window)[0, -1].argmax())
            ids.append(token)
            yield token
