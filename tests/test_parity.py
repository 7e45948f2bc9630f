"""The PyTorch and MLX twins, and mlx-lm's own `openelm` model, agree on many OpenELM shapes."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from elm_mlx import load_model as load_mlx_model
from elm_spec import ModelSpec
from elm_train import load_model as load_torch_model

TOLERANCE = 1e-4
CONTINUATION = 32

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# name -> spec; together they cover layer-wise and uniform layers, GQA groups 1, 2 and 4,
# qk-norm on and off, tied and untied heads, with and without GLU, and odd widths.
VARIANTS: dict[str, ModelSpec] = {
    "tiny-layerwise-gqa2": ModelSpec.from_preset("elm-tiny"),
    "uniform-mha-untied-noqknorm": ModelSpec(
        num_transformer_layers=3, model_dim=64, head_dim=16, num_gqa_groups=1,
        qkv_multipliers=(1.0,), ffn_multipliers=(2.0,), ffn_dim_divisor=32,
        normalize_qk_projections=False, share_input_output_layers=False, vocab_size=512),
    "layerwise-gqa4-untied": ModelSpec(
        num_transformer_layers=4, model_dim=128, head_dim=16, num_gqa_groups=4,
        qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0), ffn_dim_divisor=64,
        share_input_output_layers=False, vocab_size=512),
    "odd-width-96-head24-div8": ModelSpec(
        num_transformer_layers=3, model_dim=96, head_dim=24, num_gqa_groups=2,
        qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.75, 3.0), ffn_dim_divisor=8,
        vocab_size=512),
    "no-glu-gqa2-noqknorm": ModelSpec(
        num_transformer_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2,
        qkv_multipliers=(0.5, 1.0), ffn_multipliers=(1.0, 4.0), ffn_dim_divisor=32,
        ffn_with_glu=False, normalize_qk_projections=False, vocab_size=512),
    "uniform-gqa4-tied-glu": ModelSpec(
        num_transformer_layers=2, model_dim=128, head_dim=32, num_gqa_groups=4,
        qkv_multipliers=(1.0,), ffn_multipliers=(3.0,), ffn_dim_divisor=64, vocab_size=512),
}


@pytest.fixture(scope="module")
def model_dirs(make_model_dir) -> dict[str, Path]:
    return {name: make_model_dir(spec, seed=index) for index, (name, spec) in enumerate(VARIANTS.items())}


def random_ids(spec: ModelSpec, batch: int, length: int, seed: int = 0) -> np.ndarray:
    # Ids from 3 up: no bos/eos inside the probe.
    return np.random.default_rng(seed).integers(3, spec.vocab_size, size=(batch, length))


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).float().numpy()


def mlx_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def torch_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


def mlx_greedy_recompute(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
    return tokens[len(prompt):]


def mlx_greedy_cached(model, prompt: list[int], steps: int, **options) -> list[int]:
    """Greedy tokens from mlx-lm's generation loop (KV cache, greedy sampler by default)."""
    stepper = generate_step(mx.array(prompt), model, max_tokens=steps, **options)
    return [int(token) for token, _ in stepper]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_twins_agree_on_logits_and_greedy_continuations(model_dirs: dict[str, Path], name: str) -> None:
    spec = VARIANTS[name]
    torch_model = load_torch_model(model_dirs[name])
    mlx_model = load_mlx_model(model_dirs[name])
    ids = random_ids(spec, batch=2, length=40)
    expected = torch_logits(torch_model, ids)
    actual = mlx_logits(mlx_model, ids)
    assert actual.shape == (2, 40, spec.vocab_size)
    assert np.abs(expected).max() > 1.0, "logits too small for the comparison to mean anything"
    assert np.abs(actual - expected).max() < TOLERANCE

    prompt = [spec.bos_token_id, *random_ids(spec, 1, 11, seed=7)[0].tolist()]
    reference = torch_greedy(torch_model, prompt, CONTINUATION)
    assert len(set(reference)) > 1
    assert mlx_greedy_recompute(mlx_model, prompt, CONTINUATION) == reference
    assert mlx_greedy_cached(mlx_model, prompt, CONTINUATION) == reference


def test_chunked_prefill_fills_the_cache_as_one_pass(model_dirs: dict[str, Path]) -> None:
    spec = VARIANTS["layerwise-gqa4-untied"]
    model = load_mlx_model(model_dirs["layerwise-gqa4-untied"])
    prompt = [spec.bos_token_id, *random_ids(spec, 1, 40, seed=4)[0].tolist()]
    whole = mlx_greedy_cached(model, prompt, CONTINUATION)
    assert mlx_greedy_cached(model, prompt, CONTINUATION, prefill_step_size=7) == whole
    assert whole == mlx_greedy_recompute(model, prompt, CONTINUATION)


@pytest.mark.parametrize("name", [n for n, s in VARIANTS.items() if s.ffn_with_glu])
def test_mlx_lm_openelm_model_agrees(model_dirs: dict[str, Path], name: str) -> None:
    """mlx-lm's own `openelm` model (GLU only) loads the directory unchanged and agrees."""
    spec = VARIANTS[name]
    reference_model, config = mlx_lm_load_model(model_dirs[name])
    assert config["model_type"] == "openelm"
    assert type(reference_model).__module__ == "mlx_lm.models.openelm"
    ours = load_mlx_model(model_dirs[name])
    ids = random_ids(spec, batch=2, length=33, seed=3)
    assert np.abs(mlx_logits(reference_model, ids) - mlx_logits(ours, ids)).max() < TOLERANCE
    torch_model = load_torch_model(model_dirs[name])
    assert np.abs(mlx_logits(reference_model, ids) - torch_logits(torch_model, ids)).max() < TOLERANCE
    prompt = [spec.bos_token_id, *random_ids(spec, 1, 9, seed=11)[0].tolist()]
    assert (mlx_greedy_cached(reference_model, prompt, CONTINUATION)
            == mlx_greedy_cached(ours, prompt, CONTINUATION))


def test_long_sequence_logits_agree(make_model_dir) -> None:
    """Several hundred positions: RoPE angles and the causal mask far from the start."""
    spec = ModelSpec.from_preset("elm-tiny").replace(max_context_length=1024)
    directory = make_model_dir(spec, seed=5)
    ids = random_ids(spec, batch=1, length=600, seed=5)
    expected = torch_logits(load_torch_model(directory), ids)
    actual = mlx_logits(load_mlx_model(directory), ids)
    assert np.abs(actual - expected).max() < TOLERANCE


def test_long_prompt_greedy_with_cache_matches_torch(make_model_dir) -> None:
    spec = VARIANTS["layerwise-gqa4-untied"]
    directory = make_model_dir(spec, seed=9)
    prompt = [spec.bos_token_id, *random_ids(spec, 1, 300, seed=9)[0].tolist()]
    reference = torch_greedy(load_torch_model(directory), prompt, CONTINUATION)
    assert mlx_greedy_cached(load_mlx_model(directory), prompt, CONTINUATION) == reference


@pytest.mark.parametrize("name", ["tiny-layerwise-gqa2", "odd-width-96-head24-div8",
                                  "uniform-mha-untied-noqknorm"])
def test_torch_eager_and_sdpa_agree(model_dirs: dict[str, Path], name: str) -> None:
    spec = VARIANTS[name]
    ids = random_ids(spec, batch=2, length=64, seed=2)
    sdpa = torch_logits(load_torch_model(model_dirs[name], attention="sdpa"), ids)
    eager = torch_logits(load_torch_model(model_dirs[name], attention="eager"), ids)
    assert np.abs(sdpa - eager).max() < 1e-5
