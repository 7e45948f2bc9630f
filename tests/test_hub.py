"""Hub repositories through huggingface_hub's real client: downloads into the standard cache from
a loopback Hub this test starts, offline reads from that populated cache (HF_HUB_OFFLINE=1),
one-line errors for 401/403/404/bad revision/offline misses, the Apple-without-tokenizer advice,
and publishing with a model card."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file
from support.cli import run_elm
from support.fake_hub import TOKEN, FakeHub, Repo

from elm_spec import ModelSpec
from elm_spec.hub import is_repo_id, model_card, split_revision

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")


def test_repo_ids_and_revisions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_repo_id("apple/OpenELM-270M") and is_repo_id("org/name@v1.0")
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert not is_repo_id("runs/model")  # an existing path wins
    assert not is_repo_id("/abs/path") and not is_repo_id("a/b/c") and not is_repo_id("../x")
    assert split_revision("org/name@v2") == ("org/name", "v2")
    assert split_revision("org/name", "dev") == ("org/name", "dev")


def test_model_card_front_matter():
    card = model_card("me/tiny-4bit", "apple/OpenELM-270M", "mlx",
                      {"max abs logit difference": "0.012"})
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta == {"library_name": "mlx", "license": "apache-2.0",
                    "tags": ["elm", "openelm", "mlx"], "base_model": "apple/OpenELM-270M"}
    assert "# me/tiny-4bit" in body and "| max abs logit difference | 0.012 |" in body


@pytest.fixture(scope="module")
def hub(make_model_dir) -> Iterator[FakeHub]:
    source = make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=3)
    files = {name: (source / name).read_bytes() for name in MODEL_FILES}
    fake = FakeHub(repos={
        "elm-test/tiny": Repo(files=dict(files)),
        "apple-like/OpenELM-tiny": Repo(files={n: files[n] for n in ("config.json", "model.safetensors")}),
        "meta-like/Llama-2-7b-hf": Repo(files={"tokenizer.model": files["tokenizer.model"]}, gated=True),
        "elm-test/private": Repo(files=dict(files), private=True),
    }).start()
    fake.source = source
    yield fake
    fake.stop()


def hub_env(hub: FakeHub, home: Path, token: bool = False, offline: bool = False) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_TOKEN": TOKEN if token else ""}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith("Fetching")]  # the download's progress bar
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_convert_from_the_hub_then_offline_from_the_cache(hub, tmp_path):
    home = tmp_path / "hf"
    out = tmp_path / "out"
    result = run_elm("convert", "elm-test/tiny@main", str(out), "--to", "torch",
                     env=hub_env(hub, home))
    assert result.returncode == 0, result.stderr
    expected = load_file(hub.source / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all((written[k] == expected[k]).all() for k in expected)
    snapshots = list((home / "hub" / "models--elm-test--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1 and sorted(p.name for p in snapshots[0].iterdir()) == sorted(MODEL_FILES)
    assert not list((home / "hub").rglob("*.incomplete"))

    # Offline, with the Hub gone: the cache serves the repo, a repo never fetched is one line.
    before = len(hub.requests)
    result = run_elm("inspect", "elm-test/tiny", env=hub_env(hub, home, offline=True))
    assert result.returncode == 0, result.stderr
    assert "4 layers x 64" in result.stdout
    result = run_elm("generate", "--model", "elm-test/tiny", "--prompt", "def", "--max-tokens", "3",
                     "--temp", "0", env=hub_env(hub, home, offline=True))
    assert result.returncode == 0, result.stderr
    assert len(hub.requests) == before
    line = one_error_line(run_elm("inspect", "elm-test/never-fetched",
                                  env=hub_env(hub, home, offline=True)))
    assert line == (f"error: elm-test/never-fetched: not in the local Hub cache ({home / 'hub'}) and "
                    "the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network); download it once online")


def test_hub_failures_are_one_line(hub, tmp_path):
    home = tmp_path / "hf"
    out = str(tmp_path / "out")
    line = one_error_line(run_elm("convert", "meta-like/Llama-2-7b-hf", out,
                                  env=hub_env(hub, home, token=True)))
    assert line == ("error: meta-like/Llama-2-7b-hf: 403 gated repository; accept its terms on the "
                    "Hub, then log in (`hf auth login`) or set HF_TOKEN")
    line = one_error_line(run_elm("convert", "elm-test/private", out, env=hub_env(hub, home)))
    assert line.startswith("error: elm-test/private: 401 repository not found, or private")
    line = one_error_line(run_elm("convert", "elm-test/missing", out,
                                  env=hub_env(hub, home, token=True)))
    assert line == "error: elm-test/missing: 404 no such repository on the Hub"
    line = one_error_line(run_elm("convert", "elm-test/tiny", out, "--revision", "v9",
                                  env=hub_env(hub, home)))
    assert line == "error: elm-test/tiny@v9: 404 revision 'v9' not found in the repository"
    line = one_error_line(run_elm("convert", "apple-like/OpenELM-tiny", out, env=hub_env(hub, home)))
    assert line == ("error: apple-like/OpenELM-tiny: the repository ships no tokenizer; pass "
                    "--tokenizer with meta-llama/Llama-2-7b-hf (gated: accept its licence on the Hub "
                    "and log in), a local tokenizer.model, or a non-gated Hub copy of the Llama-2 "
                    "tokenizer")
    assert not Path(out).exists()


def test_apple_repo_with_a_tokenizer_repo_converts_and_publishes(hub, tmp_path):
    home = tmp_path / "hf"
    out = tmp_path / "mlx"
    hub.repos["elm-test/llama-tokenizer"] = Repo(files={
        "tokenizer.model": (hub.source / "tokenizer.model").read_bytes()})
    env = hub_env(hub, home, token=True)
    result = run_elm("convert", "apple-like/OpenELM-tiny", str(out), "--tokenizer",
                     "elm-test/llama-tokenizer", "--upload-repo", "elm-test/tiny-mlx", env=env)
    assert result.returncode == 0, result.stderr
    published = hub.repos["elm-test/tiny-mlx"].files
    assert published["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert published["tokenizer.model"] == (hub.source / "tokenizer.model").read_bytes()
    assert json.loads(published["config.json"]) == json.loads((out / "config.json").read_text())
    card = published["README.md"].decode()
    meta = yaml.safe_load(card.removeprefix("---\n").split("\n---\n", 1)[0])
    assert meta["base_model"] == "apple-like/OpenELM-tiny" and meta["library_name"] == "mlx"
    assert "elm convert apple-like/OpenELM-tiny" in card
    assert "POST /api/repos/create" in hub.requests

    # One file (a GGUF) goes up with its card in one commit.
    result = run_elm("convert", str(hub.source), str(tmp_path / "tiny.gguf"), "--to", "gguf",
                     "--outtype", "q8_0", "--upload-repo", "elm-test/tiny-gguf", env=env)
    assert result.returncode == 0, result.stderr
    published = hub.repos["elm-test/tiny-gguf"].files
    assert published["tiny.gguf"] == (tmp_path / "tiny.gguf").read_bytes()
    assert "library_name: gguf" in published["README.md"].decode()

    # Without a token the Hub refuses the upload: one line, and the output stays on disk.
    result = run_elm("convert", str(out), str(tmp_path / "again"), "--to", "torch",
                     "--upload-repo", "elm-test/other", env=hub_env(hub, home))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == ("error: elm-test/other: 401 not logged in; log in "
                                              "with `hf auth login` or set HF_TOKEN")
    assert "Traceback" not in result.stderr
    assert (tmp_path / "again" / "config.json").is_file()


@pytest.mark.slow
def test_init_takes_a_tokenizer_from_the_hub(hub, tmp_path):
    hub.repos["elm-test/llama-tokenizer"] = Repo(files={
        "tokenizer.model": (hub.source / "tokenizer.model").read_bytes()})
    result = run_elm("init", str(tmp_path / "model"), "--preset", "elm-tiny", "--tokenizer",
                     "elm-test/llama-tokenizer", env=hub_env(hub, tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    assert ((tmp_path / "model/tokenizer.model").read_bytes()
            == (hub.source / "tokenizer.model").read_bytes())
