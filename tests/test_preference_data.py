"""Preference pairs: the row layouts, tokens as SFT and generation see them, prompt-side
truncation, batches, bad rows; and the NumPy reference losses at points known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support.lora import write_jsonl
from support.preference import dpo_reference, ends_with_rows, orpo_reference

from elm_spec import ElmError
from elm_spec.chat_encoding import SentencePieceCodec
from elm_spec.chat_template import shipped_chat_template
from elm_spec.preference import (
    PreferencePair,
    load_preference_dir,
    load_preference_split,
    preference_batch,
    preference_stream,
)

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A B C"}]


@pytest.fixture(scope="module")
def hf_encoder(tokenizer_dir):
    from mlx_lm.utils import load_tokenizer

    from elm_mlx.lora.data import Encoder

    return Encoder(load_tokenizer(tokenizer_dir), shipped_chat_template())


@pytest.fixture(scope="module")
def codec(tokenizer_dir) -> SentencePieceCodec:
    return SentencePieceCodec(tokenizer_dir, shipped_chat_template())


def load_rows(tmp_path: Path, rows: list[dict], codec, max_seq_length: int = 256):
    return load_preference_split(write_jsonl(tmp_path / "train.jsonl", rows), codec, max_seq_length)


def test_pairs_are_tokenized_as_sft_rows_and_generation_prompts(hf_encoder, tmp_path):
    """prompt + chosen is exactly the SFT completion row {prompt, completion: chosen}, with the
    same mask; the prompt is what generation feeds the model."""
    from elm_mlx.lora.data import load_split

    row = {"prompt": "def f(x):", "chosen": "return x + 1", "rejected": "pass"}
    pair = load_rows(tmp_path, [row], hf_encoder).pairs[0]
    sft = load_split(write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": row["prompt"], "completion": row["chosen"]}]), hf_encoder, 256).examples[0]
    assert pair.prompt + pair.chosen == sft.tokens
    assert [False] * len(pair.prompt) + [True] * len(pair.chosen) == sft.loss_mask
    generation = hf_encoder.tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], chat_template=hf_encoder.chat_template,
        add_generation_prompt=True, tokenize=False)
    assert pair.prompt == hf_encoder.tokenizer.encode(generation, add_special_tokens=False)
    decode = hf_encoder.tokenizer.decode
    assert decode(pair.chosen).replace(" ", "") == "returnx+1</s>"
    assert decode(pair.rejected).replace(" ", "") == "pass</s>"


def test_sentencepiece_codec_gives_the_hf_tokenizers_ids(hf_encoder, codec, tmp_path):
    """What the PyTorch side tokenizes with (SentencePiece and its own Jinja rendering) agrees
    with the MLX side's transformers tokenizer, for string and chat prompts alike."""
    rows = [{"prompt": "def f(x):  <s> y", "chosen": "return x\n+ 1", "rejected": "pass"},
            {"prompt": PROMPT, "chosen": "a b s", "rejected": "a b d"},
            *ends_with_rows(6, seed=1)]
    ours, theirs = load_rows(tmp_path, rows, codec), load_rows(tmp_path, rows, hf_encoder)
    assert ours.pairs == theirs.pairs
    for template in (None, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                           "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"):
        string_rows = rows[:1] + rows[2:] if template is None else rows
        ours = load_rows(tmp_path, string_rows, SentencePieceCodec(codec.tokenizer, template))
        hf_encoder_2 = type(hf_encoder)(hf_encoder.tokenizer, template)
        assert ours.pairs == load_rows(tmp_path, string_rows, hf_encoder_2).pairs


def test_row_layouts_give_the_same_pair(codec, tmp_path):
    flat = {"prompt": PROMPT, "chosen": "a b s", "rejected": "a b d"}
    layouts = [
        {"messages": PROMPT, "chosen": "a b s", "rejected": "a b d"},
        {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "a b s"},
         "rejected": [{"role": "assistant", "content": "a b d"}]},
        # UltraFeedback: each answer repeats the conversation; the prompt may be left out.
        {"chosen": [*PROMPT, {"role": "assistant", "content": "a b s"}],
         "rejected": [*PROMPT, {"role": "assistant", "content": "a b d"}]},
        {"prompt": PROMPT, "chosen": [*PROMPT, {"role": "assistant", "content": "a b s"}],
         "rejected": "a b d", "score_chosen": 8.0},
    ]
    expected = load_rows(tmp_path, [flat], codec).pairs
    for layout in layouts:
        assert load_rows(tmp_path, [layout], codec).pairs == expected, layout
    user_only = load_rows(tmp_path, [{"prompt": "A B C", "chosen": "x", "rejected": "y"}], codec)
    as_messages = load_rows(tmp_path, [{"prompt": [{"role": "user", "content": "A B C"}],
                                        "chosen": "x", "rejected": "y"}], codec)
    assert user_only.pairs == as_messages.pairs


def test_without_a_template_the_prompt_is_bos_plus_text(codec, tmp_path):
    plain = SentencePieceCodec(codec.tokenizer, None)
    pair = load_rows(tmp_path, [{"prompt": "A B", "chosen": "a b", "rejected": "a"}], plain).pairs[0]
    encode = codec.tokenizer.encode
    assert pair == PreferencePair([1, *encode("A B")], [*encode("a b"), 2], [*encode("a"), 2])


