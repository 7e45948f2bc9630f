"""`elm generate` and `elm_mlx.generate`: the same tokens as the PyTorch twin and as mlx-lm,
sampling options wired to mlx-lm's samplers, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from support.cli import run_cli, run_elm

from elm_mlx import load
from elm_mlx.generate import encode_prompt, generate, stream_generate
from elm_mlx.matvec import matvec_on_cpu
from elm_spec import ElmError, ModelSpec
from elm_spec.tokenizer import write_tokenizer_files
from elm_train import load_model as load_torch_model

PROMPT = "def read_config(path):\n    with open(path) as handle:"

pytestmark = pytest.mark.usefixtures("single_torch_thread")
NO_REMOTE_CODE = {"trust_remote_code": False}


@pytest.fixture(scope="module")
def model_dir(make_model_dir) -> Path:
    spec = ModelSpec.from_preset("elm-tiny").replace(share_input_output_layers=False)
    return make_model_dir(spec, seed=3)


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load(model_dir)


def torch_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    model = load_torch_model(model_dir)
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def tokens_of(model, tokenizer, prompt, **options) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, **options)]


def test_greedy_tokens_match_the_torch_twin_with_and_without_matvec(model_dir: Path, loaded,
                                                                    monkeypatch) -> None:
    # Route every layer of the tiny model, not only the large ones.
    monkeypatch.setattr("elm_mlx.matvec.MATVEC_MIN_WEIGHT_BYTES", 0)
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, PROMPT)
    assert ids[0] == 1  # the tokenizer's BOS, as mlx-lm adds it
    reference = torch_greedy(model_dir, ids, 24)
    reference = reference[: reference.index(2) + 1] if 2 in reference else reference
    assert tokens_of(model, tokenizer, ids, max_tokens=24, matvec=True) == reference
    assert tokens_of(model, tokenizer, ids, max_tokens=24, matvec=False) == reference


def test_matvec_route_restores_the_model_and_matches_mlx(loaded) -> None:
    model, _ = loaded
    before = {name: id(value) for name, value in tree_flatten(model.parameters())}
    ids = mx.array([[1, 40, 41, 42, 43]])
    plain = model(ids)
    with matvec_on_cpu(model, enabled=True, min_weight_bytes=0):
        assert type(model.layers[0].attn.qkv_proj).__name__ == "_MatvecLinear"
        assert type(model.lm_head).__name__ == "_MatvecLinear"
        routed = model(ids[:, -1:])
        prefill = model(ids)
    assert {name: id(value) for name, value in tree_flatten(model.parameters())} == before
    assert type(model.layers[0].attn.qkv_proj).__name__ == "Linear"
    assert np.abs(np.array(prefill) - np.array(plain)).max() == 0.0
    one_token = model(ids[:, -1:])
    assert np.abs(np.array(routed) - np.array(one_token)).max() < 1e-5


def test_cli_streams_the_text_mlx_lm_generates(model_dir: Path, capsys) -> None:
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    code, out, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", PROMPT,
                             "--max-tokens", "16")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "=" * 10
    assert any(line.startswith("Prompt: ") and "tokens-per-sec" in line for line in lines)
    assert any(line.startswith("Generation: ") and "tokens-per-sec" in line for line in lines)
    assert lines[-1].startswith("Peak memory: ") and lines[-1].endswith(" GB")
    text = out.split("=" * 10 + "\n", 1)[1].rsplit("\n" + "=" * 10, 1)[0]
    # an interchange directory's auto_map names Apple's remote code, which transformers 5 would
    # otherwise offer to run (on stdout) while reading the tokenizer
    peer_model, peer_tokenizer = mlx_lm_load(str(model_dir), tokenizer_config=NO_REMOTE_CODE)
    assert text == mlx_lm_generate(peer_model, peer_tokenizer, PROMPT, max_tokens=16)
    prompt_tokens = len(encode_prompt(peer_tokenizer, PROMPT))
    assert f"Prompt: {prompt_tokens} tokens," in out

    code, quiet, _ = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", PROMPT,
                             "--max-tokens", "16", "--quiet")
    assert code == 0 and quiet == text + "\n"


def test_prompt_from_stdin_in_a_real_process(model_dir: Path, capsys) -> None:
    args = ("generate", "--model", str(model_dir), "--max-tokens", "8", "--quiet")
    from_stdin = run_elm(*args, "--prompt", "-", input=PROMPT)
    _, from_flag, _ = run_cli(capsys, *args, "--prompt", PROMPT)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_flag and from_flag.strip()


def test_sampling_options_reach_mlx_lm_samplers(loaded) -> None:
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, PROMPT)
    greedy = tokens_of(model, tokenizer, ids, max_tokens=12)
    hot = {"max_tokens": 12, "temp": 5.0}
    first = tokens_of(model, tokenizer, ids, seed=1, **hot)
    assert tokens_of(model, tokenizer, ids, seed=1, **hot) == first
    assert first != greedy
    # Each filter alone, at its extreme, keeps only the most likely token: greedy again.
    assert tokens_of(model, tokenizer, ids, seed=2, top_k=1, **hot) == greedy
    assert tokens_of(model, tokenizer, ids, seed=2, min_p=1.0, **hot) == greedy
    assert tokens_of(model, tokenizer, ids, seed=2, top_p=1e-9, **hot) == greedy


def test_repetition_penalty_stops_repeats(loaded) -> None:
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, PROMPT)
    window = 8
    tokens = tokens_of(model, tokenizer, ids, max_tokens=24, repetition_penalty=1e6,
                       repetition_context_size=window)
    history = ids + tokens
    for position in range(len(ids), len(history)):
        assert history[position] not in history[max(0, position - window):position]


def test_max_kv_size_uses_a_rotating_cache(loaded) -> None:
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, PROMPT)
    plain = tokens_of(model, tokenizer, ids, max_tokens=12)
    assert tokens_of(model, tokenizer, ids, max_tokens=12, max_kv_size=len(ids) + 64) == plain
    short = tokens_of(model, tokenizer, ids, max_tokens=12, max_kv_size=8)
    assert len(short) == 12 and short != plain


def test_matvec_route_under_dora_and_tied_lora_embedding(make_model_dir) -> None:
    """Adapter wrappers that read `.weight` directly keep working while the route is on."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from elm_mlx import load_model

    model = load_model(make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=4))
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 5.0, "dropout": 0.0,
                                     "keys": ["attn.qkv_proj", "ffn.proj_1"]}, use_dora=True)
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.ones(value.shape) * 0.05)]))
    ids = mx.array([[1, 50, 51, 52]])
    expected = np.array(model(ids[:, :1]))
    with matvec_on_cpu(model, enabled=True, min_weight_bytes=0):
        assert type(model.layers[-1].attn.qkv_proj.linear).__name__ == "_MatvecLinear"
        assert type(model.transformer.token_embeddings).__name__ == "_MatvecEmbedding"
        routed = np.array(model(ids[:, :1]))
    assert np.abs(routed - expected).max() < 1e-5


