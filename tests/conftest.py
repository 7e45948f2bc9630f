"""Shared fixtures: a tokenizer trained on this machine's Python sources and tiny model dirs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from elm_spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent


def stdlib_files(limit: int = 80) -> list[Path]:
    """Source files of the installed Python standard library: a corpus every machine has."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]


def stdlib_texts(limit: int = 80) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files(limit)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-piece Llama-2-layout tokenizer (tokenizer.model and its configs)."""
    from elm_spec.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(iter(stdlib_texts()), 512, directory)
    return directory


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
                   ) -> Callable[..., Path]:
    """make_model_dir(spec, seed=0, dtype="float32") -> a randomly initialised model directory."""
    def make(spec: ModelSpec | None = None, seed: int = 0, dtype: str = "float32") -> Path:
        from elm_train.modeldir import init_model, save_model_dir

        spec = spec or ModelSpec.from_preset("elm-tiny")
        model = init_model(spec, seed=seed)
        destination = tmp_path_factory.mktemp("model") / "model"
        save_model_dir(model.state_dict(), spec, destination, tokenizer_dir / "tokenizer.model",
                       dtype=dtype)
        return destination

    return make


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and idle OpenMP workers spin on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_elm(*args: str, input: str | None = None, cwd: Path | None = None,
            timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `elm` command line in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "apps", *args], input=input, capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=full_env)
