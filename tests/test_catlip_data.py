"""CatLIP data: vocabulary files, label cache, loader bad inputs, augmentation, resumption."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import pytest
import torch
from support.cli import run_elm

from elm_train.catlip.data import (
    ImageLabelDataset,
    ImageTransform,
    ShardedBatchLoader,
    caption_labels,
    random_resized_crop_box,
)
from elm_train.catlip.synthetic import write_shapes_shards
from elm_train.catlip.vocab import cached_labels, read_vocab

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Two shape shards, one shard of bad inputs, a caption list; vocabulary via the CLI."""
    root = tmp_path_factory.mktemp("catlip-data")
    shards = write_shapes_shards(root / "shards", 96, image_size=24, per_shard=48, seed=3)
    good = (root / "shards" / "00000.tar")
    with tarfile.open(good) as archive:
        jpeg = archive.extractfile("000000000.jpg").read()
    bad = root / "bad.tar"
    with tarfile.open(bad, "w") as archive:
        add_member(archive, "a.jpg", b"\xff\xd8 this is not a JPEG")
        add_member(archive, "a.txt", b"a broken dog picture")
        add_member(archive, "b.jpg", jpeg)
        add_member(archive, "b.txt", b"")
        add_member(archive, "c.jpg", jpeg)
        add_member(archive, "c.txt", b"of the and is")
        add_member(archive, "d.jpg", jpeg)
        add_member(archive, "d.txt", b"two dogs")
    captions = root / "extra.txt"
    captions.write_text("a dog chasing a dog past a circle\n\nthe of\n")
    vocab = root / "vocab"
    result = run_elm("catlip", "vocab", str(root / "shards"), str(bad), str(captions),
                     "--top-k", "40", "--out", str(vocab), "--workers", "2")
    assert result.returncode == 0, result.stderr
    return {"root": root, "shards": shards[0].parent, "bad": bad, "vocab": vocab,
            "captions": captions, "stdout": Path(result.stdout)}


def test_vocabulary_files_and_counts(corpus):
    summary = json.loads((corpus["vocab"] / "vocab.json").read_text())
    # 96 shapes + 4 bad-shard samples + 3 caption lines
    assert summary["num_captions"] == 103
    assert summary["empty_captions"] == 2  # b.txt and the blank line
    assert summary["captions_without_synsets"] == 2  # "of the and is", "the of"
    entries = summary["synsets"]
    assert len(entries) == summary["distinct_synsets"] < 40
    counts = [(-e["count"], e["id"]) for e in entries]
    assert counts == sorted(counts)
    assert entries[0]["name"] == "background.n.01" and entries[0]["count"] == 96
    # CoreNet's pickle: {synset id: count}, descending, readable by its dataset code
    with (corpus["vocab"] / "vocab.pkl").open("rb") as handle:
        vocab = pickle.load(handle)
    assert list(vocab.items()) == [(e["id"], e["count"]) for e in entries]
    assert list(vocab.keys()) == list(read_vocab(corpus["vocab"]).ids)
    # per-sample label cache
    labels = cached_labels(corpus["vocab"], corpus["bad"])
    assert labels == {"a": ["n2084071", "n3931044"], "b": [], "c": [],
                      "d": ["n13743269", "n2084071"]}  # dog, picture; two, dog
    # counted once per caption: "a broken dog picture", "two dogs", "a dog chasing a dog ..."
    assert {e["id"]: e["count"] for e in entries}["n2084071"] == 3


def test_cache_is_ignored_once_the_file_changes(corpus, tmp_path):
    changed = tmp_path / "extra.txt"
    changed.write_text("x\n")
    assert cached_labels(corpus["vocab"], changed) is None


def test_bad_inputs_are_skipped_or_kept_and_counted(corpus):
    vocab = read_vocab(corpus["vocab"])
    labels = caption_labels([corpus["bad"]], corpus["vocab"], vocab.ids)
    assert labels.stats() == {"samples": 4, "empty_captions": 1, "captions_without_synsets": 1}
    transform = ImageTransform(16, train=True)
    dataset = ImageLabelDataset(labels.samples, labels.labels, len(vocab), transform)
    loader = ShardedBatchLoader(dataset, batch_size=4, shuffle=False)
    batch = next(loader)
    assert batch["images"].shape == (4, 3, 16, 16)
    assert int(batch["skipped_images"]) == 1 and loader.state_dict()["skipped_images"] == 1
    # a (unreadable) was replaced by b; b and c carry no labels; d is "two dogs"
    assert batch["labels"][1].sum() == 0 and batch["labels"][2].sum() == 0
    two, dog = vocab.ids.index("n13743269"), vocab.ids.index("n2084071")
    assert batch["labels"][3].nonzero().flatten().tolist() == sorted([two, dog])


def test_random_resized_crop_box_stays_inside_and_in_scale():
    rng = random.Random(0)
    areas = []
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(60, 40, rng, scale=(0.3, 1.0))
        assert left >= 0 and left + w <= 60 and top >= 0 and top + h <= 40
        areas.append(w * h / 2400)
    assert min(areas) >= 0.28 and max(areas) <= 1.0 and max(areas) - min(areas) > 0.4
    # a 30:1 image admits no crop of ratio <= 4:3 at that scale: the centred fallback
    left, top, w, h = random_resized_crop_box(300, 10, random.Random(1), scale=(0.99, 1.0))
    assert (w, h) == (13, 10) and left == (300 - 13) // 2


def test_loader_resumes_and_global_batch_ignores_world_size(corpus):
    vocab = read_vocab(corpus["vocab"])
    labels = caption_labels([corpus["shards"]], corpus["vocab"], vocab.ids)

    def loader(batch_size: int, rank: int = 0, world: int = 1) -> ShardedBatchLoader:
        dataset = ImageLabelDataset(labels.samples, labels.labels, len(vocab),
                                    ImageTransform(16, train=True), seed=5)
        return ShardedBatchLoader(dataset, batch_size, rank, world, seed=7)

    first = loader(8)
    batches = [next(first) for _ in range(14)]  # crosses the 12-step epoch boundary
    state = first.state_dict()
    assert state["epoch"] == 1 and state["step"] == 2
    resumed = loader(8)
    resumed.load_state_dict(state)
    torch.testing.assert_close(next(resumed)["images"], next(first)["images"])
    ranks = [loader(4, rank, 2) for rank in (0, 1)]
    halves = [next(r) for r in ranks]
    torch.testing.assert_close(torch.cat([h["images"] for h in halves]), batches[0]["images"])
    torch.testing.assert_close(torch.cat([h["labels"] for h in halves]), batches[0]["labels"])