def make_adapter(model_dir: Path, destination: Path) -> Path:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from elm_mlx import load_model

    model = load_model(model_dir)
    parameters = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["attn.qkv_proj", "ffn.proj_2"]}
    linear_to_lora_layers(model, 2, parameters)
    adapters = {name: mx.random.normal(value.shape, key=mx.random.key(index)) * 0.5
                for index, (name, value) in enumerate(tree_flatten(model.parameters()))
                if name.endswith(("lora_a", "lora_b"))}
    destination.mkdir()
    mx.save_safetensors(str(destination / "adapters.safetensors"), adapters)
    (destination / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": parameters}))
    return destination


def test_adapter_path_changes_the_output_like_mlx_lm(model_dir: Path, tmp_path: Path, capsys) -> None:
    from mlx_lm import generate as mlx_lm_generate
    from mlx_lm import load as mlx_lm_load

    adapter = make_adapter(model_dir, tmp_path / "adapter")
    args = ("generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-tokens", "12", "--quiet")
    _, base, _ = run_cli(capsys, *args)
    code, adapted, err = run_cli(capsys, *args, "--adapter-path", str(adapter))
    assert code == 0, err
    assert adapted != base
    peer_model, peer_tokenizer = mlx_lm_load(str(model_dir), adapter_path=str(adapter),
                                             tokenizer_config=NO_REMOTE_CODE)
    assert adapted == mlx_lm_generate(peer_model, peer_tokenizer, PROMPT, max_tokens=12) + "\n"


def test_chat_template_only_where_the_tokenizer_has_one(model_dir: Path, tmp_path: Path,
                                                        loaded) -> None:
    _, tokenizer = loaded
    assert not tokenizer.has_chat_template
    assert encode_prompt(tokenizer, "hi") == tokenizer.encode("hi")
    with pytest.raises(ElmError, match="no chat template"):
        encode_prompt(tokenizer, "hi", use_chat_template=True)

    chat_dir = tmp_path / "chat"
    shutil.copytree(model_dir, chat_dir)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    write_tokenizer_files(chat_dir / "tokenizer.model", chat_dir, chat_template=template)
    _, chat_tokenizer = load(chat_dir)
    expected = chat_tokenizer.encode("<|system|>\nbe brief</s><|user|>\nhi</s><|assistant|>\n",
                                     add_special_tokens=False)
    assert encode_prompt(chat_tokenizer, "hi", system_prompt="be brief") == expected
    assert encode_prompt(chat_tokenizer, "hi", use_chat_template=False) == tokenizer.encode("hi")


# ----- bad inputs: one clear line naming the file or tensor, exit code 1 -----------------------

def _corrupt_header(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8:8 + header_len] = b"#" * header_len
    weights.write_bytes(bytes(data))


def _rewrite_tensors(weights: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))


