"""`elm data prepare` through its Python API: shards compared with an independent tokenization."""

from __future__ import annotations

import gzip
import json
import re
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from support.corpora import short_documents, stdlib_texts

from elm_spec import ElmError
from elm_train.data.format import read_index, token_dtype, write_index
from elm_train.data.prepare import PrepareOptions, ShardWriter, prepare_data

EOS = 2


def corenet_char_count(text: str) -> int:
    """CoreNet's _process_text (SlimPajama) length, written out independently of elm."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return len(re.sub(r"\s+", " ", text.strip()))






def reference_tokens(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    processor = spm.SentencePieceProcessor()
    processor.Load(str(tokenizer_dir / "tokenizer.model"))
    return [processor.EncodeAsIds(text) for text in texts]


def split_stream(data_dir: Path, split: str) -> np.ndarray:
    data = read_index(data_dir)
    shards = data.splits[split]
    return np.concatenate([np.asarray(data.memmap(s)) for s in shards]) if shards else np.empty(0)


def documents_of(stream: np.ndarray) -> list[list[int]]:
    assert stream.size == 0 or stream[-1] == EOS
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_shards_equal_independent_tokenization_of_kept_documents(corpus, tokenizer_dir, tmp_path):
    sources, texts = corpus
    out = tmp_path / "data"
    options = PrepareOptions(valid_fraction=0.25, seed=3, shard_tokens=4096, workers=2,
                             chunk_bytes=32 << 10)
    stats = prepare_data(sources, tokenizer_dir, out, options, show_progress=False)

    tokens = reference_tokens(tokenizer_dir, texts)
    short_chars = [corenet_char_count(t) < 200 for t in texts]
    short_tokens = [not c and len(ids) < 256 for c, ids in zip(short_chars, tokens, strict=True)]
    expected = [ids for ids, c, t in zip(tokens, short_chars, short_tokens, strict=True)
                if not (c or t)]
    assert sum(short_chars) >= 2 and sum(short_tokens) >= 1  # the corpus exercises both filters

    train, valid = documents_of(split_stream(out, "train")), documents_of(split_stream(out, "valid"))
    # Every kept document, in corpus order, is the next document of exactly one split.
    next_train = next_valid = 0
    for ids in expected:
        if next_train < len(train) and train[next_train] == ids:
            next_train += 1
        else:
            assert next_valid < len(valid) and valid[next_valid] == ids
            next_valid += 1
    assert (next_train, next_valid) == (len(train), len(valid))
    assert len(valid) > 0 and len(train) > len(valid)

    data = read_index(out)
    assert data.dtype == np.uint16 and data.vocab_size == 512 and data.eos_id == EOS
    for shards in data.splits.values():
        assert all(s.tokens == 4096 for s in shards[:-1]) and 0 < shards[-1].tokens <= 4096
    assert len(data.splits["train"]) > 1
    assert stats == data.stats
    assert stats["documents_read"] == len(texts)
    assert stats["dropped_min_chars"] == sum(short_chars)
    assert stats["dropped_min_tokens"] == sum(short_tokens)
    assert stats["documents_kept"] == len(expected) == len(train) + len(valid)
    assert stats["documents"] == {"train": len(train), "valid": len(valid)}
    assert stats["tokens"]["train"] == sum(len(d) + 1 for d in train)
    assert (out / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_same_seed_is_byte_identical_with_one_and_two_workers(corpus, tokenizer_dir, tmp_path):
    sources, _ = corpus
    outputs = []
    for name, workers, chunk_bytes in (("one", 1, 1 << 20), ("two", 2, 16 << 10)):
        options = PrepareOptions(valid_fraction=0.3, seed=7, workers=workers, chunk_bytes=chunk_bytes)
        prepare_data(sources, tokenizer_dir, tmp_path / name, options, show_progress=False)
        outputs.append(tmp_path / name)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert names == sorted(p.name for p in outputs[1].iterdir())
    for name in names:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name

    other = PrepareOptions(valid_fraction=0.3, seed=8, workers=2)
    prepare_data(sources, tokenizer_dir, tmp_path / "other", other, show_progress=False)
    assert split_stream(tmp_path / "other", "valid").tolist() != split_stream(outputs[0], "valid").tolist()


def test_filters_drop_exactly_the_documents_under_each_threshold(tokenizer_dir, tmp_path):
    texts = short_documents() + stdlib_texts(3)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    tokens = reference_tokens(tokenizer_dir, texts)
    for min_chars, min_tokens in ((200, 256), (10, 100), (0, 0), (1000, 0)):
        options = PrepareOptions(text_key="body", min_chars=min_chars, min_tokens=min_tokens,
                                 valid_fraction=0, workers=1)
        out = tmp_path / f"data-{min_chars}-{min_tokens}"
        stats = prepare_data([source], tokenizer_dir, out, options, show_progress=False)
        by_chars = [corenet_char_count(t) < min_chars for t in texts]
        by_tokens = [not c and len(ids) < min_tokens for c, ids in zip(by_chars, tokens, strict=True)]
        kept = [ids for ids, c, t in zip(tokens, by_chars, by_tokens, strict=True) if not (c or t)]
        assert documents_of(split_stream(out, "train")) == kept
        assert (stats["dropped_min_chars"], stats["dropped_min_tokens"]) == (sum(by_chars), sum(by_tokens))
        assert read_index(out).splits["valid"] == []


def test_text_per_line_and_undecodable_input_are_skipped_and_counted(tokenizer_dir, tmp_path):
    good = stdlib_texts(2)
    line_doc = "one document per line, long enough to pass both of the filters here " * 3
    (tmp_path / "lines.txt").write_bytes(
        (line_doc + "\r\n\n").encode() + b"bad \xff bytes\n" + (line_doc + "!\n").encode())
    (tmp_path / "broken.jsonl").write_bytes(
        json.dumps({"text": good[0]}).encode() + b"\n" + b'{"text": "caf\xe9 latin-1"}\n'
        + b'{"text": "lone \\ud800 surrogate ' + b"x" * 300 + b'"}\n'
        + json.dumps({"text": good[1]}).encode() + b"\n")
    options = PrepareOptions(text_per_line=True, min_chars=50, min_tokens=10, valid_fraction=0,
                             workers=1)
    stats = prepare_data([tmp_path / "lines.txt", tmp_path / "broken.jsonl"], tokenizer_dir,
                         tmp_path / "out", options, show_progress=False)
    assert stats["undecodable_skipped"] == 3  # one txt line, one JSONL line, one lone surrogate
    assert stats["documents_read"] == 7
    expected = reference_tokens(tokenizer_dir, [line_doc, line_doc + "!", good[0], good[1]])
    assert documents_of(split_stream(tmp_path / "out", "train")) == expected
    assert stats["documents_kept"] == 4


def test_undecodable_whole_text_file_is_skipped(tokenizer_dir, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(stdlib_texts(1)[0])
    (tmp_path / "src" / "b.txt").write_bytes(b"\x80\x81 not utf-8" * 100)
    stats = prepare_data([tmp_path / "src"], tokenizer_dir, tmp_path / "out",
                         PrepareOptions(valid_fraction=0, workers=1), show_progress=False)
    assert (stats["documents_read"], stats["undecodable_skipped"], stats["documents_kept"]) == (2, 1, 1)


@pytest.mark.parametrize("compressed", [False, True])
def test_bad_json_line_is_named_in_a_later_chunk(tokenizer_dir, tmp_path, compressed):
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(300)]
    lines[240] = json.dumps({"content": "no text key"})
    lines[270] = '{"text": "unterminated'
    path = tmp_path / ("c.jsonl.gz" if compressed else "c.jsonl")
    payload = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    options = PrepareOptions(workers=2, chunk_bytes=4096)
    with pytest.raises(ElmError, match=rf"^{re.escape(str(path))}:241: no 'text' key \(keys: 'content'"):
        prepare_data([path], tokenizer_dir, tmp_path / "out", options, show_progress=False)
    lines[240] = lines[0]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()) if compressed
                     else ("\n".join(lines) + "\n").encode())
    with pytest.raises(ElmError, match=rf"^{re.escape(str(path))}:271: malformed JSON"):
        prepare_data([path], tokenizer_dir, tmp_path / "out", options, show_progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [path]


def test_parquet_without_the_text_column_is_named(tokenizer_dir, tmp_path):
    pq.write_table(pa.table({"content": ["x" * 300]}), tmp_path / "p.parquet")
    with pytest.raises(ElmError, match=r"p\.parquet: no column 'text' \(columns: content"):
        prepare_data([tmp_path / "p.parquet"], tokenizer_dir, tmp_path / "out", show_progress=False)


def test_existing_output_is_kept_unless_forced(corpus, tokenizer_dir, tmp_path):
    sources, _ = corpus
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ElmError, match="already exists"):
        prepare_data(sources[:1], tokenizer_dir, out, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    prepare_data(sources[:1], tokenizer_dir, out, PrepareOptions(workers=1), force=True,
                 show_progress=False)
    assert not (out / "keep.txt").exists() and read_index(out).splits["train"]


def test_dtype_follows_vocab_size():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids up to 65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(152064) == np.uint32


def test_writer_packs_large_vocab_ids_as_little_endian_uint32(tmp_path):
    vocab = 200_000
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(0)
    pieces = [rng.integers(65_536, vocab, size=n) for n in (700, 1500, 10, 0, 1790)]
    writer = ShardWriter(tmp_path, dtype, shard_tokens=1000)
    for piece in pieces:
        writer.write("train", piece)
    writer.write("valid", pieces[2])
    splits = writer.close()
    write_index(tmp_path, dtype, vocab, EOS, splits, {})

    data = read_index(tmp_path)
    assert data.dtype == np.uint32
    assert [s.tokens for s in data.splits["train"]] == [1000, 1000, 1000, 1000]
    expected = np.concatenate(pieces)
    assert np.array_equal(split_stream(tmp_path, "train"), expected)
    raw = np.concatenate([np.fromfile(s.path, dtype="<u4") for s in data.splits["train"]])
    assert np.array_equal(raw, expected)
    assert np.array_equal(split_stream(tmp_path, "valid"), pieces[2])


def test_format_option_reads_any_file_name_as_text(tokenizer_dir, tmp_path):
    texts = stdlib_texts(3)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    for number, text in enumerate(texts):
        (tmp_path / "src" / "pkg" / f"m{number}.py").write_text(text)
    (tmp_path / "src" / ".hidden.py").write_text("ignored")
    with pytest.raises(ElmError, match=r"m0\.py: unknown file type"):
        prepare_data([tmp_path / "src"], tokenizer_dir, tmp_path / "out", show_progress=False)
    options = PrepareOptions(source_format="txt", min_chars=0, min_tokens=0, valid_fraction=0,
                             workers=1)
    stats = prepare_data([tmp_path / "src"], tokenizer_dir, tmp_path / "out", options,
                         show_progress=False)
    assert documents_of(split_stream(tmp_path / "out", "train")) == reference_tokens(tokenizer_dir, texts)
    assert stats["source_files"] == 3


def test_only_a_few_chunks_per_worker_are_in_flight(tokenizer_dir, tmp_path):
    from elm_train.data.prepare import CHUNKS_IN_FLIGHT_PER_WORKER, tokenize_in_order
    from elm_train.data.sources import expand_sources, plan_chunks

    path = tmp_path / "many.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"text": f"line {i} " * 30}) + "\n"
                                           for i in range(400)).encode()))
    options = PrepareOptions(min_chars=0, min_tokens=0, workers=2, chunk_bytes=2048)
    planned = list(plan_chunks(expand_sources([path]), options.read_options, options.chunk_bytes))
    drawn = 0

    def counted():
        nonlocal drawn
        for chunk in planned:
            drawn += 1
            yield chunk

    results = 0
    for results, _ in enumerate(tokenize_in_order(counted(), tokenizer_dir / "tokenizer.model",
                                                   options), start=1):
        assert drawn - results <= CHUNKS_IN_FLIGHT_PER_WORKER * options.workers
    assert results == drawn == len(planned) > 4 * CHUNKS_IN_FLIGHT_PER_WORKER * options.workers
