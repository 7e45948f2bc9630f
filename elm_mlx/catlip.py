"""CatLIP inference on the Mac: load a CatLIP model directory into the MLX ViT and classify."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from elm_mlx.vit import VisionTransformer
from elm_spec import ElmError
from elm_spec.modeldir import SINGLE_WEIGHTS_FILE
from elm_spec.vit import CatLIPConfig, eval_transform, load_rgb, read_catlip_config, to_mlx_layout


def load_catlip(path: str | os.PathLike[str]) -> tuple[VisionTransformer, CatLIPConfig]:
    """The MLX ViT of a CatLIP directory (MLX layout, or torch layout converted on load)."""
    config = read_catlip_config(path)
    file = Path(path) / SINGLE_WEIGHTS_FILE
    if not file.is_file():
        raise ElmError(f"{path}: no {SINGLE_WEIGHTS_FILE}")
    try:
        weights = mx.load(str(file))
    except (RuntimeError, ValueError) as error:
        raise ElmError(f"{file}: cannot be read ({error})") from None
    if config.framework == "torch":
        weights = {k: mx.array(to_mlx_layout(k, np.array(v))) for k, v in weights.items()}
    model = VisionTransformer(config.vit)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise ElmError(f"{file}: weights do not fit config.json ({error})") from None
    model.eval()
    mx.eval(model.parameters())
    return model, config


@dataclass(frozen=True)
class Prediction:
    synset: str
    name: str
    score: float


def preprocess(image_path: str | os.PathLike[str], config: CatLIPConfig) -> np.ndarray:
    """[3, size, size] float32, exactly as PyTorch evaluation prepares it."""
    return eval_transform(load_rgb(image_path), config.vit.image_size, config.crop_fraction,
                          config.mean, config.std)


def classify(model: VisionTransformer, config: CatLIPConfig, image_path: str | os.PathLike[str],
             top_k: int = 5) -> list[Prediction]:
    """The top-k synsets of one image with their sigmoid scores."""
    pixels = preprocess(image_path, config)
    logits = model(mx.array(pixels.transpose(1, 2, 0)[None]))
    scores = np.array(mx.sigmoid(logits.astype(mx.float32))[0])
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [Prediction(config.synsets[i], config.names[i], float(scores[i])) for i in order]
