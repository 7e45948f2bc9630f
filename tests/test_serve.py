"""`elm serve` as a real process on a loopback port, talked to by the official openai client."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest
from support.chat import random_adapters, running_server, with_template
from support.cli import run_elm
from support.lora import write_jsonl

from elm_spec.chat_template import shipped_chat_template

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

KEY = "test-key"
PROMPTS = ["def f(x):", "import os", "class A:", "return None", "for i in range(3):",
           "x = [1, 2]", "while True:", "print('hi')"]


@pytest.fixture(scope="module")
def models(make_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served")
    base = with_template(make_model_dir(seed=5), root / "base", shipped_chat_template())
    return base, random_adapters(base, root / "tuned", None)


@pytest.fixture(scope="module")
def server(models):
    base, tuned = models
    with running_server("--model", str(base), "--adapter-path", str(tuned), "--api-key", KEY,
                        "--max-tokens", "12", "--max-body-bytes", "20000") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def reference(model_dir: Path, prompt: str, max_tokens: int, adapter: Path | None = None,
              chat: bool = False) -> str:
    """Greedy text from elm_mlx in this process (what `elm generate` prints)."""
    import elm_mlx
    from elm_mlx.generate import encode_prompt, generate

    model, tokenizer = elm_mlx.load(model_dir, adapter_path=adapter)
    return generate(model, tokenizer, encode_prompt(tokenizer, prompt, use_chat_template=chat),
                    max_tokens=max_tokens)


def raw(url: str, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    host = url.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.request(method, path, body=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else {}


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tuned", "base"]
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_greedy_output_equals_elm_generate(models, client):
    base, tuned = models
    for model, adapter_args in (("base", []), ("tuned", ["--adapter-path", str(tuned)])):
        generated = run_elm("generate", "--model", str(base), *adapter_args, "--prompt", "def f(x):",
                            "--ignore-chat-template", "--quiet", "-m", "12")
        assert generated.returncode == 0, generated.stderr
        served = client.completions.create(model=model, prompt="def f(x):", max_tokens=12,
                                           temperature=0)
        assert served.choices[0].text == generated.stdout.removesuffix("\n")
        assert served.usage.completion_tokens == 12
    chat = run_elm("generate", "--model", str(base), "--prompt", "A B", "--quiet", "-m", "12")
    served = client.chat.completions.create(model="base", max_tokens=12,
                                            messages=[{"role": "user", "content": "A B"}])
    assert served.choices[0].message.content == chat.stdout.removesuffix("\n")


def test_adapters_are_chosen_per_request(models, client):
    base, tuned = models
    texts = {}
    for name, adapter in (("base", None), ("tuned", tuned)):
        texts[name] = client.chat.completions.create(
            model=name, max_tokens=8, messages=[{"role": "user", "content": "hello"}],
        ).choices[0].message.content
        assert texts[name] == reference(base, "hello", 8, adapter, chat=True)
    assert texts["base"] != texts["tuned"]
    by_field = client.chat.completions.create(
        model="base", max_tokens=8, messages=[{"role": "user", "content": "hello"}],
        extra_body={"adapter": "tuned"})
    assert by_field.choices[0].message.content == texts["tuned"]


def test_streaming_matches_the_whole_answer(client):
    whole = client.chat.completions.create(model="base", max_tokens=10,
                                           messages=[{"role": "user", "content": "hi"}])
    chunks = list(client.chat.completions.create(
        model="base", max_tokens=10, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="import os", max_tokens=6, stream=True))
    assert streamed == client.completions.create(model="base", prompt="import os",
                                                 max_tokens=6).choices[0].text


def test_sse_ends_with_done(server):
    host = server.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": "base", "prompt": "x", "max_tokens": 3, "stream": True}),
        headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.getheader("content-type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 4


def test_logprobs_are_the_models(models, client):
    import mlx.core as mx

    import elm_mlx

    served = client.completions.create(model="base", prompt="def f(x):", max_tokens=4, logprobs=3)
    logprobs = served.choices[0].logprobs
    # The legacy format keys alternatives by their text: tokens that decode alike share a key.
    assert len(logprobs.token_logprobs) == 4 and all(1 <= len(t) <= 3 for t in logprobs.top_logprobs)
    model, tokenizer = elm_mlx.load(models[0])
    logits = model(mx.array([tokenizer.encode("def f(x):")]))[0, -1]
    top3 = mx.argsort(-logits)[:3].tolist()
    assert len(logprobs.top_logprobs[0]) == len({tokenizer.decode([t]) for t in top3})
    expected = (logits - mx.logsumexp(logits)).max().item()
    assert logprobs.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(expected, abs=1e-4)
    chat = client.chat.completions.create(model="base", max_tokens=3, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "hi"}])
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_stop_strings_across_token_boundaries(client):
    text = client.completions.create(model="base", prompt="class A:", max_tokens=12).choices[0].text
    stop = text[4:8]
    stopped = client.completions.create(model="base", prompt="class A:", max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_eight_concurrent_clients_get_their_own_answers(models, client):
    expected = {p: reference(models[0], p, 12) for p in PROMPTS}
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        results[prompt] = client.completions.create(model="base", prompt=prompt,
                                                    max_tokens=12).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["a", "b", "c"]}}}}


def test_json_schema_outputs_validate(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for index in range(20):
        answer = client.chat.completions.create(
            model="tuned", max_tokens=60, temperature=1.0, seed=index,
            messages=[{"role": "user", "content": f"person {index}"}],
            response_format=response_format)
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)


BAD_REQUESTS = [
    ("bad JSON", "/v1/completions", b"{not json", {}, 400),
    ("not an object", "/v1/completions", b"[1, 2]", {}, 400),
    ("missing prompt", "/v1/completions", {"max_tokens": 2}, {}, 400),
    ("prompt of the wrong type", "/v1/completions", {"prompt": 12}, {}, 400),
    ("max_tokens a string", "/v1/completions", {"prompt": "x", "max_tokens": "4"}, {}, 400),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, {}, 400),
    ("temperature too high", "/v1/completions", {"prompt": "x", "temperature": 9}, {}, 400),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, {}, 404),
    ("missing auth", "/v1/completions", {"prompt": "x"}, {"Authorization": ""}, 401),
    ("wrong key", "/v1/models", None, {"Authorization": "Bearer nope"}, 401),
    ("too large", "/v1/completions", {"prompt": "x" * 30000}, {}, 413),
    ("n of 2", "/v1/completions", {"prompt": "x", "n": 2}, {}, 400),
    ("no messages", "/v1/chat/completions", {"messages": []}, {}, 400),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, {}, 400),
    ("five stops", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, {}, 400),
    ("bad response_format", "/v1/completions", {"prompt": "x", "response_format": {"type": "xml"}},
     {}, 400),
    ("over the context", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, {}, 400),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 99999]}, {}, 400),
    ("unknown path", "/v1/engines", None, {}, 404),
    ("wrong method", "/v1/completions", None, {}, 405),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    for what, path, body, headers, status in BAD_REQUESTS:
        method = "GET" if body is None else "POST"
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        got, _, answer = raw(server, method, path, data, headers)
        assert got == status, (what, got, answer)
        assert isinstance(answer["error"]["message"], str) and answer["error"]["message"], what
    assert client.completions.create(model="base", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert raw(server, "GET", "/health")[0] == 200


@pytest.fixture(scope="module")
def one_at_a_time(make_model_dir, tmp_path_factory):
    """A server that decodes one request at a time and queues one more, for a base model with a
    long context and "json": the base fully fine-tuned on short JSON objects (which, sampled
    freely, it gets wrong)."""
    import dataclasses
    import random

    from elm_mlx.lora.config import build_config
    from elm_mlx.lora.train import finetune
    from elm_spec import ModelSpec

    root = tmp_path_factory.mktemp("queue")
    spec = dataclasses.replace(ModelSpec.from_preset("elm-tiny"), max_context_length=4096)
    base = with_template(make_model_dir(spec, seed=2), root / "base", shipped_chat_template())
    rng = random.Random(0)
    rows = [{"prompt": f"object {i}", "completion": json.dumps(
        {"id": i, "name": rng.choice(["red", "tree", "cat", "key"]), "ok": rng.random() < 0.5},
        separators=(",", ":"))} for i in range(40)]
    write_jsonl(root / "data" / "train.jsonl", rows)
    write_jsonl(root / "data" / "valid.jsonl", rows[:8])
    finetune(build_config(None, dict(
        model=str(base), data=str(root / "data"), adapter_path=str(root / "json"),
        fine_tune_type="full", iters=150, batch_size=4, learning_rate=3e-3, warmup=10,
        steps_per_eval=150, steps_per_report=150, val_batches=-1)))
    with running_server("--model", str(base), "--adapter-path", str(root / "json"),
                        "--max-batch", "1", "--max-queue", "1") as url:
        yield url


def test_json_object_outputs_parse(one_at_a_time):
    client = openai.OpenAI(base_url=f"{one_at_a_time}/v1", api_key="none", max_retries=0)

    def answers(**response_format):
        for index in range(20):
            yield client.chat.completions.create(
                model="json", max_tokens=200, temperature=1.0, seed=index,
                messages=[{"role": "user", "content": f"object {100 + index}"}],
                **response_format).choices[0]

    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    for answer in answers(response_format={"type": "json_object"}):
        assert answer.finish_reason == "stop", answer
        assert isinstance(json.loads(answer.message.content), dict), answer
    assert not all(parses(answer.message.content) for answer in answers())  # the constraint works


def open_stream(url: str, max_tokens: int) -> http.client.HTTPConnection:
    """A streamed completion, sent; its response is not read yet."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": "base", "prompt": "x", "max_tokens": max_tokens, "stream": True}))
    return connection


