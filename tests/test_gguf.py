"""`elm convert SRC out.gguf --to gguf`: llama.cpp's openelm architecture with the tokenizer
embedded. The file is read back with the `gguf` package's reader; where llama-cpp-python is
installed (the optional `llama-cpp` extra), llama.cpp itself runs it: f32 logits equal the
PyTorch twin's within float tolerance, greedy tokens and tokenization are the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from support.cli import run_elm

from convert.pipeline import ConvertOptions, convert
from elm_spec import ElmError, ModelSpec
from elm_spec.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

gguf = pytest.importorskip("gguf")

SPEC = ModelSpec.from_preset("elm-tiny")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
TEXT = "def main(argv):\n    return sum(int(x) for x in argv) % 7\n"


@pytest.fixture(scope="module")
def model_dir(make_model_dir) -> Path:
    return make_model_dir(SPEC, seed=11)


@pytest.fixture(scope="module")
def gguf_files(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for outtype in OUTTYPES:
        files[outtype] = root / f"tiny-{outtype}.gguf"
        convert(model_dir, files[outtype], ConvertOptions(target="gguf", outtype=outtype,
                                                         progress=False))
    return files


def _field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_holds_llama_cpp_openelm_layout(model_dir, gguf_files):
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(gguf_files["f32"])
    assert _field(reader, "general.architecture") == "openelm"
    assert _field(reader, "openelm.block_count") == SPEC.num_transformer_layers
    assert _field(reader, "openelm.attention.head_count") == SPEC.num_query_heads
    assert _field(reader, "openelm.attention.head_count_kv") == SPEC.num_kv_heads
    assert _field(reader, "openelm.feed_forward_length") == SPEC.ffn_dims
    assert _field(reader, "openelm.rope.dimension_count") == SPEC.head_dim
    processor = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 1

    weights = load_file(model_dir / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    layer0 = weights["transformer.layers.0.ffn.proj_1.weight"]
    ffn = SPEC.ffn_dims[0]
    assert np.array_equal(tensors["blk.0.ffn_gate.weight"].data, layer0[:ffn])
    assert np.array_equal(tensors["blk.0.ffn_up.weight"].data, layer0[ffn:])
    assert np.array_equal(tensors["token_embd.weight"].data, weights["transformer.token_embeddings.weight"])
    assert "output.weight" not in tensors  # llama.cpp reuses the embedding
    quantized = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_files["q8_0"]).tensors}
    assert quantized["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert quantized["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize(("change", "message"), [
    ({"share_input_output_layers": False}, "an untied lm_head"),
    ({"ffn_with_glu": False}, "an ungated FFN"),
])
def test_specs_llama_cpp_cannot_run_are_refused(make_model_dir, tmp_path, change, message):
    source = make_model_dir(SPEC.replace(**change))
    with pytest.raises(ElmError, match=f"GGUF \\(llama.cpp openelm\\) cannot express {message}"):
        convert(source, tmp_path / "x.gguf", ConvertOptions(target="gguf", progress=False))
    assert not list(tmp_path.iterdir())


def test_cli_refuses_bad_flags_and_keeps_existing_files(model_dir, tmp_path):
    result = run_elm("convert", str(model_dir), str(tmp_path / "o.gguf"), "--to", "gguf",
                     "--outtype", "q4_k")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --outtype 'q4_k': choose from f32, f16, bf16, q8_0")
    existing = tmp_path / "keep.gguf"
    existing.write_bytes(b"old")
    result = run_elm("convert", str(model_dir), str(existing), "--to", "gguf")
    assert result.returncode == 1 and existing.read_bytes() == b"old"
    assert "already exists (use --force to replace it)" in result.stderr


def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 KV cache: llama.cpp's default float16 cache alone moves logits by ~1e-3
    return llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                           type_k=0, type_v=0, seed=0)


def _elm_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch

    from elm_train import load_model

    with torch.no_grad():
        return load_model(model_dir)(torch.tensor([ids]))[0].numpy()


def _elm_greedy(model_dir: Path, ids: list[int], count: int) -> list[int]:
    import torch

    from elm_train import load_model

    model, tokens = load_model(model_dir), list(ids)
    with torch.no_grad():
        for _ in range(count):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(ids):]


@pytest.mark.parametrize(("outtype", "tolerance"),
                         [("f32", 1e-4), ("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.6)])
def test_llama_cpp_logits_match_elm(model_dir, gguf_files, outtype, tolerance):
    ids = Tokenizer(model_dir).encode(TEXT, bos=True)
    reference = _elm_logits(model_dir, ids)
    llm = _llama(gguf_files[outtype])
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        assert np.abs(logits - reference).max() < tolerance
        if outtype == "f32":
            llm.reset()
            generated = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                generated.append(token)
                if len(generated) == 12:
                    break
            expected = _elm_greedy(model_dir, ids, 12)
            assert generated == expected
            assert llm.detokenize(generated).decode(errors="replace") == Tokenizer(model_dir).decode(expected)
    finally:
        llm.close()


def test_llama_cpp_tokenizes_as_sentencepiece(model_dir, gguf_files):
    from support.corpora import tokenizer_corpus

    tokenizer = Tokenizer(model_dir)
    llm = _llama(gguf_files["f32"])
    try:
        texts = [t for t in tokenizer_corpus() if t and not any(s in t for s in ("<s>", "</s>", "<unk>"))]
        wrong = [t for t in texts
                 if llm.tokenize(t.encode(), add_bos=True, special=False) != tokenizer.encode(t, bos=True)]
        assert not wrong, f"{len(wrong)} of {len(texts)} strings differ, first {wrong[0]!r}"
    finally:
        llm.close()
