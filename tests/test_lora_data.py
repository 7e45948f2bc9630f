"""Fine-tuning data: formats, prompt masks, packing boundaries, truncation and bad inputs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from support.lora import text_rows, write_jsonl

from elm_mlx.lora.config import build_config
from elm_mlx.lora.data import (
    Encoder,
    Example,
    batch_stream,
    load_data_dir,
    load_split,
    make_batch,
    packed_rows,
    single_rows,
)
from elm_spec import ElmError
from elm_spec.chat_template import resolve_chat_template, shipped_chat_template


@pytest.fixture(scope="module")
def model_and_tokenizer(make_model_dir):
    import elm_mlx

    return elm_mlx.load(make_model_dir(seed=3))


@pytest.fixture(scope="module")
def encoder(model_and_tokenizer) -> Encoder:
    return Encoder(model_and_tokenizer[1], shipped_chat_template())


def squeeze(text: str) -> str:
    """Text without spaces: the Llama tokenizer decodes a space after each special token."""
    return text.replace(" ", "")


def trained_text(encoder: Encoder, example: Example) -> str:
    return encoder.tokenizer.decode([t for t, m in zip(example.tokens, example.loss_mask, strict=True) if m])


def test_completion_rows_train_only_on_the_completion(encoder, tmp_path):
    split = load_split(write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "def f(x):", "completion": "return x + 1"}]), encoder, 2048)
    example = split.examples[0]
    assert split.format == "completions"
    assert trained_text(encoder, example) == "return x + 1</s>"
    assert squeeze(encoder.tokenizer.decode(example.tokens)) == squeeze(
        "<s><|user|>\ndef f(x):</s><|assistant|>\nreturn x + 1</s>")
    # The masked prompt is exactly what generation feeds the model.
    prompt = encoder.tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f(x):"}], chat_template=encoder.chat_template,
        add_generation_prompt=True, tokenize=False)
    prompt_ids = encoder.tokenizer.encode(prompt, add_special_tokens=False)
    assert example.tokens[: len(prompt_ids)] == prompt_ids
    assert not any(example.loss_mask[: len(prompt_ids)])


def test_chat_rows_train_on_every_assistant_turn(encoder, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "two"},
                {"role": "assistant", "content": "2"}]
    split = load_split(write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}]), encoder, 2048)
    example = split.examples[0]
    assert split.format == "chat"
    assert squeeze(encoder.tokenizer.decode(example.tokens)) == squeeze(
        "<s><|system|>\nBe brief.</s><|user|>\none</s><|assistant|>\n1</s>"
        "<|user|>\ntwo</s><|assistant|>\n2</s>")
    assert squeeze(trained_text(encoder, example)) == "1</s>2</s>"
    unmasked = Encoder(encoder.tokenizer, encoder.chat_template, mask_prompt=False)
    assert all(load_split(tmp_path / "train.jsonl", unmasked, 2048).examples[0].loss_mask)


def test_text_rows_are_bos_text_eos(encoder, tmp_path):
    split = load_split(write_jsonl(tmp_path / "train.jsonl", [{"text": "import os"}]), encoder, 2048)
    tokens = split.examples[0].tokens
    assert tokens[0] == 1 and tokens[-1] == 2 and all(split.examples[0].loss_mask)
    assert encoder.tokenizer.decode(tokens[1:-1]) == "import os"


def test_packed_batch_gives_the_same_per_token_loss_as_separate_documents(model_and_tokenizer,
                                                                           encoder, tmp_path):
    from elm_mlx.lora.train import loss_terms

    model = model_and_tokenizer[0]
    split = load_split(write_jsonl(tmp_path / "train.jsonl", text_rows(6, seed=1)), encoder, 2048)
    docs = split.examples[:3]
    packed = make_batch(packed_rows(docs, 2048, seed=0), 2048, packed=True)
    assert packed.inputs.shape[0] == 1 and packed.segments.max() == 3
    packed_loss, packed_weights = loss_terms(
        model, mx.array(packed.inputs), mx.array(packed.targets), mx.array(packed.weights),
        mx.array(packed.segments))
    packed_loss, packed_weights = np.array(packed_loss[0]), np.array(packed_weights[0])
    # Each document alone, in the order packing placed them.
    order = np.random.RandomState(0).permutation(len(docs))
    separate = []
    for index in order:
        batch = make_batch(single_rows([docs[index]]), 2048, packed=False)
        losses, weights = loss_terms(model, mx.array(batch.inputs), mx.array(batch.targets),
                                     mx.array(batch.weights), None)
        separate.append(np.array(losses[0])[np.array(weights[0]) > 0])
    expected = np.concatenate(separate)
    got = packed_loss[packed_weights > 0]
    # Targets across a document boundary are not trained on: one fewer per document.
    assert len(got) == sum(len(d.tokens) - 1 for d in docs) == len(expected)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    # Without the block-diagonal mask the later documents would see the earlier ones.
    leaky, _ = loss_terms(model, mx.array(packed.inputs), mx.array(packed.targets),
                          mx.array(packed.weights), None)
    assert np.abs(np.array(leaky[0])[packed_weights > 0] - expected).max() > 1e-3


def test_truncation_is_counted_and_all_too_long_is_an_error(encoder, tmp_path):
    rows = [{"prompt": "x " * 60, "completion": "y"}, {"prompt": "a", "completion": "b " * 60},
            {"prompt": "a", "completion": "b"}]
    split = load_split(write_jsonl(tmp_path / "train.jsonl", rows), encoder, 48)
    assert (split.rows, split.dropped, split.truncated, len(split.examples)) == (3, 1, 1, 2)
    assert max(len(e.tokens) for e in split.examples) == 48
    assert "1 truncated" in split.summary() and "1 dropped" in split.summary()
    write_jsonl(tmp_path / "long" / "train.jsonl", rows[:1])
    with pytest.raises(ElmError, match=r"train.jsonl: all 1 rows are longer than --max-seq-length 48"):
        load_split(tmp_path / "long" / "train.jsonl", encoder, 48)


def test_batches_follow_the_step_number(encoder, tmp_path):
    split = load_split(write_jsonl(tmp_path / "train.jsonl", text_rows(40)), encoder, 64)
    stream = batch_stream(split, 4, 64, pack=True, seed=5, training=True)
    again = batch_stream(split, 4, 64, pack=True, seed=5, training=True)
    for step in (0, 3, len(stream) + 2):
        np.testing.assert_array_equal(stream.training_batch(step).inputs,
                                      again.training_batch(step).inputs)
    first_epoch = {stream.training_batch(s).inputs.tobytes() for s in range(len(stream))}
    assert len(first_epoch) == len(stream)  # every batch once per epoch


@pytest.mark.parametrize(("rows", "message"), [
    ('{"text": "ok"}\n{"text": "broken\n', r"train.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "completion": "  "}\n', r"train.jsonl:1: empty completion"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"text": "x"}\n', r"train.jsonl:2: row format differs from line 1 \(chat\)"),
    ('{"question": "a"}\n', r"train.jsonl:1: unknown row format"),
])
def test_bad_rows_name_file_and_line(encoder, tmp_path, rows, message):
    (tmp_path / "train.jsonl").write_text(rows)
    with pytest.raises(ElmError, match=message):
        load_data_dir(tmp_path, encoder, 2048)


def test_missing_train_and_chat_without_template(encoder, tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "x"}])
    with pytest.raises(ElmError, match=r"no train.jsonl"):
        load_data_dir(tmp_path, encoder, 2048)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    write_jsonl(tmp_path / "train.jsonl", [chat])
    assert resolve_chat_template("none", None) is None
    no_template = Encoder(encoder.tokenizer, resolve_chat_template("none", None))
    with pytest.raises(ElmError, match=r"train.jsonl:1: chat rows need a chat template"):
        load_data_dir(tmp_path, no_template, 2048)


def test_config_file_mirrors_flags_and_rejects_unknown_keys(tmp_path: Path):
    config = tmp_path / "lora.yaml"
    config.write_text("model: m\ndata: d\nnum-layers: 2\nlora_parameters: {rank: 4, scale: 8.0}\n"
                      "keys: [qkv_proj, ffn.proj_2]\niters: 5\n")
    settings = build_config(config, {"iters": 7, "rank": None})
    assert (settings.num_layers, settings.rank, settings.lora_scale, settings.iters) == (2, 4, 8.0, 7)
    assert settings.keys == ["attn.qkv_proj", "ffn.proj_2"]
    assert build_config(config, {"alpha": 16.0}).lora_scale == 4.0
    config.write_text("model: m\ndata: d\nlearning_rat: 0.1\n")
    with pytest.raises(ElmError, match=r"lora.yaml: unknown key 'learning_rat'"):
        build_config(config, {})


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_and_gradients_equal_the_full_logits_computation(make_model_dir, tied):
    """The loss projects loss_chunk_rows(vocab) positions at a time under a checkpoint; value and
    gradients (LoRA weights, and every weight including the head when all are trainable) must
    equal cross-entropy over the whole logits tensor."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import elm_mlx
    from elm_mlx.lora.adapters import apply_fine_tune
    from elm_mlx.lora.config import FinetuneConfig
    from elm_mlx.lora.losses import loss_chunk_rows
    from elm_mlx.lora.train import batch_loss
    from elm_spec import ModelSpec

    spec = ModelSpec.from_preset("elm-tiny", share_input_output_layers=tied)
    directory = make_model_dir(spec, seed=5)
    rng = np.random.default_rng(0)
    chunk = loss_chunk_rows(spec.vocab_size)
    batch, length = 3, 2 * chunk // 3 + 7  # chunks straddle rows, last one short
    inputs = mx.array(rng.integers(0, spec.vocab_size, (batch, length)))
    targets = mx.array(rng.integers(0, spec.vocab_size, (batch, length)))
    weights = mx.array((rng.random((batch, length)) > 0.2).astype(np.float32))

    def reference(model, inputs, targets, weights, segments):
        losses = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets) * weights
        return losses.sum() / weights.sum(), weights.sum()

    for unfreeze_all in (False, True):
        model, _ = elm_mlx.load(directory)
        apply_fine_tune(model, FinetuneConfig(model=str(directory), rank=4, scale=2.0))
        if unfreeze_all:
            model.unfreeze()
        grads = {}
        for name, loss_fn in (("chunked", batch_loss), ("reference", reference)):
            (loss, _), grad = nn.value_and_grad(model, loss_fn)(model, inputs, targets,
                                                                      weights, None)
            grads[name] = (loss.item(), dict(tree_flatten(grad)))
        assert grads["chunked"][0] == pytest.approx(grads["reference"][0], rel=1e-5)
        got, expected = grads["chunked"][1], grads["reference"][1]
        assert got.keys() == expected.keys() and len(got) > 0
        head = "transformer.token_embeddings.weight" if tied else "lm_head.weight"
        assert (head in got) == unfreeze_all
        for key, value in expected.items():
            np.testing.assert_allclose(np.array(got[key]), np.array(value), atol=1e-5, rtol=1e-4,
                                       err_msg=key)
