"""Faster generation in `elm generate` and `elm chat`: speculative decoding with a draft model
(greedy tokens unchanged), a quantized KV cache (as mlx-lm computes it) and prompt cache files
(only the new tokens prefilled, the same tokens as without the file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.chat import common_prefix
from support.cli import run_cli
from support.corpora import short_documents

from elm_mlx import load
from elm_mlx.generate import encode_prompt, stream_generate
from elm_spec import ElmError, ModelSpec

PROMPT = "def read_config(path):\n    with open(path) as handle:"
TOKENS = "24"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def target(make_model_dir) -> Path:
    # head_dim 32: the smallest the KV cache quantization groups allow
    return make_model_dir(ModelSpec.from_preset("elm-tiny").replace(head_dim=32), seed=3)


@pytest.fixture(scope="module")
def small_draft(make_model_dir) -> Path:
    """A smaller model over the same tokenizer (two layers instead of four)."""
    spec = ModelSpec.from_preset("elm-tiny").replace(num_transformer_layers=2)
    return make_model_dir(spec, seed=11)


def generated_text(capsys, *args: str) -> str:
    code, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--max-tokens", TOKENS,
                             "--quiet", *args)
    assert code == 0, err
    return out


def stats(capsys, *args: str) -> str:
    code, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--max-tokens", TOKENS, *args)
    assert code == 0, err
    return out


def test_a_draft_model_keeps_the_greedy_tokens(target: Path, small_draft: Path, capsys) -> None:
    plain = generated_text(capsys, "--model", str(target))
    assert generated_text(capsys, "--model", str(target), "--draft-model", str(small_draft)) == plain
    # the target drafting for itself: every drafted token is accepted
    out = stats(capsys, "--model", str(target), "--draft-model", str(target),
                "--num-draft-tokens", "4")
    assert out.split("=" * 10 + "\n", 1)[1].startswith(plain.rstrip("\n"))
    generated = int(out.split("Generation: ")[1].split()[0])
    drafted = int(out.split("Draft: ")[1].split()[0])
    # each round of 4 drafts ends with one token of the target's own
    assert drafted == generated - generated // 5

    # the same tokens, one by one, from the library with a smaller draft
    model, tokenizer = load(target)
    draft, _ = load(small_draft)
    ids = encode_prompt(tokenizer, PROMPT)
    alone = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=24)]
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=24, draft_model=draft,
                                     num_draft_tokens=2))
    assert [r.token for r in responses] == alone
    assert any(r.from_draft for r in responses) and not all(r.from_draft for r in responses)


def test_a_draft_with_another_vocabulary_is_one_error_line(target: Path, make_model_dir,
                                                           tmp_path: Path, capsys) -> None:
    from elm_spec.tokenizer import train_tokenizer

    wider = make_model_dir(ModelSpec.from_preset("elm-tiny").replace(vocab_size=640), seed=1)
    code, out, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", PROMPT,
                             "--draft-model", str(wider))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: --draft-model "), err
    assert str(wider) in err and str(target) in err and "640 vs 512 embedding rows" in err
    assert "=" * 10 not in out

    other = tmp_path / "other-tokenizer"
    shutil.copytree(target, other)
    for name in other.glob("tokenizer*"):
        name.unlink()
    train_tokenizer(iter(short_documents() * 20), 512, other)
    code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", PROMPT,
                           "--draft-model", str(other))
    assert code == 1 and err.count("\n") == 1 and "a different tokenizer" in err, err
    assert str(other) in err and str(target) in err


def test_draft_flags_that_cannot_work_are_refused(target: Path, capsys) -> None:
    for flags, named in ((["--num-draft-tokens", "0"], "--num-draft-tokens"),
                         (["--max-kv-size", "64"], "--max-kv-size"),
                         (["--repetition-penalty", "1.2"], "--repetition-penalty")):
        code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", PROMPT,
                               "--draft-model", str(target), *flags)
        assert code == 1 and err.count("\n") == 1 and named in err, err


def test_kv_bits_quantize_the_cache_as_mlx_lm_does(target: Path, capsys) -> None:
    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    text = generated_text(capsys, "--model", str(target), "--kv-bits", "4",
                          "--kv-group-size", "32", "--quantized-kv-start", "0")
    peer, peer_tokenizer = mlx_lm_load(str(target), tokenizer_config={"trust_remote_code": False})
    expected = "".join(r.text for r in mlx_lm_stream_generate(
        peer, peer_tokenizer, PROMPT, max_tokens=int(TOKENS), kv_bits=4, kv_group_size=32,
        quantized_kv_start=0))
    assert text == expected + "\n"

    model, tokenizer = load(target)
    cache = make_prompt_cache(model)
    list(stream_generate(model, tokenizer, PROMPT, max_tokens=2, prompt_cache=cache, kv_bits=4,
                         kv_group_size=32, quantized_kv_start=0))
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 4 for c in cache)


def test_bad_kv_flags_are_one_error_line(target: Path, make_model_dir, capsys) -> None:
    narrow = make_model_dir(seed=2)  # head_dim 16
    for model, flags, named in ((target, ["--kv-bits", "7"], "--kv-bits 7"),
                                (target, ["--kv-bits", "8", "--kv-group-size", "48"],
                                 "--kv-group-size 48"),
                                (target, ["--kv-bits", "8", "--quantized-kv-start", "-1"],
                                 "--quantized-kv-start"),
                                (narrow, ["--kv-bits", "8", "--kv-group-size", "32"],
                                 "head_dim 16")):
        code, _, err = run_cli(capsys, "generate", "--model", str(model), "--prompt", PROMPT,
                               *flags)
        assert code == 1 and err.count("\n") == 1 and named in err, err
    with pytest.raises(ElmError, match="--kv-bits 1 "):
        model, tokenizer = load(target)
        list(stream_generate(model, tokenizer, PROMPT, kv_bits=1))


@pytest.fixture(scope="module")
def chat_target(target: Path, tmp_path_factory) -> Path:
    from support.chat import with_template

    from elm_spec.chat_template import shipped_chat_template

    return with_template(target, tmp_path_factory.mktemp("chat") / "model", shipped_chat_template())


def chat(capsys, monkeypatch, lines: str, *args: str) -> tuple[str, list[str]]:
    """`elm chat --verbose ARGS` fed LINES: the answers and the turn statistics lines."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, err = run_cli(capsys, "chat", "--max-tokens", "12", "--verbose", *args)
    assert code == 0, err
    turns = [line for line in out.splitlines() if line.startswith("[prompt ")]
    answers = "\n".join(line for line in out.splitlines() if not line.startswith("[prompt "))
    return answers, turns


