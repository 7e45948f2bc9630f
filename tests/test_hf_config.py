"""config.json as Apple's HF OpenELM code and transformers read it: the keys it needs, the shapes
Apple's reader derives (its documented semantics: heads recomputed from qkv endpoints, FFN
multipliers as one, two or N numbers, eps fixed at 1e-6), and the one-line notes for readers
that cannot load a directory."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from convert.pipeline import ConvertOptions, convert
from elm_spec import ModelSpec
from elm_spec.hf_config import AUTO_MAP, apple_reader_mismatch, apple_reader_shapes, reader_notes
from elm_spec.modeldir import read_config
from elm_spec.spec import config_from_spec, spec_from_config

TINY = ModelSpec.from_preset("elm-tiny")


def test_config_carries_the_keys_transformers_needs():
    untied = TINY.replace(share_input_output_layers=False)
    config = config_from_spec(untied)
    assert config["tie_word_embeddings"] is False
    assert config_from_spec(TINY)["tie_word_embeddings"] is True
    assert config["use_cache"] is True
    assert config["max_position_embeddings"] == untied.max_context_length
    assert config["auto_map"] == {
        "AutoConfig": "apple/OpenELM-270M--configuration_openelm.OpenELMConfig",
        "AutoModelForCausalLM": "apple/OpenELM-270M--modeling_openelm.OpenELMForCausalLM"}
    assert config["auto_map"] == AUTO_MAP
    assert config["transformers_version"].split(".")[0] in ("4", "5")
    assert spec_from_config(json.loads(json.dumps(config))) == untied


def test_apple_reader_rebuilds_the_published_270m_shapes():
    config = config_from_spec(ModelSpec.from_preset("OpenELM-270M"))
    shapes = apple_reader_shapes(config)
    assert shapes["num_query_heads"] == [12] * 5 + [16] * 7 + [20] * 4
    assert shapes["num_kv_heads"] == [3] * 5 + [4] * 7 + [5] * 4
    for name in ("OpenELM-270M", "OpenELM-450M", "OpenELM-1_1B", "OpenELM-3B", "elm-tiny"):
        assert apple_reader_mismatch(ModelSpec.from_preset(name)) is None, name


@pytest.mark.parametrize(("change", "reason"), [
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps 1e-05 (Apple's code fixes it at 1e-6)"),
    ({"qkv_multipliers": (0.5, 0.75, 1.0, 1.0)},
     "qkv_multipliers: 4 values (Apple's reader takes one or two)"),
    ({"num_transformer_layers": 2, "ffn_multipliers": (0.5, 2.4), "qkv_multipliers": 1.0},
     None),
    ({"num_transformer_layers": 2, "ffn_multipliers": (1.0, 22.246), "qkv_multipliers": 1.0},
     "ffn_dims [64, 1440] where this model has [64, 1408]"),
    ({"query_heads_override": (8, 8, 8, 8)}, "num_query_heads [2, 4, 4, 4] where this model has [8, 8, 8, 8]"),
])
def test_specs_apple_cannot_express_are_named(change, reason):
    spec = TINY.replace(**change)
    assert apple_reader_mismatch(spec) == reason


def test_non_glu_models_are_flagged_for_mlx_lm_only():
    spec = TINY.replace(ffn_with_glu=False)
    assert reader_notes(spec, "out") == [
        "note: mlx_lm.load cannot load out (mlx-lm's openelm model always uses a gated FFN); "
        "elm_mlx.load and elm's PyTorch side can"]
    assert reader_notes(TINY, "out") == []


def test_convert_says_which_readers_cannot_load_the_output(make_model_dir, tmp_path):
    source = make_model_dir(TINY.replace(rms_norm_eps=1e-5, ffn_with_glu=False))
    report = convert(source, tmp_path / "out", ConvertOptions(target="torch", progress=False))
    notes = [line for line in report.lines if line.startswith("note:")]
    assert notes == reader_notes(read_config_spec(tmp_path / "out"), tmp_path / "out")
    assert len(notes) == 2 and "rms_norm_eps 1e-05" in notes[0]
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is True
    assert read_config(tmp_path / "out")["auto_map"] == AUTO_MAP
    # MLX directories leave the remote code out (transformers 5 would offer to run it)
    convert(source, tmp_path / "mlx", ConvertOptions(target="mlx", progress=False))
    assert "auto_map" not in read_config(tmp_path / "mlx")


def read_config_spec(directory):
    return spec_from_config(read_config(directory))


TIE_SCRIPT = """
import sys, transformers
from transformers import PretrainedConfig
print(transformers.__version__.split(".")[0], PretrainedConfig.from_pretrained(sys.argv[1]).tie_word_embeddings)
"""


def _tie_flags(python: str, directory) -> tuple[str, str]:
    result = subprocess.run([python, "-c", TIE_SCRIPT, str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    major, tie = result.stdout.split()
    return major, tie


@pytest.mark.slow
def test_transformers_reads_an_untied_head_as_untied(make_model_dir):
    """transformers 4.x defaults tie_word_embeddings to True when the key is absent (then ties
    Apple's `lm_head`); elm's config says False for an untied model, under 4.x and 5.x."""
    import sys

    directory = make_model_dir(TINY.replace(share_input_output_layers=False))
    pythons = [sys.executable] + [p for p in [os.environ.get("ELM_TRANSFORMERS4_PYTHON")] if p]
    majors = set()
    for python in pythons:
        major, tie = _tie_flags(python, directory)
        assert tie == "False"
        majors.add(major)
    assert "5" in majors or "4" in majors
