"""Reading and writing model directories with torch tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elm_spec import ElmError, ModelSpec
from elm_spec.hub import resolve
from elm_spec.modeldir import (
    CONFIG_FILE,
    MAX_SHARD_BYTES,
    SINGLE_WEIGHTS_FILE,
    atomic_output_dir,
    check_tensors,
    read_config,
    read_spec,
    weight_files,
    write_json,
    write_weight_index,
)
from elm_spec.names import DTYPE_NAMES
from elm_spec.tokenizer import write_tokenizer_files
from elm_train.model import AttentionBackend, OpenELM

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ElmError(f"unknown dtype {name!r}; choose from {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def load_state_dict(path: str | os.PathLike[str], spec: ModelSpec | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, checked against its config before reading."""
    spec = spec or read_spec(path)
    config = read_config(path)
    if config.get("quantization"):
        raise ElmError(f"{path}: is a quantized MLX directory; write a PyTorch one with "
                       "`elm convert SRC DST --to torch`")
    check_tensors(path, spec)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types
            raise ElmError(f"{file}: cannot be read ({error})") from None
    return state


def load_model(path: str | os.PathLike[str], dtype: str | None = None,
               attention: AttentionBackend = "sdpa", device: str | torch.device = "cpu") -> OpenELM:
    """The PyTorch twin of the model in a model directory (or Hub repo), in eval mode."""
    path = resolve(path)
    spec = read_spec(path)
    return model_from_state_dict(load_state_dict(path, spec), spec, dtype, attention, device)


def model_from_state_dict(state: Mapping[str, torch.Tensor], spec: ModelSpec, dtype: str | None = None,
                          attention: AttentionBackend = "sdpa",
                          device: str | torch.device = "cpu") -> OpenELM:
    """The PyTorch twin holding STATE (HF tensor names), in eval mode, without a random init."""
    with torch.device("meta"):
        model = OpenELM(spec, attention=attention)
    model.load_state_dict(state, strict=True, assign=True)
    model.transformer.rope.build(spec.rope_max_length, device="cpu")
    target_dtype = torch_dtype(dtype) if dtype else next(iter(state.values())).dtype
    return model.to(device=device, dtype=target_dtype).eval()


def save_model_dir(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec,
                   destination: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None,
                   dtype: str = "float32", force: bool = False) -> Path:
    """Write a model directory atomically: config, safetensors shards of at most 5 GB, tokenizer."""
    target_dtype = torch_dtype(dtype)
    destination = Path(destination)
    with atomic_output_dir(destination, force=force) as staging:
        tensors = {name: tensor.detach().to("cpu", target_dtype).contiguous()
                   for name, tensor in state_dict.items()}
        write_safetensors_shards(tensors, staging)
        write_json(staging / CONFIG_FILE, spec.to_config(torch_dtype=dtype))
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, staging)
    return destination


def write_safetensors_shards(tensors: Mapping[str, torch.Tensor], directory: Path,
                             max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_WEIGHTS_FILE), metadata=metadata)
        return
    tensor_files: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata=metadata)
        tensor_files.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_weight_index(directory, tensor_files, total)


def init_model(spec: ModelSpec, seed: int = 0) -> OpenELM:
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model