def test_long_pairs_lose_prompt_tokens_after_the_first(codec, tmp_path):
    long_prompt = " ".join(["word"] * 60)
    rows = [{"prompt": long_prompt, "chosen": "short", "rejected": "a longer answer here"},
            {"prompt": "A", "chosen": " ".join(["b"] * 80), "rejected": "c"},
            {"prompt": "A", "chosen": "same", "rejected": "same"},
            {"prompt": "A", "chosen": "b", "rejected": "c"}]
    full = load_rows(tmp_path, rows, codec, 1024)
    split = load_rows(tmp_path, rows, codec, 40)
    assert (len(full.pairs), split.truncated, split.dropped, split.ties) == (3, 1, 1, 1)
    whole, cut = full.pairs[0], split.pairs[0]
    assert len(cut) == 40 and len(whole) > 40
    assert cut.prompt == whole.prompt[:1] + whole.prompt[len(whole.prompt) - len(cut.prompt) + 1:]
    assert (cut.chosen, cut.rejected) == (whole.chosen, whole.rejected)
    assert split.pairs[1] == full.pairs[2]
    assert split.summary() == (
        f"train.jsonl: 4 preference pairs, {split.num_tokens} tokens, 1 truncated from the "
        "prompt side to --max-seq-length, 1 dropped (an answer alone is longer than "
        "--max-seq-length), 1 skipped (chosen and rejected are the same)")
    with pytest.raises(ElmError, match=r"train.jsonl: none of its 4 pairs fits --max-seq-length 2"):
        load_rows(tmp_path, rows, codec, 2)


def test_batches_score_exactly_the_answer_tokens(codec, tmp_path):
    split = load_rows(tmp_path, ends_with_rows(5, seed=2), codec)
    pairs = split.pairs
    batch = preference_batch(pairs[:3], [0, 1, 2], 256)
    assert batch.inputs.shape == (6, 32) and batch.num_pairs == 3
    for r, (pair, answer) in enumerate([(p, p.chosen) for p in pairs[:3]]
                                       + [(p, p.rejected) for p in pairs[:3]]):
        scored = batch.targets[r][batch.weights[r] == 1].tolist()
        assert scored == answer
        assert batch.inputs[r, : len(pair.prompt)].tolist() == pair.prompt
    assert batch.num_tokens == sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected)
                                   for p in pairs[:3])
    stream = preference_stream(split, 2, 256, seed=0, training=True)
    assert [len(b) for b in stream.plan] == [2, 2]  # the remainder is left out of training
    assert len(preference_stream(split, 2, 256, seed=0, training=False)) == 3
    assert [stream.training_batch(s).indices.tolist() for s in range(4)] == \
        [preference_stream(split, 2, 256, 0, True).training_batch(s).indices.tolist()
         for s in range(4)]


@pytest.mark.parametrize(("row", "message"), [
    ({"chosen": "a", "rejected": "b"}, 'missing "prompt"'),
    ({"prompt": "A", "rejected": "b"}, 'missing "chosen"'),
    ({"prompt": "A", "chosen": "a", "rejected": 3}, '"rejected" must be a string'),
    ({"prompt": "A", "chosen": " ", "rejected": "b"}, '"chosen" is empty'),
    ({"prompt": "A", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
     '"chosen" must end with an assistant message'),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     'prompt[0] needs a string "content"'),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
     "prompt[0] needs a role of system, user, assistant"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "chosen": "a", "rejected": "b"}, '"prompt" ends with an assistant message'),
    ({"prompt": "A", "chosen": [{"role": "user", "content": "B"},
                                {"role": "assistant", "content": "a"}], "rejected": "b"},
     'the messages before the answer in "chosen" differ from "prompt"'),
    ({"messages": [], "chosen": "a", "rejected": "b"}, '"messages" must be a non-empty list'),
])
def test_bad_rows_name_file_line_and_key(codec, tmp_path, row, message):
    good = {"prompt": "A", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, row])
    with pytest.raises(ElmError) as caught:
        load_preference_split(path, codec, 256)
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)


def test_chat_prompts_without_a_template_and_missing_files(codec, tmp_path):
    plain = SentencePieceCodec(codec.tokenizer, None)
    with pytest.raises(ElmError, match=r"train.jsonl:1: chat prompts need a chat template"):
        load_rows(tmp_path, [{"prompt": PROMPT, "chosen": "a", "rejected": "b"}], plain)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ElmError, match=r"empty: no train\.jsonl"):
        load_preference_dir(tmp_path / "empty", codec, 256)


def test_reference_losses_at_known_points():
    """h = 0 (policy = reference): sigmoid loss log 2, IPO 1/(4 beta^2), rewards 0 and the
    accuracy of a coin; one hand-computed pair for each variant."""
    zero = dpo_reference([-3.0, -5.0], [-4.0, -2.0], [-3.0, -5.0], [-4.0, -2.0], beta=0.1)
    assert zero == pytest.approx({"loss": math.log(2), "chosen_reward": 0.0,
                                  "rejected_reward": 0.0, "reward_margin": 0.0,
                                  "reward_accuracy": 0.5})
    assert dpo_reference([0.0], [0.0], [0.0], [0.0], 0.5, ipo=True)["loss"] == pytest.approx(1.0)
    # h = (-1 - -3) - (-2 - -2) = 2, beta 0.5: -log s(1), smoothed 0.1: 0.9 * that + 0.1 * -log s(-1)
    sig = dpo_reference([-1.0], [-3.0], [-2.0], [-2.0], 0.5, label_smoothing=0.1)
    assert sig["loss"] == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e))
    assert (sig["chosen_reward"], sig["rejected_reward"], sig["reward_accuracy"]) == \
        pytest.approx((0.5, -0.5, 1.0))
    # ORPO, one pair of one-token answers with p = 1/2 and 1/4: odds 1 and 1/3.
    orpo = orpo_reference([math.log(0.5)], [math.log(0.25)], [1], [1], beta=0.2)
    assert orpo["loss"] == pytest.approx(math.log(2) + 0.2 * math.log1p(1 / 3))
    assert np.isclose(orpo["reward_margin"], 0.2 * math.log(2))
