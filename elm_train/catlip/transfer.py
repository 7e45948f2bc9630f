"""Transfer of a CatLIP model to a labeled image folder, with CatLIP's classifier initialisation.

The new classifier's row for each class starts as the pre-trained row of the synset the class
names (a folder `dog` -> dog.n.01 through the caption procedure; a folder named by an id such
as `n02084071` or `n2084071` -> that synset); classes with no row in the vocabulary start at
random. The same fine-tuning (AdamW, cross-entropy, equal steps and data order) runs from
that head and from a random head, and both held-out accuracies are reported.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elm_spec import ElmError
from elm_spec.vit import CatLIPConfig
from elm_train.catlip.data import (
    ImageLabelDataset,
    ImageTransform,
    ShardedBatchLoader,
    iterate_once,
)
from elm_train.catlip.sources import IMAGE_SUFFIXES, Sample
from elm_train.catlip.vit import VisionTransformer

_SYNSET_ID = re.compile(r"^([nvasr])0*(\d+)$")


def image_folder(root: str | Path) -> tuple[list[str], list[Sample], list[int]]:
    """ImageFolder layout: ROOT/<class>/<image>; classes in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise ElmError(f"{root}: not a directory of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ElmError(f"{root}: needs at least two class folders, found {len(classes)}")
    samples, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(root / name), file.name, name, image_path=str(file)))
                labels.append(index)
    return classes, samples, labels


def class_synsets(classes: list[str], vocabulary: tuple[str, ...]) -> list[int | None]:
    """For each class, the row of its synset in VOCABULARY, or None."""
    row_of = {synset: row for row, synset in enumerate(vocabulary)}
    extractor = None
    rows: list[int | None] = []
    for name in classes:
        match = _SYNSET_ID.match(name)
        if match:
            rows.append(row_of.get(f"{match.group(1)}{int(match.group(2))}"))
            continue
        if extractor is None:
            from elm_train.catlip.synsets import shared_extractor

            extractor = shared_extractor()
        ids = [i for i in extractor.ids(name.replace("_", " ")) if i in row_of]
        rows.append(row_of[ids[-1]] if ids else None)  # the head noun of "sports car" is last
    return rows


def transfer_head(model: VisionTransformer, rows: list[int | None],
                  generator: torch.Generator) -> nn.Linear:
    """A classifier over the classes: pre-trained synset rows where known, random elsewhere."""
    head = random_head(model.spec.embed_dim, len(rows), generator)
    with torch.no_grad():
        for cls, row in enumerate(rows):
            if row is not None:
                head.weight[cls] = model.head.weight[row]
                head.bias[cls] = model.head.bias[row]
    return head


def random_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
        head.bias.zero_()
    return head


@dataclass
class TransferResult:
    classes: list[str]
    matched: list[str | None]
    transfer_accuracy: float
    random_accuracy: float
    steps: int
    model: VisionTransformer


def accuracy(model: nn.Module, dataset: ImageLabelDataset, batch_size: int) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in iterate_once(dataset, batch_size):
            correct += int((model(batch["images"]).argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].shape[0]
    return correct / total


def fine_tune(model: VisionTransformer, train: ImageLabelDataset, steps: int, batch_size: int,
              lr: float, seed: int, progress: Callable[[], None] | None = None) -> None:
    loader = ShardedBatchLoader(train, batch_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        batch = next(loader)
        loss = F.cross_entropy(model(batch["images"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress()


def run_transfer(model: VisionTransformer, config: CatLIPConfig, folder: str | Path,
                 valid_folder: str | Path | None = None, steps: int = 100, batch_size: int = 32,
                 lr: float = 1e-4, valid_fraction: float = 0.2, seed: int = 0,
                 progress: Callable[[], None] | None = None) -> TransferResult:
    classes, samples, labels = image_folder(folder)
    if valid_folder is not None:
        valid_classes, valid_samples, valid_labels = image_folder(valid_folder)
        if valid_classes != classes:
            raise ElmError(f"{valid_folder}: classes {valid_classes} differ from {folder}'s {classes}")
    else:
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(order) * valid_fraction))
        valid_samples = [samples[i] for i in order[:cut]]
        valid_labels = [labels[i] for i in order[:cut]]
        samples = [samples[i] for i in order[cut:]]
        labels = [labels[i] for i in order[cut:]]
    size = config.vit.image_size

    def dataset(items: list[Sample], targets: list[int], train: bool) -> ImageLabelDataset:
        transform = ImageTransform(size, train=train, mean=config.mean, std=config.std,
                                   crop_fraction=config.crop_fraction)
        return ImageLabelDataset(items, [[t] for t in targets], len(classes), transform,
                                 seed=seed, multi_label=False)

    train_set = dataset(samples, labels, True)
    valid_set = dataset(valid_samples, valid_labels, False)
    rows = class_synsets(classes, config.synsets)
    results = {}
    for init in ("transfer", "random"):
        candidate = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(seed)
        candidate.head = (transfer_head(model, rows, generator) if init == "transfer"
                          else random_head(model.spec.embed_dim, len(classes), generator))
        torch.manual_seed(seed)
        fine_tune(candidate, train_set, steps, min(batch_size, len(train_set)), lr, seed, progress)
        results[init] = (accuracy(candidate, valid_set, batch_size), candidate)
    return TransferResult(classes, [config.names[r] if r is not None else None for r in rows],
                          results["transfer"][0], results["random"][0], steps,
                          results["transfer"][1])
