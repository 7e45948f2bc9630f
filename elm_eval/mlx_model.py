"""The MLX twin behind `elm eval` and the lm-eval-harness backend (`elm_eval.model`).

Plain and quantized model directories load through `elm_mlx.load_model`, optionally with LoRA
adapters; greedy generation is mlx-lm's `generate_step` with its KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generate_step

from elm_eval.model import EvalModel, Window
from elm_mlx.loading import load_adapters, load_model, mlx_dtype
from elm_spec.tokenizer import Tokenizer


class MLXEvalModel(EvalModel):
    backend = "mlx"

    def __init__(self, model_dir: Path, tokenizer: Tokenizer, max_length: int, batch_size: int,
                 adapter_path: str | os.PathLike[str] | None = None, dtype: str | None = None,
                 device: str | None = None):
        super().__init__(model_dir, tokenizer, max_length, batch_size)
        if device is not None:
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.model = load_model(model_dir)
        if adapter_path is not None:
            load_adapters(self.model, adapter_path)
        if dtype is not None:
            target = mlx_dtype(dtype)
            # Only floating tensors change; quantized weights keep their packed integers.
            self.model.update(tree_map(
                lambda a: a.astype(target) if mx.issubdtype(a.dtype, mx.floating) else a,
                self.model.parameters()))
        self.model.eval()

    def score_windows(self, windows: Sequence[Window]) -> list[tuple[float, bool]]:
        width = max(len(tokens) for tokens, _ in windows) - 1
        rows = [tokens[:-1] + [0] * (width - len(tokens) + 1) for tokens, _ in windows]
        logits = self.model(mx.array(rows))
        totals, greedy = [], []
        for row, (tokens, start) in enumerate(windows):
            scored = logits[row, start - 1: len(tokens) - 1].astype(mx.float32)
            logprobs = scored - mx.logsumexp(scored, axis=-1, keepdims=True)
            targets = mx.array(tokens[start:])
            totals.append(mx.take_along_axis(logprobs, targets[:, None], axis=-1).sum())
            greedy.append(mx.all(mx.argmax(scored, axis=-1) == targets))
        totals, greedy = mx.stack(totals), mx.stack(greedy)
        mx.eval(totals, greedy)
        return list(zip(totals.tolist(), greedy.tolist(), strict=True))

    def greedy_tokens(self, prompt: list[int], max_tokens: int) -> Iterator[int]:
        for token, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_tokens):
            yield int(token)
