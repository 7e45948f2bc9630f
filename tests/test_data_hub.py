"""Hub datasets as `elm data prepare` sources, streamed through huggingface_hub's real client from a
loopback Hub this test starts: the same bytes as the dataset's files on disk, with both backends,
nothing copied locally, and one error line for a missing repository, split or column."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import one_line_failure, run_elm
from support.fake_hub import FakeHub, Repo

from elm_spec import ElmError
from elm_train.data.distributed import prepare_data_distributed
from elm_train.data.format import read_index
from elm_train.data.hub import parse
from elm_train.data.mix import Mix, MixSource
from elm_train.data.prepare import PrepareOptions, prepare_data
from elm_train.data.sources import (
    LINE_MARGIN,
    ReadOptions,
    expand_sources,
    iter_texts,
    plan_chunks,
    read_chunk,
)

OPTIONS = dict(valid_fraction=0.3, seed=7, chunk_bytes=16 << 10, shard_tokens=3000)
DATASET = "hf://datasets/elm-test/corpus"


@pytest.fixture(scope="module")
def hub(corpus) -> Iterator[FakeHub]:
    jsonl, gz, parquet = (Path(p).read_bytes() for p in corpus[0][:3])
    fake = FakeHub(datasets={"elm-test/corpus": Repo(files={
        "README.md": b"# a corpus\n",
        "data/train-00000-of-00003.jsonl": jsonl,
        "data/train-00001-of-00003.json.gz": gz,
        "data/train-00002-of-00003.parquet": parquet,
        "data/test-00000-of-00001.jsonl": jsonl,
    }), "elm-test/content": Repo(files={"train.parquet": _parquet({"content": ["a", "b"]})}),
        "elm-test/lines": Repo(files={"train.jsonl": "".join(
        json.dumps({"text": f"line {n} " + "x" * (n % 300)}) + "\n" for n in range(800)).encode()}),
    }).start()
    yield fake
    fake.stop()


def _parquet(columns: dict[str, list[str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def served(hub, monkeypatch) -> FakeHub:
    hub.serve_this_process(monkeypatch)
    hub.requests.clear()
    return hub


@pytest.fixture(scope="module")
def from_disk(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """The dataset's train files prepared from a local copy (as one source, like the dataset)."""
    out = tmp_path_factory.mktemp("disk") / "data"
    prepare_data(Mix((MixSource("disk", tuple(corpus[0][:3])),)), tokenizer_dir, out,
                 PrepareOptions(workers=1, **OPTIONS), show_progress=False)
    return out


def assert_same_files(expected: Path, actual: Path) -> None:
    """Every file the same; index.json but for the names of the sources (paths, or a dataset)."""
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in actual.iterdir())
    assert any(name.startswith("train-00002") for name in names)  # several shards compared
    for name in names:
        if name != "index.json":
            assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
    indices = [json.loads((d / "index.json").read_text()) for d in (expected, actual)]
    for index in indices:
        index["stats"]["sources"] = [{**s, "name": None, "paths": None}
                                     for s in index["stats"]["sources"]]
    assert indices[0] == indices[1]


def test_source_names():
    source = parse("hf://datasets/org/name@v1.0?split=test&column=content")
    assert (source.repo_id, source.revision, source.split, source.column, source.pattern) == (
        "org/name", "v1.0", "test", "content", None)
    assert parse("hf://datasets/org/name/data/*.parquet").pattern == "data/*.parquet"
    assert parse("hf://datasets/org/name").at("abc") == "hf://datasets/org/name@abc"
    for bad, message in [("hf://datasets/org", "expected hf://datasets/ORG/NAME"),
                         ("hf://datasets/org/n?colum=x", "unknown option 'colum'"),
                         ("hf://datasets/org/n/a.jsonl?split=train", "not both")]:
        with pytest.raises(ElmError, match=message):
            parse(bad)


@pytest.mark.slow
def test_split_picks_the_files_that_name_it(served):
    commit = served.datasets["elm-test/corpus"].sha
    train = expand_sources([DATASET])
    assert [f.path for f in train] == [
        f"{DATASET}@{commit}/data/train-0000{i}-of-00003.{ext}"
        for i, ext in enumerate(["jsonl", "json.gz", "parquet"])]
    assert [f.format for f in train] == ["jsonl", "jsonl.gz", "parquet"]
    assert [f.path.rsplit("/", 1)[1] for f in expand_sources([DATASET + "?split=test"])] == [
        "test-00000-of-00001.jsonl"]
    assert [f.path.rsplit("/", 1)[1] for f in expand_sources([DATASET + "/data/*.parquet"])] == [
        "train-00002-of-00003.parquet"]
    # no file names a split: all are train; column= names this source's text column
    content = expand_sources(["hf://datasets/elm-test/content?column=content"])
    assert list(iter_texts(content, ReadOptions())) == ["a", "b"]


@pytest.mark.slow
def test_streamed_dataset_gives_the_bytes_of_its_files_on_disk(served, tokenizer_dir, from_disk,
                                                              tmp_path):
    out = tmp_path / "data"
    prepare_data([DATASET], tokenizer_dir, out, PrepareOptions(workers=2, **OPTIONS),
                 show_progress=False)
    assert_same_files(from_disk, out)
    commit = served.datasets["elm-test/corpus"].sha
    assert read_index(out).stats["sources"][0]["paths"] == [f"{DATASET}@{commit}"]  # provenance
    reads = [r for r in served.requests if "/resolve/" in r]
    assert reads and all(" bytes=" in r for r in reads)  # range requests, not downloads


