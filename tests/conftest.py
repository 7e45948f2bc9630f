"""Shared fixtures: a tokenizer trained on this machine's Python sources, tiny model dirs,
prepared token data, a trained run and a corpus in every source format. Helpers that are not
fixtures live in the `support` package beside this file."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.corpora import short_documents, stdlib_files, stdlib_texts
from support.training import train_in_process, write_config

from elm_spec import ModelSpec


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


@pytest.fixture(scope="session")
def token_data(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """12 standard library files as documents, the train split in several shards, some held out."""
    from elm_train.data.prepare import PrepareOptions, prepare_data

    output = tmp_path_factory.mktemp("tokens") / "data"
    stats = prepare_data(stdlib_files(12), tokenizer_dir, output, PrepareOptions(
        source_format="txt", min_chars=0, min_tokens=0, valid_fraction=0.1, seed=2,
        shard_tokens=100_000, workers=1), show_progress=False)
    assert stats["documents"]["valid"] > 0
    return output


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> Path:
    """A run directory: train.yaml, checkpoints/step-2 and checkpoints/step-4."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "train.yaml", token_data, root / "run", train={"max_steps": 4},
                          checkpoint={"dir": str(root / "checkpoints"), "every": 2})
    train_in_process(config)
    return root


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, its config pointing at the copy."""
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    config = (copy / "train.yaml").read_text().replace(str(trained), str(copy))
    (copy / "train.yaml").write_text(config)
    return copy


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """(source paths, every document in corpus order) over all four formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    code = stdlib_texts(24)
    extra = short_documents()
    jsonl_docs = code[:7] + extra[:3]
    gz_docs = code[7:12] + extra[3:]
    parquet_docs = code[12:19]
    txt_docs = code[19:24]
    with (root / "part.jsonl").open("w") as handle:
        for text in jsonl_docs:
            handle.write(json.dumps({"id": len(text), "text": text}) + "\n")
        handle.write("\n")  # blank lines are not documents
    with gzip.open(root / "part.json.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in gz_docs)
    pq.write_table(pa.table({"text": parquet_docs}), root / "part.parquet", row_group_size=3)
    (root / "files").mkdir()
    for number, text in enumerate(txt_docs):
        (root / "files" / f"doc{number:02d}.txt").write_text(text)
    sources = [str(root / "part.jsonl"), str(root / "part.json.gz"), str(root / "part.parquet"),
               str(root / "files")]
    return sources, jsonl_docs + gz_docs + parquet_docs + txt_docs