def test_chat_with_a_draft_answers_the_same_and_reuses_its_cache(chat_target: Path,
                                                                 small_draft: Path, capsys,
                                                                 monkeypatch) -> None:
    turns = "def f(x):\nand then?\n"
    plain = chat(capsys, monkeypatch, turns, "--model", str(chat_target))
    drafted = chat(capsys, monkeypatch, turns, "--model", str(chat_target),
                   "--draft-model", str(small_draft))
    assert len(plain[1]) == len(drafted[1]) == 2 and drafted[0] == plain[0]
    # turn 2 starts from turn 1's cache (the model's and the draft's) as it does without a draft
    first_prompt = int(drafted[1][0].split()[1])
    total, prefilled = int(drafted[1][1].split()[1]), int(drafted[1][1].split()[3])
    assert 0 < prefilled <= total - first_prompt
    assert drafted[1][1].split(";")[0] == plain[1][1].split(";")[0]


def test_chat_with_kv_bits_answers_as_mlx_lm_computes(chat_target: Path, capsys,
                                                      monkeypatch) -> None:
    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream_generate

    answers, turns = chat(capsys, monkeypatch, "def f(x):\nand then?\n", "--model", str(chat_target),
                 "--kv-bits", "8", "--kv-group-size", "32", "--quantized-kv-start", "0")
    peer, peer_tokenizer = mlx_lm_load(str(chat_target),
                                       tokenizer_config={"trust_remote_code": False})
    ids = encode_prompt(peer_tokenizer, "def f(x):", use_chat_template=True)
    expected = "".join(r.text for r in mlx_lm_stream_generate(
        peer, peer_tokenizer, ids, max_tokens=12, kv_bits=8, kv_group_size=32,
        quantized_kv_start=0))
    assert answers.startswith(expected + "\n") and len(turns) == 2