@pytest.mark.slow
def test_a_line_range_fetches_its_own_bytes(served):
    """Each chunk of a Hub JSONL file is fetched from the byte before it to the end of its last
    line, and less than LINE_MARGIN more: not the rest of the file (fsspec's read-ahead)."""
    jsonl = served.datasets["elm-test/lines"].files["train.jsonl"]
    files = expand_sources(["hf://datasets/elm-test/lines"])
    options = ReadOptions()
    step = OPTIONS["chunk_bytes"]
    chunks = list(plan_chunks(files, options, step))
    texts = [t for chunk in chunks for t in read_chunk(chunk, options).texts]
    assert texts == [json.loads(line)["text"] for line in jsonl.splitlines()]
    fetched = 0
    for request in served.requests:
        if request.startswith("GET ") and "/train.jsonl bytes=" in request:
            start, end = map(int, request.rsplit("bytes=", 1)[1].split("-"))
            fetched += end + 1 - start
    needed = 0
    for start in range(0, len(jsonl), step):
        end, begin = min(start + step, len(jsonl)), max(start - 1, 0)
        needed += jsonl.index(b"\n", end - 1) + 1 - begin
    assert len(chunks) > 5 and needed <= fetched < needed + len(chunks) * LINE_MARGIN, (
        fetched, needed, len(jsonl))


@pytest.mark.slow
def test_datatrove_tasks_stream_the_same_bytes(served, tokenizer_dir, from_disk, tmp_path):
    out = tmp_path / "data"
    prepare_data_distributed([DATASET], tokenizer_dir, out, tmp_path / "work", 3,
                             PrepareOptions(workers=2, **OPTIONS), show_progress=False)
    assert_same_files(from_disk, out)
    commit = served.datasets["elm-test/corpus"].sha
    assert f"{DATASET}@{commit}" in (tmp_path / "work" / "run.json").read_text()  # pinned


@pytest.mark.slow
def test_cli_streams_without_a_local_copy_and_names_what_is_missing(hub, tokenizer_dir,
                                                                   from_disk, tmp_path):
    home = tmp_path / "hf"
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_TOKEN": ""}
    common = ["--tokenizer", str(tokenizer_dir), "--valid-fraction", "0.3", "--seed", "7",
              "--shard-tokens", "3000", "--workers", "2"]
    result = run_elm("data", "prepare", DATASET + "?split=train&column=text", *common,
                     "--out", str(tmp_path / "data"), env=env)
    assert result.returncode == 0, result.stderr
    for name in (p.name for p in from_disk.glob("*.bin")):
        assert (tmp_path / "data" / name).read_bytes() == (from_disk / name).read_bytes(), name
    cached = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert sum(p.stat().st_size for p in cached) < 4096, cached  # the corpus was not copied

    failed = run_elm("data", "prepare", "hf://datasets/elm-test/missing", *common,
                     "--out", str(tmp_path / "bad"), env=env)
    one_line_failure(failed, "hf://datasets/elm-test/missing: 401 repository not found")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("source, message", [
    (DATASET + "?split=validation", "no split 'validation' in the dataset (splits: test, train)"),
    (DATASET + "?column=body", "no column 'body' (columns: text; choose one with ?column=NAME)"),
    (DATASET + "@v9", "revision 'v9' not found"),
    (DATASET + "/data/*.csv", "no files match 'data/*.csv'"),
])
@pytest.mark.slow
def test_what_is_missing_is_named(served, tokenizer_dir, tmp_path, source, message):
    with pytest.raises(ElmError, match=re.escape(message)):
        prepare_data([source], tokenizer_dir, tmp_path / "bad", PrepareOptions(workers=1),
                     show_progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_offline_reads_the_snapshot_in_the_local_cache(served, tokenizer_dir, from_disk, tmp_path):
    """HF_HUB_OFFLINE=1: the dataset comes from the cache the real client populated, same bytes."""
    from huggingface_hub import snapshot_download

    home = tmp_path / "hf"
    snapshot_download("elm-test/corpus", repo_type="dataset", cache_dir=home / "hub")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    common = ["--tokenizer", str(tokenizer_dir), "--valid-fraction", "0.3", "--seed", "7",
              "--shard-tokens", "3000", "--workers", "1"]
    served.requests.clear()
    result = run_elm("data", "prepare", DATASET, *common, "--out", str(tmp_path / "data"), env=env)
    assert result.returncode == 0, result.stderr
    assert not served.requests  # nothing asked of the Hub
    for name in (p.name for p in from_disk.glob("*.bin")):
        assert (tmp_path / "data" / name).read_bytes() == (from_disk / name).read_bytes(), name
    missing = run_elm("data", "prepare", "hf://datasets/elm-test/other", *common,
                      "--out", str(tmp_path / "bad"), env=env)
    one_line_failure(missing, "hf://datasets/elm-test/other: not in the local Hub cache")
