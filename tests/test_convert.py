"""`elm convert`: round trips through every format, logits parity, quantization, sharding."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from support.corenet import corenet_yaml, save_corenet

from convert import ConvertOptions, ShapeOptions, convert
from convert.tensors import Tensor, from_float32, from_torch
from elm_spec import ModelSpec
from elm_spec.modeldir import INDEX_FILE, write_json
from elm_train.modeldir import init_model, load_state_dict, model_from_state_dict

SPECS = {
    "layerwise-tied-gqa2": ModelSpec.from_preset("elm-tiny"),
    "uniform-untied-mha-no-qknorm": ModelSpec(
        num_transformer_layers=2, model_dim=96, head_dim=32, num_gqa_groups=1, qkv_multipliers=(1.0,),
        ffn_multipliers=(2.0,), ffn_dim_divisor=64, normalize_qk_projections=False,
        share_input_output_layers=False, vocab_size=512, max_context_length=128),
    "layerwise-gqa4-odd-widths": ModelSpec(
        num_transformer_layers=3, model_dim=160, head_dim=16, num_gqa_groups=4,
        qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 3.0), ffn_dim_divisor=32,
        vocab_size=512, max_context_length=128),
}
PAD_ROWS = 128


def options(**changes) -> ConvertOptions:
    shape = ShapeOptions(**{k: changes.pop(k) for k in ("preset", "corenet_config", "vocab_size",
                                                        "tokenizer") if k in changes})
    return ConvertOptions(shape=shape, progress=False, **changes)


def mlx_twin_logits(directory: Path, ids: list[int]) -> np.ndarray:
    from elm_mlx import load_model

    return np.array(load_model(directory)(mx.array([ids])))[0]


def probe(spec: ModelSpec) -> list[int]:
    return np.random.default_rng(1).integers(0, spec.vocab_size, 24).tolist()


def numpy_state(directory: Path) -> dict[str, np.ndarray]:
    return {k: v for file in sorted(directory.glob("model*.safetensors")) for k, v in load_numpy(file).items()}


@pytest.mark.parametrize("shape_name", list(SPECS))
def test_corenet_round_trip_and_logits(shape_name: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    spec = SPECS[shape_name]
    rows = spec.vocab_size + PAD_ROWS
    original = save_corenet(spec, tmp_path / "corenet.pt", rows)
    if spec == ModelSpec.from_preset("elm-tiny"):  # shaped by a CoreNet YAML naming the preset
        shape = {"corenet_config": corenet_yaml(tmp_path / "openelm.yaml", "elm-tiny", rows)}
    else:  # shaped by a config.json beside the .pt
        write_json(tmp_path / "config.json", spec.to_config())
        shape = {}
    convert(tmp_path / "corenet.pt", tmp_path / "mlx",
            options(tokenizer=tokenizer_dir / "tokenizer.model", **shape))
    # PyTorch twin on the CoreNet weights (padding rows cut) vs MLX twin on the converted directory
    hf_state = {("lm_head.weight" if k == "classifier.weight" else f"transformer.{k}"): v
                for k, v in original.items()}
    for name in ("transformer.token_embeddings.weight", "lm_head.weight"):
        if name in hf_state:
            hf_state[name] = hf_state[name][: spec.vocab_size]
    ids = probe(spec)
    with torch.no_grad():
        expected = model_from_state_dict(hf_state, spec, "float32")(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(mlx_twin_logits(tmp_path / "mlx", ids), expected, atol=1e-4, rtol=0)
    # and back: MLX -> interchange directory -> CoreNet .pt (padded again to CoreNet's rows)
    convert(tmp_path / "mlx", tmp_path / "torch", options(target="torch"))
    assert load_state_dict(tmp_path / "torch").keys() == hf_state.keys()
    convert(tmp_path / "torch", tmp_path / "back.pt", options(target="corenet", vocab_size=rows))
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        if name in ("token_embeddings.weight", "classifier.weight"):
            assert torch.equal(back[name][: spec.vocab_size], tensor[: spec.vocab_size]), name
            assert not back[name][spec.vocab_size:].any(), "padding rows come back as zeros"
        else:
            assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize(("flags", "expected_bits"), [
    ({"quantize": True, "q_bits": 4, "q_group_size": 32}, {4}),
    ({"quantize": True, "q_bits": 8, "q_group_size": 64}, {8}),
    ({"q_recipe": "mixed_4_8", "q_group_size": 32}, {4, 8}),
])
def test_quantized_dirs_load_in_elm_and_mlx_lm(flags: dict, expected_bits: set[int], tmp_path: Path,
                                               make_model_dir) -> None:
    import mlx_lm
    from mlx_lm.utils import compute_bits_per_weight

    import elm_mlx

    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=3)
    report = convert(source, tmp_path / "q", options(dtype="bfloat16", verify=True, **flags))
    theirs, tokenizer = mlx_lm.load(str(tmp_path / "q"))
    ours, _ = elm_mlx.load(tmp_path / "q")
    ids = mx.array([tokenizer.encode("def main():\n    return 0")])
    np.testing.assert_array_equal(np.array(theirs(ids).astype(mx.float32)),
                                  np.array(ours(ids).astype(mx.float32)))
    bits = {m.bits for _, m in theirs.named_modules() if isinstance(m, (mx_nn().QuantizedLinear,
                                                                        mx_nn().QuantizedEmbedding))}
    assert bits == expected_bits
    assert report.bits_per_weight == pytest.approx(compute_bits_per_weight(theirs), rel=1e-6)
    assert report.verify.ok
    if "q_recipe" in flags:
        assert theirs.transformer.token_embeddings.bits == 8
        assert all(layer.attn.out_proj.bits == 8 and layer.attn.qkv_proj.bits == 4
                   for layer in theirs.layers)


def test_4bit_verify_of_a_random_init_model_passes_and_reports_what_quantization_costs(
        tmp_path: Path, make_model_dir) -> None:
    """The criterion is the output's faithfulness (its logits against its own dequantized weights,
    each weight against the source's within the rounding bound), which holds for random-init and
    trained models alike; the distance from the source is reported beside it, and kept."""
    from convert.verify import PROBE_TEXT, PROBE_TOKENS
    from elm_spec.tokenizer import Tokenizer

    source = make_model_dir(ModelSpec.from_preset("elm-small").replace(vocab_size=512), seed=5)
    said: list[str] = []
    report = convert(source, tmp_path / "q", options(quantize=True, q_bits=4, verify=True),
                     say=said.append)
    assert report.verify.ok and report.verify.weights[0] <= 1.0
    assert (tmp_path / "q" / "config.json").is_file()
    assert said[1].startswith(f"{tmp_path / 'q'}: MLX directory, 4-bit (group 64), ")
    assert "float32, " not in said[1].split("bits per weight")[0]

    # The reported distance from the source, computed here from both twins directly.
    ids = Tokenizer(source / "tokenizer.model").encode(PROBE_TEXT, bos=True)[:PROBE_TOKENS]
    reference = load_model_logits(source, ids)
    candidate = mlx_twin_logits(tmp_path / "q", ids)
    relative = np.sqrt(np.mean((reference - candidate) ** 2)) / reference.std()
    effect = report.verify.effect
    assert effect.relative == pytest.approx(relative, rel=1e-3)
    assert effect.agreement == int((reference.argmax(-1) == candidate.argmax(-1)).sum())
    warned = any(line.startswith("warning: the quantized model picks another") for line in said)
    assert warned == (2 * effect.agreement < effect.positions)


def test_verify_catches_weights_written_wrong(tmp_path: Path, make_model_dir, monkeypatch) -> None:
    """Scales and biases swapped on write: both twins read the same file and agree with each other,
    so only the weight check against the source can see it; nothing is written."""
    import convert.pipeline as pipeline
    from elm_spec import ElmError

    real = pipeline.quantize
    monkeypatch.setattr(pipeline, "quantize", lambda w, settings: (lambda q, s, b: (q, b, s))(
        *real(w, settings)))
    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=5)
    with pytest.raises(ElmError, match=r"verify failed: transformer\..* differs from the source's"):
        convert(source, tmp_path / "q", options(quantize=True, q_bits=4, q_group_size=32,
                                                 verify=True))
    assert not (tmp_path / "q").exists()


def load_model_logits(directory: Path, ids: list[int]) -> np.ndarray:
    from elm_train import load_model

    with torch.no_grad():
        return load_model(directory)(torch.tensor([ids])).float().numpy()[0]


def mx_nn():
    import mlx.nn as nn

    return nn


def test_mlx_lm_mixed_recipes_do_not_know_openelm(make_model_dir) -> None:
    """Why --q-recipe exists: mlx-lm's own mixed recipes look for Llama's module names."""
    import mlx_lm
    from mlx_lm.convert import mixed_quant_predicate_builder

    model, _ = mlx_lm.load(str(make_model_dir(ModelSpec.from_preset("elm-tiny"))))
    with pytest.raises(ValueError, match="expected keys"):
        mixed_quant_predicate_builder("mixed_4_6", model)


def test_quantized_round_trip_dequantizes(tmp_path: Path, make_model_dir) -> None:
    """--to torch from a 4-bit MLX directory equals MLX's own dequantization of each weight."""
    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=4)
    convert(source, tmp_path / "q", options(quantize=True, q_group_size=32))
    convert(tmp_path / "q", tmp_path / "torch", options(target="torch", verify=True))
    quantized = {k: mx.array(v) for k, v in numpy_state(tmp_path / "q").items()}
    restored = numpy_state(tmp_path / "torch")
    name = "transformer.layers.1.ffn.proj_1"
    expected = mx.dequantize(quantized[f"{name}.weight"], quantized[f"{name}.scales"],
                             quantized[f"{name}.biases"], group_size=32, bits=4)
    np.testing.assert_array_equal(restored[f"{name}.weight"], np.array(expected))
    assert restored["transformer.norm.weight"].dtype == np.float32


