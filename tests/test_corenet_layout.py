"""CoreNet's data layout (docs/reference.md section 3): rows worked out by hand, the padding the
loss ignores, the embedding rows, and agreement with the packed layout where both coincide."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from support.training import losses, train_in_process, write_config

from elm_spec import ElmError
from elm_train.config import load_config
from elm_train.data.format import Shard, read_index, rows_name, write_index
from elm_train.data.loader import DocumentRowLoader, TokenWindowLoader
from elm_train.data.prepare import PrepareOptions, prepare_data
from elm_train.tasks.lm import LanguageModelTask, language_model_loss

BOS, EOS, PAD = 1, 2, 32000  # Llama-2's ids; CoreNet pads with the vocabulary size


def corenet_data(directory: Path, rows: list[list[int]], vocab_size: int = 32000,
                 shard_tokens: int = 1 << 30) -> Path:
    """corenet-layout data holding ROWS (train split) exactly as given, in shards of SHARD_TOKENS,
    padded with the vocabulary size as CoreNet pads."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = np.array([t for row in rows for t in row], dtype=np.uint16)
    shards = []
    for number, start in enumerate(range(0, stream.size, shard_tokens)):
        path = directory / f"train-{number:05d}.bin"
        stream[start: start + shard_tokens].tofile(path)
        shards.append(Shard(path, min(shard_tokens, stream.size - start)))
    ends = np.cumsum([len(row) for row in rows]).astype("<u8")
    ends.tofile(directory / rows_name("train"))
    (directory / rows_name("valid")).write_bytes(b"")
    write_index(directory, np.dtype(np.uint16), vocab_size, EOS, {"train": shards, "valid": []}, {},
                rows={"train": Shard(directory / rows_name("train"), len(rows)),
                      "valid": Shard(directory / rows_name("valid"), 0)},
                bos_id=BOS, pad_id=vocab_size)
    return directory


def test_rows_are_cut_to_seq_len_plus_one_and_padded_with_32000(tmp_path: Path) -> None:
    rows = [[BOS, 10, 11, 12, EOS],                                  # 5 tokens: 4 pads
            [BOS, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, EOS],      # 12: cut to 9, 28 29 EOS dropped
            [BOS, 30, 31, 32, 33, 34, 35, 36, EOS]]                  # 9: exactly seq_len + 1
    # Shards of 7 tokens: the second row starts in the first shard and ends in the third.
    data = corenet_data(tmp_path, rows, shard_tokens=7)
    loader = DocumentRowLoader(data, "train", seq_len=8, micro_batch_size=3, shuffle=False)
    batch = next(loader)
    P = PAD
    assert batch["input_ids"].tolist() == [[BOS, 10, 11, 12, EOS, P, P, P],
                                           [BOS, 20, 21, 22, 23, 24, 25, 26],
                                           [BOS, 30, 31, 32, 33, 34, 35, 36]]
    assert batch["labels"].tolist() == [[10, 11, 12, EOS, P, P, P, P],
                                        [20, 21, 22, 23, 24, 25, 26, 27],
                                        [30, 31, 32, 33, 34, 35, 36, EOS]]
    assert loader.batches_per_epoch == 1 and loader.state_dict()["layout"] == "corenet"
    packed = TokenWindowLoader(data, "train", seq_len=8, micro_batch_size=1)
    with pytest.raises(ElmError, match=re.escape("data.layout is packed but the checkpoint was "
                                                 "written with corenet")):
        packed.load_state_dict(loader.state_dict())


def test_the_loss_ignores_label_32000(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 32128, generator=generator, requires_grad=True)
    labels = torch.tensor([[5, 9, EOS, PAD, PAD, PAD], [7, 8, 9, 10, 11, EOS]])
    loss, parts = language_model_loss(logits, labels, 1e-4, ignore_id=PAD)
    kept = labels != PAD
    flat = logits.reshape(-1, 32128)
    expected_ce = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=PAD)
    expected_z = 1e-4 * torch.logsumexp(logits[kept], dim=-1).square().mean()
    torch.testing.assert_close(parts["loss"], expected_ce.detach())
    torch.testing.assert_close(parts["z_loss"], expected_z.detach())
    assert parts["pad_fraction"].item() == 3 / 12
    loss.backward()
    assert logits.grad[~kept].abs().max() == 0 and logits.grad[kept].abs().min() > 0


def test_the_embedding_has_32128_rows_for_32000_pieces_and_the_pad(tmp_path: Path,
                                                                 token_data: Path) -> None:
    data = corenet_data(tmp_path / "rows", [[BOS, *range(3, 40), EOS]] * 4)

    def task(**model) -> LanguageModelTask:
        return LanguageModelTask(load_config(data={
            "model": {"preset": "elm-tiny", **model}, "data": {"path": str(data)},
            "train": {"seq_len": 32}}))

    assert task().spec.vocab_size == 32128 and task().layout == "corenet"
    assert task(vocab_size=32001).spec.vocab_size == 32001
    with pytest.raises(ElmError, match=re.escape("pad id 32000 (data.layout corenet) does not "
                                                 "fit the model's vocab_size 32000")):
        task(vocab_size=32000)
    with pytest.raises(ElmError, match=re.escape("data.layout corenet needs data prepared with "
                                                 "`elm data prepare --layout corenet` (this is "
                                                 "packed)")):
        LanguageModelTask(load_config(data={
            "model": {"preset": "elm-tiny"}, "data": {"path": str(token_data), "layout": "corenet"},
            "train": {"seq_len": 32}}))
    with pytest.raises(ElmError, match=re.escape("data.layout corenet needs data.path")):
        LanguageModelTask(load_config(data={"model": {"preset": "elm-tiny"},
                                            "data": {"synthetic": True, "layout": "corenet"}}))
    with pytest.raises(ElmError, match=re.escape("data.layout: 'padded' is not one of packed, corenet")):
        load_config(data={"model": {"preset": "elm-tiny"}, "data": {"path": str(data)}},
                    overrides=["data.layout=padded"])


