"""Image-caption datasets and a resumable, rank-aware loader for CatLIP, CLIP and transfer.

Images are decoded with Pillow in DataLoader worker processes. Training augmentation is
CatLIP's: RandomResizedCrop (bilinear) to the chosen resolution and a horizontal flip with
probability 0.5 (torchvision's algorithms, written here on PIL images because torchvision
is not installable next to every torch build). Evaluation resizes and centre-crops
(elm_spec.vit.eval_transform), the same code the MLX side runs.

Global batch k of an epoch is `perm[k*G:(k+1)*G]` (G = per-rank batch x world size, perm a
seeded permutation per epoch) and rank r takes its slice, so the global batch does not
depend on the world size. An image that cannot be decoded is skipped (the next sample
takes its place, so batches keep their shape) and counted; captions that are empty or name
no synset are kept with zero labels and counted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from elm_spec import ElmError
from elm_spec.vit import eval_transform, normalize
from elm_train.catlip.sources import Sample, decode_image, expand_sources, read_samples


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, crop width, crop height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ImageTransform:
    """Training (random resized crop + flip) or evaluation (resize + centre crop) to size."""

    size: int
    train: bool
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_fraction: float = 0.875

    def __call__(self, image, rng: random.Random) -> torch.Tensor:
        from PIL import Image

        if not self.train:
            return torch.from_numpy(eval_transform(image, self.size, self.crop_fraction,
                                                   self.mean, self.std))
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng, self.crop_scale)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR,
                             box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(normalize(np.asarray(image, dtype=np.float32) / 255.0,
                                          self.mean, self.std))


class ImageLabelDataset(Dataset):
    """Samples with label index lists: item i -> {"images", "labels" (multi-hot or class index),
    "skipped_images"} plus "text" token ids when a text encoder function is given."""

    def __init__(self, samples: Sequence[Sample], labels: Sequence[Sequence[int]],
                 num_labels: int, transform: ImageTransform, seed: int = 0,
                 multi_label: bool = True, encode_text: Callable[[str], list[int]] | None = None):
        if len(samples) != len(labels):
            raise ValueError("one label list per sample")
        self.samples = list(samples)
        self.labels = [list(ids) for ids in labels]
        self.num_labels = num_labels
        self.transform = transform
        self.seed = seed
        self.multi_label = multi_label
        self.encode_text = encode_text
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped = 0
        for attempt in range(len(self.samples)):
            position = (index + attempt) % len(self.samples)
            sample = self.samples[position]
            try:
                image = decode_image(sample.read_image_bytes())
            except (OSError, ValueError, SyntaxError, ElmError):
                skipped += 1
                continue
            rng = random.Random(hash((self.seed, self.epoch, index)))
            item: dict[str, Any] = {"images": self.transform(image, rng),
                                    "skipped_images": skipped}
            if self.multi_label:
                target = torch.zeros(self.num_labels)
                target[self.labels[position]] = 1.0
                item["labels"] = target
            else:
                item["labels"] = self.labels[position][0]
            if self.encode_text is not None:
                item["text"] = self.encode_text(sample.caption)
            return item
        raise ElmError(f"none of the {len(self.samples)} images could be decoded "
                       f"(first: {self.samples[0].source} {self.samples[0].key})")


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = {"images": torch.stack([item["images"] for item in items]),
             "skipped_images": torch.tensor(sum(item["skipped_images"] for item in items))}
    labels = [item["labels"] for item in items]
    batch["labels"] = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)
    if "text" in items[0]:
        batch["text"] = torch.tensor([item["text"] for item in items], dtype=torch.long)
    return batch


class ShardedBatchLoader:
    """Resumable iterator of this rank's part of each global batch (see module docstring).

    `state_dict()` holds epoch, step, seed and the running counts of skipped images."""

    def __init__(self, dataset: ImageLabelDataset, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0, shuffle: bool = True):
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise ElmError(f"the data set has {len(dataset)} samples, fewer than one global batch "
                           f"({batch_size} per device x {world_size} devices)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.epoch = 0
        self.step = 0
        self.skipped_images = 0
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def _index_batches(self) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(len(self.dataset),
                                   generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(len(self.dataset))
        start = self.rank * self.batch_size
        return [order[k * self.global_batch + start: k * self.global_batch + start
                      + self.batch_size].tolist()
                for k in range(self.step, self.batches_per_epoch)]

    def _start(self) -> None:
        self.dataset.epoch = self.epoch
        loader = DataLoader(self.dataset, batch_sampler=self._index_batches(), collate_fn=collate,
                            num_workers=self.num_workers)
        self._iterator = iter(loader)

    def __iter__(self) -> ShardedBatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.step = 0
            self._start()
            batch = next(self._iterator)
        self.step += 1
        self.skipped_images += int(batch["skipped_images"])
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.seed = int(state["seed"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self._iterator = None


@dataclass
class CaptionLabels:
    """Every sample of some data files with its vocabulary indices and the caption counts."""

    samples: list[Sample]
    labels: list[list[int]]
    empty_captions: int
    without_synsets: int

    def stats(self) -> dict[str, int]:
        return {"samples": len(self.samples), "empty_captions": self.empty_captions,
                "captions_without_synsets": self.without_synsets}


def caption_labels(paths: Sequence[str | Path], vocab_dir: str | Path,
                   vocab_ids: Sequence[str]) -> CaptionLabels:
    """Samples with images and their label indices (from the vocabulary's label cache, else
    computed here with WordNet). Synsets outside the vocabulary are dropped, as in CoreNet."""
    from elm_train.catlip.synsets import shared_extractor
    from elm_train.catlip.vocab import cached_labels

    index = {synset: i for i, synset in enumerate(vocab_ids)}
    extractor = None
    result = CaptionLabels([], [], 0, 0)
    for path in expand_sources(paths):
        if path.suffix == ".txt":
            raise ElmError(f"{path}: a caption list has no images; give .tar, .csv or .jsonl data")
        cache = cached_labels(vocab_dir, path)
        for sample in read_samples(path):
            if not sample.has_image:
                continue
            if cache is not None and sample.key in cache:
                ids = cache[sample.key]
            elif sample.caption.strip():
                extractor = extractor or shared_extractor()
                ids = extractor.ids(sample.caption)
            else:
                ids = []
            if not sample.caption.strip():
                result.empty_captions += 1
            elif not ids:
                result.without_synsets += 1
            result.samples.append(sample)
            result.labels.append(sorted({index[i] for i in ids if i in index}))
    if not result.samples:
        raise ElmError(f"no image samples in {', '.join(str(p) for p in paths)}")
    return result


def iterate_once(dataset: ImageLabelDataset, batch_size: int, num_workers: int = 0
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Every sample once, in order, in batches of at most batch_size (for evaluation)."""
    return iter(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                           num_workers=num_workers))