def test_sharded_output_and_sharded_source(tmp_path: Path, make_model_dir) -> None:
    import mlx_lm

    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=5)
    convert(source, tmp_path / "sharded", options(max_shard_bytes=100_000))
    files = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 3 and (tmp_path / "sharded" / INDEX_FILE).is_file()
    assert all(f.stat().st_size < 100_000 + 4096 for f in files if len(load_numpy(f)) > 1)
    mlx_lm.load(str(tmp_path / "sharded"))
    convert(tmp_path / "sharded", tmp_path / "single", options(target="torch"))
    assert not (tmp_path / "single" / INDEX_FILE).exists()
    original, converted = numpy_state(source), numpy_state(tmp_path / "single")
    assert original.keys() == converted.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], converted[name])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("nested", [True, False])
def test_training_checkpoint_source(nested: bool, tmp_path: Path, tokenizer_dir: Path) -> None:
    """A torch.distributed.checkpoint directory as `elm train` writes it, read on one process."""
    import torch.distributed.checkpoint as dcp

    spec = ModelSpec.from_preset("elm-tiny")
    state = init_model(spec, seed=6).state_dict()
    checkpoint = tmp_path / "run" / "step-00010"
    optimizer = {"step": torch.tensor(10.0), "exp_avg": torch.ones(3)}
    dcp.save({"model": state, "optim": optimizer} if nested else state,
             checkpoint_id=str(checkpoint), no_dist=True)
    write_json(tmp_path / "run" / "config.json", spec.to_config())
    convert(checkpoint, tmp_path / "mlx", options(tokenizer=tokenizer_dir, verify=True))
    converted = numpy_state(tmp_path / "mlx")
    assert converted.keys() == state.keys()
    for name, tensor in state.items():
        np.testing.assert_array_equal(converted[name], tensor.numpy())


