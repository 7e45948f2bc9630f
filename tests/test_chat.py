"""elm_mlx.chat.ChatSession: the KV cache kept across turns, so turn N prefills only turn N."""

from __future__ import annotations

import pytest
from support.chat import with_template

import elm_mlx
from elm_mlx.chat import ChatSession, TurnStats
from elm_mlx.generate import encode_messages
from elm_spec.chat_template import shipped_chat_template

TURNS = ["hello there", "def f(x): return x", "import os", "what is a class?", "print it"]


@pytest.fixture(scope="module")
def chat_model(make_model_dir, tmp_path_factory):
    directory = with_template(make_model_dir(), tmp_path_factory.mktemp("chat") / "model",
                              shipped_chat_template())
    return elm_mlx.load(directory)


def count_fed_tokens(monkeypatch, model) -> list[int]:
    """The token count of every forward call of MODEL's class from now on."""
    fed: list[int] = []
    forward = type(model).__call__

    def counting(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[1])
        return forward(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counting)
    return fed


def test_turn_n_prefills_only_the_new_turn(chat_model, monkeypatch):
    model, tokenizer = chat_model
    options = {"max_tokens": 6}
    session = ChatSession(model, tokenizer, "be brief", options)
    fed = count_fed_tokens(monkeypatch, model)
    stats: list[TurnStats] = []
    previous_prompt: list[int] = []
    held: list[int] = []  # what the cache holds after the last turn: its prompt and answer
    for turn, text in enumerate(TURNS, 1):
        fed.clear()
        answer = [response.token for response in session.send(text, stats)]
        fed_with_cache = sum(fed)
        ids = encode_messages(tokenizer, session.conversation()[:-1])
        assert ids[:len(previous_prompt)] == previous_prompt, "history renders as a prefix"
        # The answer's tokens are reused as far as the history re-encodes them the same way.
        reused = next((i for i, (a, b) in enumerate(zip(ids, held, strict=False)) if a != b),
                      min(len(ids), len(held)))
        assert reused >= len(previous_prompt)
        assert stats[-1].prompt_tokens == len(ids)
        assert stats[-1].prefilled_tokens == len(ids) - reused, f"turn {turn}"
        if turn > 1:
            assert stats[-1].prefilled_tokens < len(ids) / 2

        # The same turn from an empty cache: the whole history is prefilled, the answer is the same.
        fresh = ChatSession(model, tokenizer, "be brief", options)
        fresh.messages = [dict(m) for m in session.messages[:-2]]
        fed.clear()
        assert [response.token for response in fresh.send(text)] == answer
        assert sum(fed) - fed_with_cache == reused, "tokens the model really ran"
        previous_prompt, held = ids, ids + answer
