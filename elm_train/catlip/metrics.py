"""Evaluation of multi-label and single-label classifiers on held-out batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (sklearn's definition: the mean of the precision at each
    positive, ranking by score) of scores/targets [samples, classes]; NaN where a class has no
    positive."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).float()
    precision_at = hits.cumsum(0) / torch.arange(1, hits.shape[0] + 1, device=hits.device)[:, None]
    positives = hits.sum(0)
    return (precision_at * hits).sum(0) / positives.where(positives > 0, torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over the classes that have at least one positive."""
    return float(average_precision(scores, targets).nanmean())


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over all batches, in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(batch["images"]).float())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)