def test_pytorch_model_bin_source(tmp_path: Path, tokenizer_dir: Path, make_model_dir) -> None:
    import shutil

    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=7)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    state = load_state_dict(source)
    torch.save(state, hf_dir / "pytorch_model.bin")
    shutil.copy(source / "config.json", hf_dir)
    shutil.copy(tokenizer_dir / "tokenizer.model", hf_dir)
    convert(hf_dir, tmp_path / "mlx", options(dtype="float16"))
    converted = numpy_state(tmp_path / "mlx")
    for name, tensor in state.items():
        np.testing.assert_array_equal(converted[name], tensor.half().numpy())


def test_bfloat16_rounding_matches_torch() -> None:
    values = torch.cat([torch.randn(10_000) * 10.0 ** torch.randint(-30, 30, (10_000,)),
                        torch.tensor([0.0, -0.0, 1e-40, 3.4e38, -3.4e38, float("inf"), float("-inf"),
                                      1.00390625, 1.01171875])])
    ours = from_float32(values.numpy(), "BF16")
    theirs = from_torch(values.to(torch.bfloat16))
    np.testing.assert_array_equal(ours.data, theirs.data)
    np.testing.assert_array_equal(ours.float32(), values.to(torch.bfloat16).float().numpy())
    nan = from_float32(np.array([np.nan], dtype=np.float32), "BF16")
    assert Tensor(nan.data, "BF16").count_nonfinite() == 1