def _set_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


BAD_INPUTS = {
    "missing config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-1000]), "model.safetensors: truncated"),
    "corrupt header": (lambda d: _corrupt_header(d / "model.safetensors"),
                       "model.safetensors: corrupt"),
    "wrong shape": (lambda d: _rewrite_tensors(d / "model.safetensors", lambda t: t.update(
        {"transformer.layers.1.ffn.proj_2.weight": np.zeros((64, 7), np.float32)})),
        "'transformer.layers.1.ffn.proj_2.weight' has shape [64, 7]"),
    "missing tensor": (lambda d: _rewrite_tensors(d / "model.safetensors", lambda t: t.pop(
        "transformer.layers.2.attn.q_norm.weight")),
        "'transformer.layers.2.attn.q_norm.weight' is missing"),
    "unknown model type": (lambda d: _set_config(d, model_type="llama"), "model_type 'llama'"),
    "missing tokenizer": (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_model_directory_gives_one_clear_line(model_dir: Path, tmp_path: Path, capsys,
                                                  case: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    damage, expected = BAD_INPUTS[case]
    damage(broken)
    code, out, err = run_cli(capsys, "generate", "--model", str(broken), "--prompt", "x")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert str(broken) in err
    assert "=" * 10 not in out


def test_unknown_adapter_path_gives_one_clear_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-adapter"
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--prompt", "x",
                           "--adapter-path", str(missing))
    assert code == 1 and err == f"error: {missing}: no adapter_config.json (not an adapter directory)\n"


def test_absent_model_directory_gives_one_clear_line(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "absent"), "--prompt", "x")
    assert code == 1
    assert err == f"error: {tmp_path / 'absent'}: not a model directory (it does not exist)\n"


def test_empty_prompt_and_bad_numbers_are_refused(loaded) -> None:
    model, tokenizer = loaded
    with pytest.raises(ElmError, match="max-tokens"):
        generate(model, tokenizer, [1, 5], max_tokens=0)
    with pytest.raises(ElmError, match="max-kv-size"):
        generate(model, tokenizer, [1, 5], max_kv_size=2)
