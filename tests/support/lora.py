"""Shared pieces of the fine-tuning tests: data sets, quantized model dirs, greedy decoding."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

UPPER_TO_LOWER_LETTERS = "abcdhimnopstw"  # letters whose " x" is one piece of the test tokenizer


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def case_rows(letters: str = UPPER_TO_LOWER_LETTERS[:8], held_out: int = 40, seed: int = 0
              ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A task a random model cannot do: "A B C" -> "a b c". Returns (train, held-out) rows."""
    combos = list(itertools.product(letters, repeat=3))
    random.Random(seed).shuffle(combos)
    rows = [{"prompt": " ".join(c.upper() for c in combo), "completion": " ".join(combo)}
            for combo in combos]
    return rows[held_out:], rows[:held_out]


def text_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    words = ["the", "model", "reads", "tokens", "and", "learns", "to", "predict", "what", "comes", "next", "in", "a", "sequence"]
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 30)))}
            for _ in range(count)]


def make_quantized_model_dir(source: Path, destination: Path, group_size: int = 32,
                             bits: int = 4) -> Path:
    """Quantize a model directory the way mlx-lm writes quantized models (`elm convert -q`
    does the same once available)."""
    import mlx.nn as nn

    from elm_mlx.loading import load_model
    from elm_mlx.save import save_mlx_model_dir
    from elm_spec.modeldir import read_config

    model = load_model(source)
    nn.quantize(model, group_size=group_size, bits=bits)
    config = {**read_config(source), "quantization": {"group_size": group_size, "bits": bits}}
    return save_mlx_model_dir(model, config, source, destination)


def greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by full recomputation (independent of any KV cache)."""
    import mlx.core as mx

    tokens: list[int] = []
    for _ in range(max_tokens):
        tokens.append(model(mx.array([prompt + tokens]))[0, -1].argmax().item())
    return tokens
