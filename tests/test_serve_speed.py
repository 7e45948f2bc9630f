"""`elm serve --draft-model` and `--kv-bits`: requests decoded one at a time through mlx-lm's
speculative (or quantized-cache) step, the same greedy tokens as without a draft, the prompt
cache still shared, and requests a draft cannot serve refused with a 400."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.chat import common_prefix, running_server
from support.cli import run_cli

from elm_mlx import load
from elm_mlx.generate import encode_prompt, load_draft, stream_generate
from elm_mlx.serving import (
    Engine,
    Event,
    Request,
    Speedups,
    load_saved_prefix,
    load_served_models,
)
from elm_spec import ElmError, ModelSpec

PROMPTS = ["def f(x):", "import os", "class A:", "for i in range(3):"]
TOKENS = 16


@pytest.fixture(scope="module")
def target(make_model_dir) -> Path:
    return make_model_dir(ModelSpec.from_preset("elm-tiny").replace(head_dim=32), seed=3)


@pytest.fixture(scope="module")
def draft(make_model_dir) -> Path:
    return make_model_dir(ModelSpec.from_preset("elm-tiny").replace(num_transformer_layers=2),
                          seed=11)


def greedy(model_dir: Path, prompt: str, **options) -> list[int]:
    model, tokenizer = load(model_dir)
    return [r.token for r in stream_generate(model, tokenizer, encode_prompt(tokenizer, prompt),
                                             max_tokens=TOKENS, **options)]


def serve_all(engine: Engine, prompts: list[list[int]]) -> list[list[Event]]:
    """Submit every prompt at once; each one's events, once all have finished."""
    results: list[list[Event]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collector(index: int):
        def emit(event: Event) -> None:
            results[index].append(event)
            if event.finish_reason is not None:
                done[index].set()
        return emit

    for index, prompt in enumerate(prompts):
        engine.submit(Request(prompt, TOKENS), collector(index))
    for event in done:
        assert event.wait(120)
    return results


def test_a_draft_engine_gives_the_tokens_of_plain_greedy_decoding(target: Path, draft: Path) -> None:
    models = load_served_models(target)
    served = next(iter(models.values()))
    speedups = Speedups(load_draft(draft, target, served.model, served.tokenizer), 2)
    engine = Engine(models, max_batch=8, speedups=speedups).start()
    try:
        assert engine.max_batch == 1  # one request at a time
        prompts = [encode_prompt(served.tokenizer, text) for text in PROMPTS]
        first = serve_all(engine, prompts)
        again = serve_all(engine, prompts[:1])  # its prefix is in the prompt cache now
    finally:
        engine.close()
    for text, events in zip(PROMPTS, first, strict=True):
        assert [e.token for e in events] == greedy(target, text)
        assert events[-1].finish_reason == "length"
    assert first[0][0].cached_tokens == 0
    assert [e.token for e in again[0]] == [e.token for e in first[0]]
    assert again[0][0].cached_tokens == len(prompts[0]) - 1


def test_a_kv_bits_engine_decodes_as_mlx_lm_does(target: Path) -> None:
    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream_generate

    models = load_served_models(target)
    engine = Engine(models, speedups=Speedups(kv_bits=8, kv_group_size=32,
                                              quantized_kv_start=0)).start()
    tokenizer = next(iter(models.values())).tokenizer
    try:
        results = serve_all(engine, [encode_prompt(tokenizer, text) for text in PROMPTS[:2]])
    finally:
        engine.close()
    peer, peer_tokenizer = mlx_lm_load(str(target), tokenizer_config={"trust_remote_code": False})
    for text, events in zip(PROMPTS, results, strict=False):
        expected = [r.token for r in mlx_lm_stream_generate(
            peer, peer_tokenizer, encode_prompt(peer_tokenizer, text), max_tokens=TOKENS,
            kv_bits=8, kv_group_size=32, quantized_kv_start=0)]
        assert [e.token for e in events] == expected


def test_serve_refuses_kv_bits_with_a_draft(target: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "serve", "--model", str(target), "--draft-model", str(target),
                           "--kv-bits", "8")
    assert code == 1 and err.count("\n") == 1 and "--kv-bits" in err and "--draft-model" in err
    with pytest.raises(ElmError, match="--kv-bits"):
        Engine(load_served_models(target), speedups=Speedups(object(), kv_bits=8))


@pytest.mark.slow
def test_a_draft_server_answers_like_elm_generate(target: Path, draft: Path) -> None:
    openai = pytest.importorskip("openai")
    with running_server("--model", str(target), "--draft-model", str(draft)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        answers: dict[str, str] = {}

        def ask(prompt: str) -> None:
            answers[prompt] = client.completions.create(
                model="default", prompt=prompt, max_tokens=TOKENS, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        model, tokenizer = load(target)
        for prompt in PROMPTS:
            expected = "".join(r.text for r in stream_generate(
                model, tokenizer, list(tokenizer.encode(prompt)), max_tokens=TOKENS))
            assert answers[prompt] == expected
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="default", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, stream=True))
        assert streamed == answers[PROMPTS[0]]
        for extra in ({"response_format": {"type": "json_object"}}, {"repetition_penalty": 1.3}):
            with pytest.raises(openai.BadRequestError, match="--draft-model"):
                client.completions.create(model="default", prompt="hi", max_tokens=4,
                                          extra_body=extra)
        assert client.completions.create(model="default", prompt="x", max_tokens=2).choices


def test_a_prompt_cache_file_serves_every_request_that_begins_as_it_does(
        target: Path, draft: Path, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "prefix.safetensors"
    prefix = "import os\nimport sys\n"
    code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", prefix,
                           "-m", "1", "--save-prompt-cache", str(saved))
    assert code == 0, err
    models = load_served_models(target)
    tokenizer = next(iter(models.values())).tokenizer
    held = encode_prompt(tokenizer, prefix)
    engine = Engine(models, prompt_cache_size=1,
                    saved_prefix=load_saved_prefix(saved, models, target)).start()
    texts = [prefix + "def f(x):", prefix + "class A:", *PROMPTS]
    prompts = [encode_prompt(tokenizer, text) for text in texts]
    try:
        first = serve_all(engine, prompts)
        again = serve_all(engine, prompts[:1])  # after more prompts than the shared cache keeps
    finally:
        engine.close()
    for text, prompt, events in zip(texts, prompts, first, strict=True):
        assert [e.token for e in events] == greedy(target, text)
        # all admitted together: what is cached comes from the file (at least BOS for the
        # others), short of the prompt's last token, whose logits start the answer
        shared = min(common_prefix(held, prompt), len(prompt) - 1)
        assert events[0].cached_tokens == shared > 0
    assert first[0][0].cached_tokens == first[1][0].cached_tokens > 5
    assert [e.token for e in again[0]] == [e.token for e in first[0]]
    assert again[0][0].cached_tokens >= first[0][0].cached_tokens

    twin = tmp_path / "twin.safetensors"  # another model's file, a draft, an mlx-lm file
    code, _, err = run_cli(capsys, "generate", "--model", str(draft), "--prompt", prefix,
                           "-m", "1", "--save-prompt-cache", str(twin))
    assert code == 0, err
    for flags, named in (([str(twin)], "made for another model"),
                         ([str(saved), "--draft-model", str(draft)], "--draft-model"),
                         ([str(tmp_path / "absent.safetensors")], "no such file")):
        code, _, err = run_cli(capsys, "serve", "--model", str(target), "--prompt-cache-file",
                               *flags)
        assert code == 1 and err.count("\n") == 1 and named in err, err
