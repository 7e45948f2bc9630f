"""One tokenization everywhere: SentencePiece, elm_mlx.load, mlx_lm.load, transformers'
AutoTokenizer (the installed 5.x, and 4.x in another interpreter named by ELM_TRANSFORMERS4_PYTHON)
and lm-eval's `hf` model give the same ids and decodes on a corpus of hard strings, for elm's
own tokenizer, one trained with Llama-2's settings and one with SentencePiece's defaults
(nmt_nfkc normalization, extra whitespace removed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm
from support.corpora import stdlib_texts, tokenizer_corpus

from elm_spec import ModelSpec
from elm_spec.tokenizer import Tokenizer, write_tokenizer_files


def _train(directory: Path, **settings) -> Path:
    directory.mkdir()
    lines = (line for text in stdlib_texts(40) for line in text.splitlines() if line.strip())
    spm.SentencePieceTrainer.Train(
        sentence_iterator=lines, model_prefix=str(directory / "tokenizer"), model_type="bpe",
        vocab_size=1000, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, **settings)
    write_tokenizer_files(directory / "tokenizer.model", directory)
    return directory


@pytest.fixture(scope="module", params=["elm", "llama2-settings", "sentencepiece-defaults"])
def tokenizer_variant(request, tokenizer_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizers")
    if request.param == "elm":
        return tokenizer_dir
    if request.param == "llama2-settings":
        # Llama-2's trainer_spec/normalizer_spec, on a smaller vocabulary
        return _train(root / "llama2", normalization_rule_name="identity",
                      remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                      allow_whitespace_only_pieces=True, character_coverage=0.99995,
                      max_sentencepiece_length=16, split_by_unicode_script=True,
                      split_by_number=True, split_by_whitespace=True)
    return _train(root / "defaults")


def expected(directory: Path) -> tuple[list[list[int]], list[str]]:
    tokenizer = Tokenizer(directory)
    ids = [tokenizer.encode(text) for text in tokenizer_corpus()]
    return ids, [tokenizer.decode(i) for i in ids]


def test_sentencepiece_reference_keeps_what_the_model_does(tokenizer_variant):
    """Without special-token strings, elm's Tokenizer is SentencePiece itself."""
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_variant / "tokenizer.model"))
    tokenizer = Tokenizer(tokenizer_variant)
    plain = [t for t in tokenizer_corpus() if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    assert tokenizer.encode_batch(plain) == processor.EncodeAsIds(plain)
    assert tokenizer.encode("a</s>b") == [*processor.EncodeAsIds("a"), 2, *processor.EncodeAsIds("b")]
    assert tokenizer.encode_batch(tokenizer_corpus()) == [tokenizer.encode(t) for t in tokenizer_corpus()]


def _check(name: str, encode, decode, directory: Path) -> None:
    ids, texts = expected(directory)
    got = [list(encode(text)) for text in tokenizer_corpus()]
    wrong = [text for text, a, b in zip(tokenizer_corpus(), got, ids, strict=True) if a != b]
    assert not wrong, f"{name}: {len(wrong)} strings get other ids, first {wrong[0]!r}"
    decoded = [decode(i) for i in ids]
    wrong = [t for t, a, b in zip(tokenizer_corpus(), decoded, texts, strict=True) if a != b]
    assert not wrong, f"{name}: {len(wrong)} decodes differ, first {wrong[0]!r}"


def test_transformers_autotokenizer_agrees(tokenizer_variant):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_variant)
    _check("AutoTokenizer", lambda t: hf.encode(t, add_special_tokens=False),
           lambda i: hf.decode(i, skip_special_tokens=True), tokenizer_variant)
    assert hf.encode("x") == [1, *Tokenizer(tokenizer_variant).encode("x")]


TRANSFORMERS4_SCRIPT = """
import json, sys
from transformers import AutoTokenizer, __version__
assert __version__.startswith("4."), __version__
hf = AutoTokenizer.from_pretrained(sys.argv[1])
texts, ids = json.load(open(sys.argv[2]))
print(json.dumps([[hf.encode(t, add_special_tokens=False) for t in texts],
                  [hf.decode(i, skip_special_tokens=True) for i in ids], hf.encode("x")]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ELM_TRANSFORMERS4_PYTHON"),
                    reason="set ELM_TRANSFORMERS4_PYTHON to a Python with transformers 4.x")
def test_transformers_4_autotokenizer_agrees(tokenizer_variant, tmp_path):
    ids, texts = expected(tokenizer_variant)
    request = tmp_path / "request.json"
    request.write_text(json.dumps([tokenizer_corpus(), ids]))
    result = subprocess.run([os.environ["ELM_TRANSFORMERS4_PYTHON"], "-c", TRANSFORMERS4_SCRIPT,
                             str(tokenizer_variant), str(request)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got_ids, got_texts, with_bos = json.loads(result.stdout.splitlines()[-1])
    assert got_ids == ids
    assert got_texts == texts
    assert with_bos == Tokenizer(tokenizer_variant).encode("x", bos=True)


@pytest.fixture(scope="module")
def model_dir(make_model_dir, tokenizer_variant, tmp_path_factory) -> Path:
    """A tiny model directory whose tokenizer files are TOKENIZER_VARIANT's."""
    import shutil

    source = make_model_dir(ModelSpec.from_preset("elm-tiny").replace(vocab_size=1000))
    directory = tmp_path_factory.mktemp("withtok") / "model"
    shutil.copytree(source, directory)
    write_tokenizer_files(tokenizer_variant / "tokenizer.model", directory)
    return directory


def test_mlx_loaders_agree(model_dir):
    import mlx_lm

    import elm_mlx

    _, ours = elm_mlx.load(model_dir)
    _check("elm_mlx.load", lambda t: ours.encode(t, add_special_tokens=False),
           lambda i: ours.decode(i, skip_special_tokens=True), model_dir)
    _, theirs = mlx_lm.load(str(model_dir))
    _check("mlx_lm.load", lambda t: theirs.encode(t, add_special_tokens=False),
           lambda i: theirs.decode(i, skip_special_tokens=True), model_dir)
    detokenizer = theirs.detokenizer
    ids = Tokenizer(model_dir).encode("  lead\n\tdef 日本 🙂 end")
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == Tokenizer(model_dir).decode(ids)


def test_lm_eval_hf_model_tokenizes_alike(model_dir):
    from lm_eval.models.huggingface import HFLM
    from support.hf_wrapper import wrap_for_transformers

    lm = HFLM(pretrained=wrap_for_transformers(model_dir), tokenizer=str(model_dir),
              backend="causal", batch_size=1)
    reference = Tokenizer(model_dir)
    _check("lm-eval hf", lambda t: lm.tok_encode(t, add_special_tokens=False),
           lambda i: lm.tok_decode(i, skip_special_tokens=True), model_dir)
    assert lm.tok_encode("Paris") == reference.encode("Paris", bos=True)
