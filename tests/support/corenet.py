"""Checkpoints in every format `elm convert` reads, built here from tiny specs."""

from __future__ import annotations

from pathlib import Path

import torch

from elm_spec import ModelSpec
from elm_train.modeldir import init_model


def corenet_state(spec: ModelSpec, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CoreNet-named state dict with ROWS embedding rows (extra rows are CoreNet's padding)."""
    state = init_model(spec, seed=seed).state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    result = {}
    for name, tensor in state.items():
        if name in ("transformer.token_embeddings.weight", "lm_head.weight"):
            padding = torch.randn(rows - spec.vocab_size, spec.model_dim, generator=generator)
            tensor = torch.cat([tensor, padding])
        result["classifier.weight" if name == "lm_head.weight" else name.removeprefix("transformer.")] = tensor
    return result


def save_corenet(spec: ModelSpec, path: Path, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    state = corenet_state(spec, rows, seed)
    torch.save(state, path)
    return state


def corenet_yaml(path: Path, model_name: str, rows: int) -> Path:
    path.write_text(
        "model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n"
        f"      model_name: {model_name}\n      vocab_size: {rows}\n"
        f"      max_context_length: 256\n      padding_index: {rows - 1}\n")
    return path
