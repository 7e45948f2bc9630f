"""Weighted data mixes: the realised token share of each source, counted from the output's own
shards, against the requested weights and every source's token count (SentencePiece directly);
the same bytes from the datatrove backend; the mix file and OpenELM's recipe."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import yaml
from support.cli import REPO, run_elm
from support.corpora import stdlib_texts

from elm_spec import ElmError
from elm_train.data.distributed import prepare_data_distributed
from elm_train.data.format import read_index
from elm_train.data.mix import Mix, read_mix
from elm_train.data.prepare import PrepareOptions, prepare_data

WEIGHTS = {"code": 0.2, "tables": 0.5, "zipped": 0.3}
OPTIONS = dict(min_chars=0, min_tokens=0, valid_fraction=0.1, seed=3, chunk_bytes=32 << 10,
               shard_tokens=20_000)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[str]]:
    """Three sources of small documents (20 lines of Python each), in three formats."""
    lines = [line for text in stdlib_texts(60) for line in text.splitlines() if line.strip()]
    documents = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)][:900]
    split = {"code": documents[:400], "tables": documents[400:700], "zipped": documents[700:]}
    root = tmp_path_factory.mktemp("mix")
    (root / "code.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in split["code"]))
    pq.write_table(pa.table({"body": split["tables"]}), root / "tables.parquet", row_group_size=50)
    with gzip.open(root / "zipped.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": d}) + "\n" for d in split["zipped"])
    (root / "mix.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "code", "paths": "code.jsonl", "weight": WEIGHTS["code"]},
        {"name": "tables", "paths": ["tables.parquet"], "weight": WEIGHTS["tables"],
         "text_key": "body"},
        {"name": "zipped", "paths": "zipped.jsonl.gz", "weight": WEIGHTS["zipped"]},
    ]}))
    split["root"] = [str(root)]
    return split


def documents_in(out: Path) -> list[tuple[int, ...]]:
    """The documents of every split, read back from the shards: token runs ending in EOS."""
    data = read_index(out)
    found = []
    for split in ("train", "valid"):
        stream = np.concatenate([np.asarray(data.memmap(s)) for s in data.shards(split)])
        ends = np.flatnonzero(stream == data.eos_id)
        found += [tuple(stream[a + 1:b + 1].tolist()) for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
    return found


@pytest.mark.slow
def test_realised_shares_follow_the_weights(sources, tokenizer_dir, tmp_path):
    mix = read_mix(Path(sources["root"][0]) / "mix.yaml")
    out = tmp_path / "data"
    stats = prepare_data(mix, tokenizer_dir, out, PrepareOptions(workers=2, **OPTIONS),
                         show_progress=False)

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    encoded = {name: [(*processor.encode(d), 2) for d in sources[name]] for name in WEIGHTS}
    available = {name: sum(map(len, docs)) for name, docs in encoded.items()}
    owner = {doc: name for name, docs in encoded.items() for doc in docs}
    realised = dict.fromkeys(WEIGHTS, 0)
    for document in documents_in(out):
        realised[owner[document]] += len(document)  # KeyError: a document no source holds

    reported = {s["name"]: s for s in stats["sources"]}
    total_weight = sum(WEIGHTS.values())
    size = min(available[n] * total_weight / w for n, w in WEIGHTS.items())
    scarcest = min(WEIGHTS, key=lambda n: available[n] / WEIGHTS[n])
    longest = max(len(d) for docs in encoded.values() for d in docs)
    assert realised[scarcest] == available[scarcest]  # the scarcest source is used whole
    for name, weight in WEIGHTS.items():
        assert reported[name]["tokens_before_mix"] == available[name]
        assert sum(reported[name]["tokens"].values()) == realised[name]
        target = weight / total_weight * size
        assert target - 1 <= realised[name] < target + 2 * longest, name
        share = realised[name] / sum(realised.values())
        assert abs(share - weight / total_weight) < 2 * longest / sum(realised.values()), name
    assert stats["dropped_mix"] > 0
    assert stats["documents_kept"] == len(documents_in(out))


@pytest.mark.slow
def test_datatrove_tasks_write_the_same_mixed_bytes(sources, tokenizer_dir, tmp_path):
    mix = read_mix(Path(sources["root"][0]) / "mix.yaml")
    prepare_data(mix, tokenizer_dir, tmp_path / "local", PrepareOptions(workers=1, **OPTIONS),
                 show_progress=False)
    prepare_data_distributed(mix, tokenizer_dir, tmp_path / "dt", tmp_path / "work", 3,
                             PrepareOptions(workers=2, **OPTIONS), show_progress=False)
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "dt").iterdir())
    assert sum(name.startswith("train-") for name in names) > 2
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dt" / name).read_bytes(), name
    assert not any((tmp_path / "local").glob(".mix-parts"))


@pytest.mark.slow
def test_a_seed_picks_other_documents_and_a_cap_bounds_the_output(sources, tokenizer_dir,
                                                                  tmp_path):
    mix = read_mix(Path(sources["root"][0]) / "mix.yaml")
    first = prepare_data(mix, tokenizer_dir, tmp_path / "a", PrepareOptions(workers=1, **OPTIONS),
                         show_progress=False)
    other = prepare_data(mix, tokenizer_dir, tmp_path / "b",
                         PrepareOptions(workers=1, **{**OPTIONS, "seed": 4}), show_progress=False)
    assert set(documents_in(tmp_path / "a")) != set(documents_in(tmp_path / "b"))
    assert first["sources"][0]["tokens_before_mix"] == other["sources"][0]["tokens_before_mix"]
    capped = Mix(mix.sources, tokens=20_000)
    stats = prepare_data(capped, tokenizer_dir, tmp_path / "c", PrepareOptions(workers=1, **OPTIONS),
                         show_progress=False)
    total = stats["tokens"]["train"] + stats["tokens"]["valid"]
    assert 20_000 <= total < 20_000 + 3 * 2 * max(len(d) for d in sources["code"])
    assert stats["mix_tokens"] == 20_000


def test_mix_file_errors_name_the_file_and_key(tmp_path):
    cases = [
        ({"sources": [{"name": "a", "paths": "x.jsonl"}]}, "sources[0]: weight is required"),
        ({"sources": [{"name": "a", "paths": "x", "weight": 1, "wieght": 2}]},
         "unknown key 'sources[0].wieght'"),
        ({"sources": [{"name": "a", "paths": "x", "weight": -1}]}, "weight must be a positive"),
        ({"sources": [{"name": "a", "paths": "x", "weight": 1}, {"name": "a", "paths": "y",
                                                                 "weight": 1}]}, "named twice"),
        ({"source": []}, "unknown key 'source'"),
    ]
    for number, (data, message) in enumerate(cases):
        path = tmp_path / f"mix{number}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ElmError, match=rf"^{path}: .*{message}".replace("[", r"\[")
                           .replace("]", r"\]")):
            read_mix(path)


def test_openelm_recipe_is_the_papers_mix():
    """examples/mix-openelm.yaml against the table in docs/reference.md section 7."""
    mix = read_mix(REPO / "examples" / "mix-openelm.yaml")
    table = (REPO / "docs" / "reference.md").read_text().split("## 7.")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `")]
    expected = {cells[0].strip().strip("`"): float(cells[2]) for cells in rows}
    assert {s.name: s.weight for s in mix.sources} == expected
    assert round(sum(expected.values())) == 1784  # "about 1.8T tokens"
    refinedweb = next(s for s in mix.sources if s.name == "refinedweb")
    assert refinedweb.paths == ("hf://datasets/tiiuae/falcon-refinedweb?column=content",)


@pytest.mark.slow
def test_cli_mix_summary_names_each_source(sources, tokenizer_dir, tmp_path):
    result = run_elm("data", "prepare", "--mix", str(Path(sources["root"][0]) / "mix.yaml"),
                     "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "data"),
                     "--min-chars", "0", "--min-tokens", "0", "--workers", "2")
    assert result.returncode == 0, result.stderr
    stats = read_index(tmp_path / "data").stats
    lines = result.stdout.splitlines()
    assert f"{stats['dropped_mix']} left out by the mix weights" in lines[0]
    for source, line in zip(stats["sources"], lines[1:], strict=True):
        tokens = source["tokens"]["train"] + source["tokens"]["valid"]
        assert line.startswith(f"  {source['name']}: {tokens:,} tokens"), line
        assert f"weight {source['weight']:g} ({100 * WEIGHTS[source['name']]:.2f}%)" in line


@pytest.mark.slow
def test_corenet_rows_under_a_weighted_mix(sources, tokenizer_dir, tmp_path):
    """The mix keeps or leaves out rows (a document's chunks together); each kept row is whole."""
    mix = read_mix(Path(sources["root"][0]) / "mix.yaml")
    options = PrepareOptions(workers=2, layout="corenet", chunk_words=40, **OPTIONS)
    stats = prepare_data(mix, tokenizer_dir, tmp_path / "data", options, show_progress=False)
    data = read_index(tmp_path / "data")
    assert stats["dropped_mix"] > 0 and stats["chunks_read"] > stats["documents_read"]
    for split in ("train", "valid"):
        stream = np.concatenate([np.asarray(data.memmap(s)) for s in data.shards(split)])
        ends = data.row_ends(split).tolist()
        rows = [stream[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        assert len(rows) == stats["rows"][split] > 0
        assert all(row[0] == 1 and row[-1] == 2 and 2 not in row[1:-1] for row in rows)
    assert stats["chunks_kept"] == sum(stats["rows"].values())
    assert sum(s["documents"]["train"] + s["documents"]["valid"] for s in stats["sources"]) \
        == stats["chunks_kept"]