def test_chat_refuses_kv_bits_with_a_draft(chat_target: Path, capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    code, _, err = run_cli(capsys, "chat", "--model", str(chat_target), "--draft-model",
                           str(chat_target), "--kv-bits", "8", "--kv-group-size", "32")
    assert code == 1 and err.count("\n") == 1 and "--kv-bits" in err and "--draft-model" in err


PREFIX, REST = PROMPT.split("\n", 1)[0] + "\n", PROMPT.split("\n", 1)[1]


def count(out: str, label: str) -> int:
    return int(out.split(f"{label}: ")[1].split()[0])


def test_a_saved_prompt_cache_gives_the_same_tokens_prefilling_only_new_ones(
        target: Path, tmp_path: Path, capsys) -> None:
    from mlx_lm.models.cache import load_prompt_cache

    saved = tmp_path / "prefix.safetensors"
    out = stats(capsys, "--model", str(target), "--prompt", PREFIX, "--max-tokens", "3",
                "--save-prompt-cache", str(saved))
    _, tokenizer = load(target)
    prefix_ids = encode_prompt(tokenizer, PREFIX)
    assert f"Prompt cache saved: {saved} ({len(prefix_ids)} tokens)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [saved.name]  # no temporary left
    cache, metadata = load_prompt_cache(str(saved), return_metadata=True)  # mlx-lm reads it
    assert metadata["model"] == str(target) and cache[0].offset == len(prefix_ids)

    whole = generated_text(capsys, "--model", str(target))
    assert generated_text(capsys, "--model", str(target), "--prompt", REST,
                          "--prompt-cache-file", str(saved)) == whole
    out = stats(capsys, "--model", str(target), "--prompt", REST, "--prompt-cache-file", str(saved))
    full_ids = encode_prompt(tokenizer, PROMPT)
    reused = common_prefix(prefix_ids, full_ids)
    assert 0 < reused < len(full_ids)
    assert count(out, "Prompt") == len(full_ids) - reused
    assert f"Prompt cache: {reused} tokens reused from {saved}" in out


def test_a_prompt_cache_of_another_model_is_one_error_line(target: Path, small_draft: Path,
                                                           make_model_dir, tmp_path: Path,
                                                           capsys) -> None:
    saved = tmp_path / "cache.safetensors"
    stats(capsys, "--model", str(target), "--prompt", PREFIX, "-m", "1", "--save-prompt-cache",
          str(saved))
    twin = make_model_dir(ModelSpec.from_preset("elm-tiny").replace(head_dim=32), seed=4)
    for other in (small_draft, twin):  # other layers; the same layers with other weights
        code, out, err = run_cli(capsys, "generate", "--model", str(other), "--prompt", REST,
                                 "--prompt-cache-file", str(saved))
        assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: {saved}: "), err
        assert "made for another model" in err and "=" * 10 not in out
    for flags, named in ((["--prompt-cache-file", str(tmp_path / "absent.safetensors")],
                          "no such file"),
                         (["--prompt-cache-file", str(tmp_path / "cache.bin")], "must end in"),
                         (["--prompt-cache-file", str(target / "model.safetensors")],
                          "not a prompt cache file"),
                         (["--prompt-cache-file", str(saved), "--draft-model", str(target)],
                          "--draft-model"),
                         (["--save-prompt-cache", str(saved), "--max-kv-size", "64"],
                          "--max-kv-size"),
                         (["--prompt-cache-file", str(saved), "--kv-bits", "8",
                           "--kv-group-size", "32", "--quantized-kv-start", "0",
                           "--save-prompt-cache", str(tmp_path / "q.safetensors")], None)):
        code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", REST,
                               *flags)
        if named is None:  # a quantized cache, then refused with other KV settings
            assert code == 0, err
            code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", REST,
                                   "--prompt-cache-file", str(tmp_path / "q.safetensors"),
                                   "--kv-bits", "4", "--kv-group-size", "32")
            named = "quantized to 8 bits"
        assert code == 1 and err.count("\n") == 1 and named in err, err