def full_rows(count: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """COUNT rows of BOS, seq_len - 1 tokens and EOS: seq_len + 1 tokens, as a window is."""
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(3, 500, seq_len - 1).tolist(), EOS] for _ in range(count)]


def test_packed_and_corenet_layouts_agree_when_every_row_is_a_window(tmp_path: Path) -> None:
    data = corenet_data(tmp_path / "rows", full_rows(24, 16), vocab_size=512, shard_tokens=100)
    packed = TokenWindowLoader(data, "train", 16, micro_batch_size=2, world_size=3, rank=1, seed=5)
    rows = DocumentRowLoader(data, "train", 16, micro_batch_size=2, world_size=3, rank=1, seed=5)
    for _ in range(2 * packed.batches_per_epoch):  # two epochs, two shuffles
        ours, theirs = next(rows), next(packed)
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["labels"], theirs["labels"])

    # And training on either gives the same losses (same model: 640 rows for 512 pieces + pad).
    for layout in ("packed", "corenet"):
        config = write_config(tmp_path / f"{layout}.yaml", data, tmp_path / layout,
                              model={"preset": "elm-tiny", "vocab_size": 640},
                              data={"path": str(data), "layout": layout},
                              train={"seq_len": 16, "micro_batch_size": 2, "max_steps": 4})
        train_in_process(config)
    np.testing.assert_allclose(losses(tmp_path / "corenet"), losses(tmp_path / "packed"), rtol=1e-5)


# Four documents worked by hand: chunks of 4 words, at least 12 characters (CoreNet's count) and
# at least 10 tokens counting BOS and EOS.
DOCUMENTS = ["one two three four five six seven eight nine",   # 3 chunks; "nine" has 4 characters
             "self self self self return None if else",        # 2 chunks; "self x4" has 4+2 tokens
             "a b c d",                                        # 7 characters: no row
             "Caf\u00c3\u00a9 cre\u0300me bru\u0302le\u0301e"]  # mojibake and combining marks
KEPT = ["one two three four", "five six seven eight", "return None if else",
        "Café crème brûlée"]  # what ftfy.fix_text(..., normalization="NFC") makes of the last


def test_prepare_reproduces_corenets_rows_on_documents_worked_by_hand(tokenizer_dir: Path,
                                                                     tmp_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    # The token filter's edge: "return None if else" is kept only because BOS and EOS count.
    assert len(sp.encode("self self self self")) + 2 < 10 <= len(sp.encode(KEPT[2])) + 2
    assert len(sp.encode(KEPT[2])) + 1 < 10
    assert sp.encode(KEPT[3]) != sp.encode(DOCUMENTS[3])  # the clean-up changes the tokens

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS))
    options = PrepareOptions(layout="corenet", chunk_words=4, min_chars=12, min_tokens=10,
                             valid_fraction=0, workers=1)
    stats = prepare_data([source], tokenizer_dir, tmp_path / "data", options, show_progress=False)
    expected = [[BOS, *sp.encode(text), EOS] for text in KEPT]

    data = read_index(tmp_path / "data")
    stream = np.fromfile(data.splits["train"][0].path, dtype=np.uint16).tolist()
    ends = data.row_ends("train").tolist()
    assert [stream[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)] == expected
    assert (data.layout, data.bos_id, data.pad_id, data.vocab_size) == ("corenet", BOS, 512, 512)
    assert (stats["documents_read"], stats["chunks_read"], stats["chunks_kept"]) == (4, 7, 4)
    assert (stats["dropped_min_chars"], stats["dropped_min_tokens"]) == (2, 1)
    assert stats["rows"] == {"train": 4, "valid": 0}

    # seq_len 11: each row cut to 12 tokens, the rest dropped, or padded with 512.
    loader = DocumentRowLoader(data, "train", seq_len=11, micro_batch_size=4, shuffle=False)
    windows = [(row + [512] * 12)[:12] for row in expected]
    assert any(len(row) < 12 for row in expected) and any(len(row) > 12 for row in expected)
    batch = next(loader)
    assert batch["input_ids"].tolist() == [w[:-1] for w in windows]
    assert batch["labels"].tolist() == [w[1:] for w in windows]


@pytest.mark.slow  # worker processes
def test_corenet_prepare_is_byte_identical_for_any_worker_count(corpus, tokenizer_dir,
                                                                tmp_path: Path) -> None:
    outputs = []
    for name, workers, chunk_bytes in (("one", 1, 1 << 20), ("two", 2, 16 << 10)):
        options = PrepareOptions(layout="corenet", chunk_words=300, valid_fraction=0.3, seed=7,
                                 workers=workers, chunk_bytes=chunk_bytes, shard_tokens=3000)
        prepare_data(corpus[0], tokenizer_dir, tmp_path / name, options, show_progress=False)
        outputs.append(tmp_path / name)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert {"train-rows.bin", "valid-rows.bin", "train-00001.bin"} <= set(names)
    assert names == sorted(p.name for p in outputs[1].iterdir())
    for name in names:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_packed_index_has_no_layout_keys(token_data: Path) -> None:
    index = json.loads((token_data / "index.json").read_text())
    assert not {"layout", "rows", "pad_id", "bos_id"} & set(index)
    assert not {"layout", "chunk_words"} & set(index["stats"]["settings"])
    assert read_index(token_data).layout == "packed"