def wait_in_flight(url: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while raw(url, "GET", "/health")[2]["in_flight"] != count:
        assert time.monotonic() < deadline, f"in_flight never reached {count}"
        time.sleep(0.02)


def test_a_full_queue_answers_503_with_retry_after(one_at_a_time):
    url = one_at_a_time
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    decoding = open_stream(url, 4000)
    assert decoding.getresponse().read(6) == b"data: "  # its first token: it decodes
    waiting = open_stream(url, 4000)
    wait_in_flight(url, 2)  # the second waits in the queue
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model="base", prompt="x", max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "server_busy"
    decoding.close()  # the queued request starts once the first is cancelled
    assert waiting.getresponse().read(6) == b"data: "
    waiting.close()
    wait_in_flight(url, 0)
    assert client.completions.create(model="base", prompt="x",
                                     max_tokens=2).usage.completion_tokens == 2


def test_a_disconnect_cancels_the_work(server):
    host = server.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": "base", "prompt": "x", "max_tokens": 200, "stream": True}),
        headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    response.fp.readline()
    assert raw(server, "GET", "/health")[2]["in_flight"] == 1
    connection.close()
    deadline = time.monotonic() + 2.0
    while raw(server, "GET", "/health")[2]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw(server, "GET", "/health")[2]["in_flight"] == 0

