"""`task: catlip` and `task: clip` for `elm train`: the training engine's task interface.

Config keys (besides the engine's own):
- `model.text` (clip only): text tower keys of TextSpec (default: CoreNet's CLIP shape).
- `model.preset`: a ViT preset (vit-test, vit-tiny, vit-small, vit-base, vit-large, vit-huge),
  or `model.spec`: a YAML/JSON file of ViTSpec keys; `model.init_from`: a CatLIP model
  directory to start from. The patch size comes from the spec, the image size from data.
- `data` (CatLIPData below): `train` / `valid` data files or directories, `vocab` (a
  directory from `elm catlip vocab`), `vocab_size` (top k of it), `image_size`, `crop_scale`,
  `mean`, `std`, `num_workers`, and for CLIP `tokenizer` (a SentencePiece tokenizer.model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from elm_spec import ElmError
from elm_spec.settings import build_dataclass
from elm_spec.vit import CatLIPConfig, ViTSpec, read_catlip_config
from elm_train.catlip.clip import CLIP, PAD_ID, TextSpec, contrastive_loss
from elm_train.catlip.data import (
    CaptionLabels,
    ImageLabelDataset,
    ImageTransform,
    ShardedBatchLoader,
    caption_labels,
)
from elm_train.catlip.modeldir import save_catlip_dir
from elm_train.catlip.vit import build_vit
from elm_train.catlip.vocab import Vocabulary, read_vocab
from elm_train.config import Config
from elm_train.tasks.base import Task, refuse_dtype


@dataclass
class CatLIPData:
    """The `data` section of a catlip or clip run."""

    train: list[str] | str = field(default_factory=list)
    valid: list[str] | str = field(default_factory=list)
    vocab: str | None = None
    vocab_size: int | None = None
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    num_workers: int = 2
    tokenizer: str | None = None
    context_length: int = 77
    seed: int = 0

    def __post_init__(self) -> None:
        # One file or directory may be given without a list.
        self.train = [self.train] if isinstance(self.train, str) else list(self.train)
        self.valid = [self.valid] if isinstance(self.valid, str) else list(self.valid)
        if not self.vocab:
            raise ElmError("data.vocab is required: a directory written by `elm catlip vocab`")
        if not self.train:
            raise ElmError("data.train is required: tar shards, CSV or JSONL files, or directories")

    @property
    def splits(self) -> dict[str, list[str]]:
        return {"train": self.train, "valid": self.valid}


def vit_spec_from_model_config(model: Mapping[str, Any], image_size: int, num_classes: int) -> ViTSpec:
    """ViTSpec from model.preset / model.spec / model.init_from, at IMAGE_SIZE."""
    if model.get("init_from"):
        base = read_catlip_config(model["init_from"]).vit
    elif model.get("spec"):
        import yaml

        path = Path(model["spec"])
        if not path.is_file():
            raise ElmError(f"{path}: not found (model.spec)")
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ElmError(f"{path}: expected a mapping of ViT keys")
        base = ViTSpec.from_config({"num_classes": num_classes, **values})
    else:
        base = ViTSpec.from_preset(model.get("preset") or "vit-base")
    return base.replace(image_size=image_size, num_classes=num_classes)


class CatLIPTask(Task):
    """Multi-label classification over the caption synsets; BCE summed / batch size."""

    data_config = CatLIPData
    item_name = "images"

    def __init__(self, config: Config):
        super().__init__(config)
        self.data: CatLIPData = config.task_data  # the `data` section, validated by elm_train.config
        self.model_config = dataclasses.asdict(config.model)
        self.micro_batch_size = config.train.micro_batch_size
        self.seed = config.train.seed

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return read_vocab(self.data.vocab).top(self.data.vocab_size)

    @cached_property
    def spec(self) -> ViTSpec:
        return vit_spec_from_model_config(self.model_config, self.data.image_size,
                                          len(self.vocabulary))

    def build_model(self) -> torch.nn.Module:
        model = build_vit(self.spec, seed=self.seed)
        if self.model_config.get("init_from"):
            from elm_train.catlip.modeldir import load_catlip_model

            source, _ = load_catlip_model(self.model_config["init_from"])
            state = {k: v for k, v in source.state_dict().items()
                     if model.state_dict()[k].shape == v.shape}
            model.load_state_dict(state, strict=False)
        return model

    def _labels(self, split: str) -> CaptionLabels:
        paths = self.data.train if split == "train" else self.data.valid
        if not paths:
            raise ElmError(f"data.{split} is empty")
        return caption_labels(paths, self.data.vocab, self.vocabulary.ids)

    def dataset(self, split: str, train_transform: bool | None = None) -> ImageLabelDataset:
        labels = self._labels(split)
        self.caption_stats = labels.stats()
        train = split == "train" if train_transform is None else train_transform
        transform = ImageTransform(self.data.image_size, train=train, mean=self.data.mean,
                                   std=self.data.std, crop_scale=self.data.crop_scale)
        return ImageLabelDataset(labels.samples, labels.labels, len(self.vocabulary), transform,
                                 seed=self.data.seed, encode_text=self._text_encoder())

    def _text_encoder(self):
        return None

    def build_loader(self, split: str, rank: int, world_size: int) -> ShardedBatchLoader:
        return ShardedBatchLoader(self.dataset(split), self.micro_batch_size, rank, world_size,
                                  seed=self.data.seed, num_workers=self.data.num_workers,
                                  shuffle=split == "train")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, device = model_inputs(model, batch)
        logits = model(images)
        loss = catlip_loss(logits, batch["labels"].to(device))
        return loss, {"loss": loss.detach(), "skipped_images": float(batch["skipped_images"])}

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["images"].shape[0])

    def has_split(self, split: str) -> bool:
        return bool(self.data.splits.get(split))

    def flops_per_item(self) -> float:
        return self.spec.flops_per_image()

    def export(self, model_state: Mapping[str, torch.Tensor], destination: str | Path,
               dtype: str = "float32", force: bool = False) -> Path:
        refuse_dtype(dtype, "CatLIP")
        config = CatLIPConfig(vit=self.spec, synsets=self.vocabulary.ids,
                              names=self.vocabulary.names, mean=self.data.mean, std=self.data.std)
        return save_catlip_dir(model_state, config, destination, self.data.vocab, force=force)


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.device]:
    """The batch's images on the model's device in its parameter dtype, and that device."""
    parameter = next(model.parameters())
    return batch["images"].to(parameter.device, parameter.dtype), parameter.device


def catlip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, summed over labels and divided by the batch size."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(),
                                              reduction="sum") / logits.shape[0]


class CLIPTask(CatLIPTask):
    """The contrastive baseline on the same data, with the same image tower."""

    @cached_property
    def text_spec(self) -> TextSpec:
        if not self.data.tokenizer:
            raise ElmError("data.tokenizer is required for a clip run (a SentencePiece "
                           "tokenizer.model)")
        from elm_spec.tokenizer import Tokenizer

        shape = {**(self.config.model.text or {}),
                 "vocab_size": Tokenizer(self.data.tokenizer).vocab_size,
                 "context_length": self.data.context_length}
        return build_dataclass(TextSpec, shape, "model.text")

    def _text_encoder(self):
        return TextEncoder(self.data.tokenizer, self.data.context_length)

    def flops_per_item(self) -> float:
        """Both towers and both projections per image-text pair; the similarity matrix
        (2 x global batch x projection_dim per pair, under 0.5% at CLIP's batch sizes) is not
        counted."""
        text = self.text_spec
        projections = 3.0 * 2 * text.projection_dim * (self.spec.embed_dim + text.width)
        return self.spec.flops_per_image(classifier=False) + text.flops_per_text() + projections

    def build_model(self) -> torch.nn.Module:
        model = CLIP(self.spec, self.text_spec)
        model.init_weights(torch.Generator().manual_seed(self.seed))
        return model

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, device = model_inputs(model, batch)
        image_features, text_features, scale = model(images, batch["text"].to(device))
        loss = contrastive_loss(image_features, text_features, scale)
        return loss, {"loss": loss.detach(), "skipped_images": float(batch["skipped_images"]),
                      "logit_scale": float(scale.detach())}

    def export(self, model_state: Mapping[str, torch.Tensor], destination: str | Path,
               dtype: str = "float32", force: bool = False) -> Path:
        """Both towers and projections in model.safetensors, both shapes in config.json
        (model_type "catlip_clip")."""
        refuse_dtype(dtype, "CLIP")
        from safetensors.torch import save_file

        from elm_spec.modeldir import atomic_output_dir, write_json

        with atomic_output_dir(destination, force=force) as staging:
            save_file({k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in model_state.items()}, str(staging / "model.safetensors"))
            write_json(staging / "config.json", {
                "model_type": "catlip_clip", "vit": self.spec.to_config(),
                "text": dataclasses.asdict(self.text_spec),
                "mean": list(self.data.mean), "std": list(self.data.std)})
        return Path(destination)


class TextEncoder:
    """caption -> [bos] + pieces + [eos], truncated and padded (PAD_ID) to the context length.
    Picklable: the SentencePiece model loads lazily in each loader worker."""

    def __init__(self, tokenizer: str, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self._processor = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_processor": None}

    def __call__(self, caption: str) -> list[int]:
        if self._processor is None:
            from elm_spec.tokenizer import Tokenizer

            self._processor = Tokenizer(self.tokenizer)
        tokenizer = self._processor
        ids = tokenizer.encode(caption)[: self.context_length - 2]
        ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
        return ids + [PAD_ID] * (self.context_length - len(ids))