def test_a_cache_made_by_mlx_lm_cache_prompt(target: Path, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    from mlx_lm import cache_prompt
    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream_generate
    from mlx_lm.models.cache import load_prompt_cache

    saved = tmp_path / "mlx-lm.safetensors"
    monkeypatch.setattr("sys.argv", ["cache_prompt", "--model", str(target), "--prompt", PREFIX,
                                     "--prompt-cache-file", str(saved)])
    cache_prompt.main()
    capsys.readouterr()
    out = stats(capsys, "--model", str(target), "--prompt", REST, "--prompt-cache-file", str(saved))
    peer, peer_tokenizer = mlx_lm_load(str(target), tokenizer_config={"trust_remote_code": False})
    rest = peer_tokenizer.encode(REST, add_special_tokens=False)
    expected = "".join(r.text for r in mlx_lm_stream_generate(
        peer, peer_tokenizer, rest, max_tokens=int(TOKENS), prompt_cache=load_prompt_cache(str(saved))))
    assert out.split("=" * 10 + "\n")[1] == expected + "\n"
    assert count(out, "Prompt") == len(rest)
    code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", REST,
                           "--prompt-cache-file", str(saved), "--save-prompt-cache",
                           str(tmp_path / "more.safetensors"))
    assert code == 1 and "mlx_lm.cache_prompt" in err and err.count("\n") == 1, err


def test_chat_starts_from_a_saved_prompt_cache(chat_target: Path, tmp_path: Path, capsys,
                                               monkeypatch) -> None:
    system = "You answer in Python. " * 4
    saved = tmp_path / "system.safetensors"
    stats(capsys, "--model", str(chat_target), "--system-prompt", system, "--prompt", "",
          "-m", "1", "--save-prompt-cache", str(saved))
    plain = chat(capsys, monkeypatch, "def f(x):\n/reset\ndef f(x):\n", "--model",
                 str(chat_target), "--system-prompt", system)
    cached = chat(capsys, monkeypatch, "def f(x):\n/reset\ndef f(x):\n", "--model",
                  str(chat_target), "--system-prompt", system, "--prompt-cache-file", str(saved))
    assert cached[0] == plain[0]
    _, tokenizer = load(chat_target)
    held = encode_prompt(tokenizer, "", True, system)
    turn = encode_prompt(tokenizer, "def f(x):", True, system)
    reused = common_prefix(held, turn)
    assert reused > 20
    for line in cached[1]:  # after /reset too: the conversation starts from the file again
        assert line.startswith(f"[prompt {len(turn)} tokens: {len(turn) - reused} prefilled, "
                               f"{reused} from the cache;"), line
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))
    code, _, err = run_cli(capsys, "chat", "--model", str(chat_target), "--prompt-cache-file",
                           str(saved), "--draft-model", str(chat_target))
    assert code == 1 and err.count("\n") == 1 and "--draft-model" in err


def test_a_failed_save_leaves_the_old_cache_file_whole(target: Path, tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    import errno

    import elm_mlx.prompt_cache

    saved = tmp_path / "kept.safetensors"
    stats(capsys, "--model", str(target), "--prompt", PREFIX, "-m", "1", "--save-prompt-cache",
          str(saved))
    before = saved.read_bytes()

    def full_disk(path: str, cache, metadata) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(elm_mlx.prompt_cache, "save_prompt_cache", full_disk)
    code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", PROMPT,
                           "-m", "1", "--save-prompt-cache", str(saved))
    assert code == 1 and err == f"error: {saved}: write failed (disk full); nothing was changed there\n"
    assert saved.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [saved.name]


def test_a_prompt_cache_made_with_adapters_needs_them(target: Path, tmp_path: Path,
                                                      capsys) -> None:
    from support.chat import random_adapters

    adapters = random_adapters(target, tmp_path / "adapters", None)
    saved = tmp_path / "tuned.safetensors"
    stats(capsys, "--model", str(target), "--adapter-path", str(adapters), "--prompt", PREFIX,
          "-m", "1", "--save-prompt-cache", str(saved))
    (adapters / "0000010_adapters.safetensors").write_bytes(b"a training checkpoint")
    tuned = generated_text(capsys, "--model", str(target), "--adapter-path", str(adapters))
    assert generated_text(capsys, "--model", str(target), "--adapter-path", str(adapters),
                          "--prompt", REST, "--prompt-cache-file", str(saved)) == tuned
    code, _, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", REST,
                           "--prompt-cache-file", str(saved))
    assert code == 1 and err.count("\n") == 1 and "other adapters" in err and str(saved) in err
