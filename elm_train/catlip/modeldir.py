"""CatLIP model directories with torch tensors: write one from a state dict, load one back."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elm_spec import ElmError
from elm_spec.modeldir import CONFIG_FILE, SINGLE_WEIGHTS_FILE, atomic_output_dir, write_json
from elm_spec.vit import VOCAB_JSON, VOCAB_PICKLE, CatLIPConfig, read_catlip_config
from elm_train.catlip.vit import VisionTransformer


def save_catlip_dir(state_dict: Mapping[str, torch.Tensor], config: CatLIPConfig,
                    destination: str | os.PathLike[str], vocab_dir: str | Path | None = None,
                    force: bool = False) -> Path:
    """config.json, model.safetensors (fp32) and, from VOCAB_DIR, vocab.json and vocab.pkl."""
    destination = Path(destination)
    with atomic_output_dir(destination, force=force) as staging:
        tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous()
                   for name, tensor in state_dict.items() if not name.endswith("num_batches_tracked")}
        save_file(tensors, str(staging / SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(staging / CONFIG_FILE, config.to_json())
        if vocab_dir is not None:
            for name in (VOCAB_JSON, VOCAB_PICKLE):
                if (Path(vocab_dir) / name).is_file():
                    shutil.copy2(Path(vocab_dir) / name, staging / name)
    return destination


def load_catlip_model(path: str | os.PathLike[str]) -> tuple[VisionTransformer, CatLIPConfig]:
    """The ViT of a CatLIP model directory (torch layout), in eval mode, and its config."""
    config = read_catlip_config(path)
    if config.framework != "torch":
        raise ElmError(f"{path}: holds {config.framework} weights; PyTorch needs a torch-layout "
                       "CatLIP directory")
    file = Path(path) / SINGLE_WEIGHTS_FILE
    if not file.is_file():
        raise ElmError(f"{path}: no {SINGLE_WEIGHTS_FILE}")
    try:
        state = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types
        raise ElmError(f"{file}: cannot be read ({error})") from None
    model = VisionTransformer(config.vit)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    for name, shape in expected.items():
        if name not in state:
            raise ElmError(f"{file}: tensor {name!r} is missing")
        if tuple(state[name].shape) != tuple(shape):
            raise ElmError(f"{file}: tensor {name!r} has shape {list(state[name].shape)}, "
                           f"expected {list(shape)} for this config.json")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ElmError(f"{file}: unexpected tensor {unexpected[0]!r} for this config.json")
    model.load_state_dict(state, strict=False)
    return model.eval(), config
