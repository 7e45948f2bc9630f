"""`elm data prepare` as a user runs it: the summary line, and one clear line for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

from support.cli import assert_one_error_line, run_elm
from support.corpora import stdlib_texts

from elm_train.data.format import read_index


def prepare(*args: str):
    return run_elm("data", "prepare", *args)




def test_prepare_reports_what_it_kept_and_skipped(tokenizer_dir: Path, tmp_path: Path):
    texts = stdlib_texts(6)
    (tmp_path / "a.jsonl").write_bytes(
        b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts)
        + b'{"text": "\xff\xfe undecodable"}\n' + json.dumps({"text": "too short"}).encode() + b"\n")
    out = tmp_path / "data"
    result = prepare(str(tmp_path / "*.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--valid-fraction", "0", "--workers", "2")
    assert result.returncode == 0, result.stderr
    stats = read_index(out).stats
    kept = stats["documents_kept"]
    assert f"{kept} of 8 documents kept" in result.stdout
    assert "1 undecodable" in result.stdout and stats["undecodable_skipped"] == 1
    assert f"train {stats['tokens']['train']:,} tokens" in result.stdout
    assert "warning" not in result.stderr


def test_empty_corpus_says_which_filter_dropped_what(tokenizer_dir: Path, tmp_path: Path):
    (tmp_path / "short.txt").write_text("a short line\n" * 3 + ("word " * 60 + "\n"))
    out = tmp_path / "data"
    result = prepare(str(tmp_path / "short.txt"), "--text-per-line", "--tokenizer",
                     str(tokenizer_dir), "--out", str(out))
    assert_one_error_line(result, "no documents kept: 4 read, 3 under 200 characters",
                          "1 under 256 tokens", "0 undecodable")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_missing_text_key_names_file_and_line(tokenizer_dir: Path, tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "x" * 300}) + "\n" + json.dumps({"body": "y"}) + "\n")
    result = prepare(str(path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"))
    assert_one_error_line(result, f"{path}:2: no 'text' key (keys: 'body'", "--text-key")


def test_malformed_json_line_names_file_and_line(tokenizer_dir: Path, tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "x" * 300}) + "\n\n" + '{"text": "open\n')
    result = prepare(str(path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"))
    assert_one_error_line(result, f"{path}:3: malformed JSON")


def test_unknown_file_type_is_named(tokenizer_dir: Path, tmp_path: Path):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    result = prepare(str(tmp_path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"))
    assert_one_error_line(result, f"{tmp_path / 'table.csv'}: unknown file type", "--format")


def test_missing_tokenizer_is_named(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello " * 100)
    result = prepare(str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "d"))
    assert_one_error_line(result, "nowhere", "tokenizer not found")
    assert not (tmp_path / "d").exists()


def test_corenet_layout_reports_chunks_and_rows(tokenizer_dir: Path, tmp_path: Path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(4)))
    out = tmp_path / "data"
    result = prepare(str(tmp_path / "a.jsonl"), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--valid-fraction", "0", "--layout", "corenet", "--chunk-words", "400")
    assert result.returncode == 0, result.stderr
    stats = read_index(out).stats
    rows = stats["rows"]["train"]
    assert rows > 4 and stats["settings"]["layout"] == "corenet"
    assert (f"{rows} of {stats['chunks_read']} chunks of at most 400 words kept, from 4 "
            "documents" in result.stdout)
    assert f"train {stats['tokens']['train']:,} tokens in {rows} rows" in result.stdout
    bad = prepare(str(tmp_path / "a.jsonl"), "--tokenizer", str(tokenizer_dir), "--out",
                  str(tmp_path / "bad"), "--layout", "padded")
    assert_one_error_line(bad, "--layout must be one of packed, corenet, got 'padded'")