def test_float16_overflow_warning(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    from elm_train.modeldir import save_model_dir

    spec = ModelSpec.from_preset("elm-tiny")
    model = init_model(spec, seed=8)
    with torch.no_grad():
        model.transformer.layers[0].ffn.proj_1.weight.mul_(3000.0)  # weights fit, activations do not
    save_model_dir(model.state_dict(), spec, tmp_path / "hot", tokenizer_dir / "tokenizer.model")
    convert(tmp_path / "hot", tmp_path / "f16", options(dtype="float16"))
    assert "float16 would overflow" in capsys.readouterr().err
    convert(tmp_path / "hot", tmp_path / "bf16", options(dtype="bfloat16"))
    assert "would overflow" not in capsys.readouterr().err


def test_3b_class_models_default_to_bfloat16(capsys) -> None:
    from convert.pipeline import ConvertReport, _output_dtype
    from convert.sources import Source

    def stored_as(preset: str, code: str) -> Source:
        return Source(Path(preset), "hf", ModelSpec.from_preset(preset), None, code, {}, lambda _: None)

    assert _output_dtype(stored_as("OpenELM-3B", "F32"), None, ConvertReport(Path("x"))) == "BF16"
    assert "writing bfloat16" in capsys.readouterr().err
    assert _output_dtype(stored_as("OpenELM-3B", "F32"), "float16", ConvertReport(Path("x"))) == "F16"
    assert _output_dtype(stored_as("OpenELM-1_1B", "F32"), None, ConvertReport(Path("x"))) == "F32"


def test_mlx_lm_convert_output_comes_back(tmp_path: Path, make_model_dir) -> None:
    """A directory quantized by mlx_lm.convert (tokenizer.json only) converts back to PyTorch."""
    from mlx_lm.convert import convert as mlx_lm_convert

    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=9)
    mlx_lm_convert(str(source), str(tmp_path / "mlx-lm"), quantize=True, q_group_size=32, q_bits=8)
    report = convert(tmp_path / "mlx-lm", tmp_path / "torch", options(target="torch", verify=True))
    assert report.verify.lossless and report.verify.max_abs < 1e-4
    assert (tmp_path / "torch" / "tokenizer.json").is_file()
    assert load_state_dict(tmp_path / "torch").keys() == load_state_dict(source).keys()
