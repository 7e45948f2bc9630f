"""`elm tokenizer train` and `elm tokenizer check`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from support.cli import run_elm
from support.corpora import stdlib_texts

from elm_spec.tokenizer import Tokenizer


def test_train_reads_corpus_formats_and_check_describes_the_result(tmp_path: Path):
    texts = stdlib_texts(12)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts[:6]))
    pq.write_table(pa.table({"content": texts[6:]}), tmp_path / "b.parquet")
    out = tmp_path / "tok"
    result = run_elm("tokenizer", "train", str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"),
                     "--text-key", "content", "--vocab-size", "400", "--max-documents", "11",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"trained on 11 documents ({sum(map(len, texts[:11])):,} characters)" in result.stdout
    tokenizer = Tokenizer(out)
    assert tokenizer.vocab_size == 400
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer.decode(tokenizer.encode("def main():\n    return 0")) == "def main():\n    return 0"

    check = run_elm("tokenizer", "check", str(out), "--text", "def f")
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert lines[0] == (f"{out / 'tokenizer.model'}: SentencePiece BPE, byte fallback yes, "
                        "normalization identity, 400 pieces")
    assert lines[1] == "special ids: unk 0 <unk>, bos 1 <s>, eos 2 </s>"
    assert lines[2] == "prepared data dtype: uint16"
    ids = [int(i) for i in lines[3].removeprefix("ids: [").removesuffix("]").split(", ")]
    assert ids == tokenizer.encode("def f")


def test_check_refuses_a_tokenizer_without_the_llama_layout(tmp_path: Path):
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(stdlib_texts(3)), model_prefix=str(tmp_path / "other"),
        vocab_size=300, bos_id=-1, eos_id=1, unk_id=0, minloglevel=2)
    result = run_elm("tokenizer", "check", str(tmp_path / "other.model"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {tmp_path / 'other.model'}: unk/bos/eos ids are "
                                     "(0, -1, 1), expected the Llama-2 layout (0, 1, 2)")

    (tmp_path / "junk.model").write_bytes(b"not a model")
    result = run_elm("tokenizer", "check", str(tmp_path / "junk.model"))
    assert result.stderr.strip() == f"error: {tmp_path / 'junk.model'}: not a SentencePiece model"
