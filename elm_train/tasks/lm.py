"""Causal language modelling of OpenELM models: next-token cross-entropy plus z-loss."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from elm_spec import ElmError, ModelSpec
from elm_spec.modeldir import CONFIG_FILE, copy_tokenizer_files, read_spec, write_json
from elm_spec.spec_file import read_spec_file
from elm_spec.tokenizer import SENTENCEPIECE_FILE
from elm_train.config import Config
from elm_train.data.format import INDEX_FILE, TokenData, read_index
from elm_train.data.loader import (
    DocumentRowLoader,
    SyntheticTokenLoader,
    TokenWindowLoader,
    require_corenet_rows,
)
from elm_train.tasks.base import Task

# CoreNet's embedding: the vocabulary plus the pad row, rounded up for the hardware (32000 + 1 ->
# 32128 rows, docs/reference.md section 2).
EMBEDDING_ROW_MULTIPLE = 128


def spec_from_config(config: Config, data: TokenData | None, layout: str = "packed") -> ModelSpec:
    """The model shape: preset, spec file or init_from dir, with the vocabulary fitted to the data
    (and, for the corenet layout, its pad id)."""
    model = config.model
    if model.preset:
        spec = ModelSpec.from_preset(model.preset)
    elif model.spec:
        spec = read_spec_file(model.spec)
    else:
        spec = read_spec(model.init_from)
    rows = data.vocab_size if data is not None else 0
    needed = f"vocabulary of {rows} tokens"
    if data is not None and layout == "corenet":
        rows = max(rows, data.pad_id + 1)
        needed = f"pad id {data.pad_id} (data.layout corenet)"
    if model.vocab_size is not None:
        spec = spec.replace(vocab_size=model.vocab_size)
    elif data is not None and not model.init_from:
        multiple = EMBEDDING_ROW_MULTIPLE if layout == "corenet" else 1
        spec = spec.replace(vocab_size=-(-rows // multiple) * multiple)
    if rows > spec.vocab_size:
        raise ElmError(f"{data.directory / INDEX_FILE}: {needed} does not fit the model's "
                       f"vocab_size {spec.vocab_size}")
    return spec


class LanguageModelTask(Task):
    """Causal language modelling of an OpenELM model on prepared (or synthetic) tokens."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.data: TokenData | None = None
        if config.data.path is not None:
            directory = Path(config.data.path)
            if not (directory / INDEX_FILE).is_file():
                raise ElmError(f"{directory}: no prepared token data ({INDEX_FILE} missing; "
                               "write it with `elm data prepare`)")
            self.data = read_index(directory)
        self.layout = config.data.layout or (self.data.layout if self.data else "packed")
        if self.layout == "corenet" and self.data is None:
            raise ElmError("data.layout corenet needs data.path (prepared with "
                           "`elm data prepare --layout corenet`), not synthetic tokens")
        if self.layout == "corenet":
            require_corenet_rows(self.data)
        self.spec = spec_from_config(config, self.data, self.layout)
        if config.train.seq_len > self.spec.max_context_length:
            raise ElmError(f"train.seq_len {config.train.seq_len} is longer than the model's "
                           f"max_context_length {self.spec.max_context_length}")
        self.tokenizer_path = self._find_tokenizer()

    def _find_tokenizer(self) -> Path | None:
        model = self.config.model
        if model.tokenizer:
            path = Path(model.tokenizer)
            path = path / SENTENCEPIECE_FILE if path.is_dir() else path
            if not path.is_file():
                raise ElmError(f"{path}: model.tokenizer not found")
            return path
        for directory in (self.config.data.path, model.init_from):
            if directory and (Path(directory) / SENTENCEPIECE_FILE).is_file():
                return Path(directory) / SENTENCEPIECE_FILE
        return None

    @classmethod
    def for_export(cls, config: Config, checkpoint_dir: Path) -> LanguageModelTask:
        """The task as a checkpoint describes it: its config.json and tokenizer, no data needed."""
        import dataclasses

        model = dataclasses.replace(config.model, preset=None, init_from=None, vocab_size=None,
                                    spec=str(checkpoint_dir / CONFIG_FILE),
                                    tokenizer=str(checkpoint_dir) if (checkpoint_dir / SENTENCEPIECE_FILE).is_file() else None)
        data = dataclasses.replace(config.data, path=None, synthetic=True, layout=None)
        return cls(dataclasses.replace(config, model=model, data=data))

    def build_model(self) -> torch.nn.Module:
        from elm_train.model import OpenELM
        from elm_train.modeldir import load_state_dict

        model = OpenELM(self.spec, attention=self.config.model.attention)
        if self.config.model.init_from:
            model.load_state_dict(load_state_dict(self.config.model.init_from, self.spec))
        else:
            model.init_weights(torch.Generator().manual_seed(self.config.train.seed))
        return model.float()

    def build_loader(self, split: str, rank: int, world_size: int):
        train = self.config.train
        if self.data is None:
            seed = self.config.data.seed + (0 if split == "train" else 1)
            return SyntheticTokenLoader(self.spec.vocab_size, train.seq_len, train.micro_batch_size,
                                        rank, seed)
        loader = DocumentRowLoader if self.layout == "corenet" else TokenWindowLoader
        return loader(self.data, split, train.seq_len, train.micro_batch_size, rank, world_size,
                      self.config.data.seed, shuffle=split == "train")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["input_ids"]).float()
        ignore = self.data.pad_id if self.layout == "corenet" else None
        return language_model_loss(logits, batch["labels"], self.config.optim.z_loss, ignore)

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def has_split(self, split: str) -> bool:
        return self.data is not None and bool(self.data.splits.get(split))

    def flops_per_item(self) -> float:
        return float(self.spec.flops_per_token(self.config.train.seq_len))

    def write_checkpoint_files(self, directory: Path) -> None:
        write_json(directory / CONFIG_FILE, self.spec.to_config(torch_dtype="float32"))
        if self.tokenizer_path is not None:
            copy_tokenizer_files(self.tokenizer_path.parent, directory)

    def export(self, model_state: dict[str, torch.Tensor], destination: str | os.PathLike[str],
               dtype: str = "float32", force: bool = False) -> Path:
        from elm_train.modeldir import save_model_dir

        return save_model_dir(model_state, self.spec, destination, self.tokenizer_path,
                              dtype=dtype, force=force)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float,
                        ignore_id: int | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy plus z_loss_weight * mean(logsumexp^2), sharing one logsumexp; both
    means over the positions whose label is not IGNORE_ID (CoreNet's padding), whose share is
    logged as pad_fraction."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    log_normalizer = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    if ignore_id is None:
        cross_entropy = (log_normalizer - target).mean()
        z_loss = z_loss_weight * log_normalizer.square().mean()
    else:
        # Weights, not boolean indexing: the host never waits for a count of kept positions.
        keep = (labels != ignore_id).to(logits.dtype)
        kept = keep.sum().clamp_min(1)
        cross_entropy = ((log_normalizer - target) * keep).sum() / kept
        z_loss = z_loss_weight * (log_normalizer.square() * keep).sum() / kept
        return cross_entropy + z_loss, {"loss": cross_entropy.detach(), "z_loss": z_loss.detach(),
                                        "pad_fraction": 1 - keep.mean().detach()}
    return cross_entropy + z_loss, {"loss": cross_entropy.detach(), "z_loss": z_loss.detach()}
