"""The layer-wise scaling spec against the published OpenELM shapes and an independent recount."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elm_spec import ElmError, ModelSpec, make_divisible
from elm_spec.modeldir import expected_shapes
from elm_spec.presets import PRESETS

OPENELM_270M_QUERY_HEADS = [12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20]
OPENELM_270M_KV_HEADS = [3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5]


def test_openelm_270m_matches_the_published_shape() -> None:
    spec = ModelSpec.from_preset("OpenELM-270M")
    assert spec.num_parameters() == 271_527_168
    assert spec.num_query_heads == OPENELM_270M_QUERY_HEADS
    assert spec.num_kv_heads == OPENELM_270M_KV_HEADS
    assert spec.ffn_dims[0] == 768 and spec.ffn_dims[-1] == 5120


def test_multipliers_follow_numpy_linspace_rounded_to_two_decimals() -> None:
    spec = ModelSpec.from_preset("OpenELM-1_1B")
    expected = [round(float(v), 2) for v in np.linspace(0.5, 4.0, 28)]
    assert spec.layer_ffn_multipliers == expected
    assert spec.ffn_dims == [make_divisible(m * 2048, 256) for m in expected]


@pytest.mark.parametrize(("value", "divisor", "expected"), [
    (640.0, 256, 768),   # nearest multiple: int(640 + 128) // 256 * 256
    (1000.0, 256, 1024),
    (600.0, 256, 768),   # nearest is 512 < 0.9 * 600, so one divisor is added
    (300.0, 256, 512),   # 256 < 0.9 * 300
    (10.0, 64, 64),      # never below the divisor
])
def test_make_divisible(value: float, divisor: int, expected: int) -> None:
    assert make_divisible(value, divisor) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_equals_the_pytorch_twin(name: str) -> None:
    from elm_train.model import OpenELM

    spec = ModelSpec.from_preset(name)
    with torch.device("meta"):
        model = OpenELM(spec)
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(spec)


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    from elm_train.model import OpenELM

    spec = ModelSpec.from_preset("OpenELM-270M")
    embedding = spec.vocab_size * spec.model_dim
    with torch.device("meta"):
        model = OpenELM(spec)
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # linears and embedding
    assert spec.num_matmul_parameters() == matmul
    assert spec.num_parameters() - matmul == spec.num_transformer_layers * (2 * 1280 + 2 * 64) + 1280
    attention = 12 * sum(OPENELM_270M_QUERY_HEADS) * 64 * 2048
    assert spec.flops_per_token(2048) == 6 * spec.num_matmul_parameters() + attention
    assert spec.num_matmul_parameters() > embedding  # the tied head is counted once


def test_uniform_spec_has_identical_layers() -> None:
    spec = ModelSpec(num_transformer_layers=5, model_dim=256, head_dim=32, num_gqa_groups=2,
                     qkv_multipliers=1.0, ffn_multipliers=2.0, ffn_dim_divisor=64)
    assert spec.num_query_heads == [8] * 5 and spec.num_kv_heads == [4] * 5
    assert spec.ffn_dims == [512] * 5
    assert not spec.is_layerwise


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip_is_lossless(name: str) -> None:
    spec = ModelSpec.from_preset(name)
    config = json.loads(json.dumps(spec.to_config()))
    again = ModelSpec.from_config(config)
    assert again.to_config() == config
    assert again.num_query_heads == spec.num_query_heads and again.ffn_dims == spec.ffn_dims
    assert config["ffn_multipliers"] == spec.layer_ffn_multipliers  # expanded, as mlx-lm reads it
    assert len(config["num_query_heads"]) == spec.num_transformer_layers


def test_explicit_per_layer_heads_survive_the_round_trip() -> None:
    config = ModelSpec.from_preset("elm-tiny").to_config()
    config["num_query_heads"] = [2, 2, 6, 8]
    config["num_kv_heads"] = [1, 1, 3, 4]
    spec = ModelSpec.from_config(config)
    assert spec.num_query_heads == [2, 2, 6, 8] and spec.num_kv_heads == [1, 1, 3, 4]
    assert spec.to_config() == config


@pytest.mark.parametrize(("changes", "key"), [
    ({"query_heads_override": (2, 2, 3, 4)}, "num_query_heads"),
    ({"head_dim": 24}, "head_dim"),
    ({"num_transformer_layers": 0}, "num_transformer_layers"),
    ({"qkv_multipliers": (0.5, 0.7, 0.9)}, "qkv_multipliers"),
])
def test_invalid_specs_name_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ElmError, match=key):
        ModelSpec.from_preset("elm-tiny").replace(**changes)


def test_unknown_config_key_is_named() -> None:
    config = ModelSpec.from_preset("elm-tiny").to_config()
    config["num_transformer_layer"] = 4
    with pytest.raises(ElmError, match="num_transformer_layer'"):
        ModelSpec.from_config(config)


def test_unknown_model_type_is_refused() -> None:
    config = ModelSpec.from_preset("elm-tiny").to_config()
    config["model_type"] = "llama"
    with pytest.raises(ElmError, match="model_type 'llama'"):
        ModelSpec.from_config(config)


def test_inconsistent_kv_heads_are_refused() -> None:
    config = ModelSpec.from_preset("elm-tiny").to_config()
    config["num_kv_heads"] = [1, 1, 1, 1]
    with pytest.raises(ElmError, match="num_kv_heads"):
        ModelSpec.from_config(config)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ElmError, match="OpenELM-270M"):
        ModelSpec.from_preset("OpenELM-9B")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layer_wise", [True, False])
def test_flops_per_token_equals_torchs_flop_counter(tied, layer_wise) -> None:
    """MFU's numerator against an independent count: torch's FlopCounterMode over a real
    forward and backward pass (explicit-matmul attention, which the counter sees in full)."""
    from torch.utils.flop_counter import FlopCounterMode

    from elm_train.modeldir import init_model

    overrides = {} if layer_wise else {"qkv_multipliers": 1.0, "ffn_multipliers": 2.0}
    spec = ModelSpec.from_preset("elm-tiny", share_input_output_layers=tied, **overrides)
    model = init_model(spec)
    model.set_attention_backend("eager")
    batch, length = 2, 48
    ids = torch.randint(0, spec.vocab_size, (batch, length))
    with FlopCounterMode(display=False) as counter:
        model(ids).logsumexp(-1).sum().backward()
    assert counter.get_total_flops() == spec.flops_per_token(length) * batch * length
