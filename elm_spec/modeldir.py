"""The model directory contract (HF apple/OpenELM layout), readable without torch or MLX.

`config.json`, `model.safetensors` (or shards listed in `model.safetensors.index.json`) and
tokenizer files. Safetensors headers are parsed here so both twins can name a truncated
file, a missing tensor or a wrong shape before any weight is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elm_spec.errors import ElmError
from elm_spec.jsonl import write_json
from elm_spec.outputs import clean_leftovers, crash_point, output_lock, publish_permissions
from elm_spec.spec import ModelSpec
from elm_spec.tokenizer import TOKENIZER_FILES
from elm_spec.writes import writing

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where the tensor's bytes start in `file`


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ElmError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ElmError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ElmError(f"{path}: expected a JSON object")
    return data


def require_model_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        problem = "it is a file" if directory.exists() else "it does not exist"
        raise ElmError(f"{directory}: not a model directory ({problem})")
    if not (directory / CONFIG_FILE).is_file():
        raise ElmError(f"{directory}: no config.json (not a model directory)")
    return directory


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    return read_json(require_model_dir(path) / CONFIG_FILE)


def read_spec(path: str | os.PathLike[str]) -> ModelSpec:
    file = require_model_dir(path) / CONFIG_FILE
    config = read_json(file)  # its errors name the file already
    try:
        return ModelSpec.from_config(config)
    except ElmError as error:
        raise ElmError(f"{file}: {str(error).removeprefix(f'{CONFIG_FILE}: ')}") from None
    except TypeError as error:
        raise ElmError(f"{file}: {error}") from None


def listed_file(directory: Path, name: Any, index: Path) -> Path:
    """DIRECTORY/NAME for a file name read from INDEX, refused (before anything is opened, so the
    message tells nothing about other files) unless it stays inside DIRECTORY. The check is on
    the name: symlinks the directory itself holds (a Hugging Face cache snapshot) are honoured."""
    if not isinstance(name, str) or not name.strip():
        raise ElmError(f"{index}: file entry {name!r} is not a file name")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal.split(os.sep)[0] in ("..", "."):
        raise ElmError(f"{index}: file entry {name!r} points outside {directory}; refused")
    return directory / normal


def weight_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a model directory, in index order."""
    directory = Path(path)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ElmError(f"{index}: no weight_map")
        files = [listed_file(directory, name, index) for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ElmError(f"{file}: listed in {INDEX_FILE} but missing")
        return files
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ElmError(f"{directory}: no model.safetensors")
    return files


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one file, checking that the data is all there."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ElmError(f"{file}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > 100 * 1024**2:
            raise ElmError(f"{file}: corrupt or truncated safetensors header")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ElmError(f"{file}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ElmError(f"{file}: corrupt safetensors entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise ElmError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise ElmError(f"{file}: corrupt safetensors entry for tensor {name!r} "
                           f"(data offsets {start}, {end})")
        if end > data_bytes:
            raise ElmError(f"{file}: truncated (tensor {name!r} ends past the end of the file)")
        expected = SAFETENSORS_DTYPE_BYTES[dtype] * _product(shape)
        if end - start != expected:
            raise ElmError(f"{file}: corrupt entry for tensor {name!r} (size does not match shape)")
        tensors[name] = TensorInfo(file, dtype, shape, end - start, 8 + header_len + start)
    return tensors


def read_tensor_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Every tensor of a model directory, by name, read from the safetensors headers only."""
    tensors: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        tensors.update(read_safetensors_header(file))
    return tensors


def _product(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF layout with its shape (unquantized)."""
    d, h = spec.model_dim, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"transformer.token_embeddings.weight": (spec.vocab_size, d)}
    for i in range(spec.num_transformer_layers):
        q, kv, f = spec.num_query_heads[i], spec.num_kv_heads[i], spec.ffn_dims[i]
        prefix = f"transformer.layers.{i}"
        shapes[f"{prefix}.attn_norm.weight"] = (d,)
        shapes[f"{prefix}.attn.qkv_proj.weight"] = ((q + 2 * kv) * h, d)
        if spec.normalize_qk_projections:
            shapes[f"{prefix}.attn.q_norm.weight"] = (h,)
            shapes[f"{prefix}.attn.k_norm.weight"] = (h,)
        shapes[f"{prefix}.attn.out_proj.weight"] = (d, q * h)
        shapes[f"{prefix}.ffn_norm.weight"] = (d,)
        shapes[f"{prefix}.ffn.proj_1.weight"] = ((2 * f if spec.ffn_with_glu else f), d)
        shapes[f"{prefix}.ffn.proj_2.weight"] = (d, f)
    shapes["transformer.norm.weight"] = (d,)
    if not spec.share_input_output_layers:
        shapes["lm_head.weight"] = (spec.vocab_size, d)
    return shapes


def check_tensors(path: str | os.PathLike[str], spec: ModelSpec,
                  quantization: Mapping[str, Any] | None = None) -> dict[str, TensorInfo]:
    """Name the first missing, unexpected or wrongly shaped tensor of a model directory."""
    found = read_tensor_index(path)
    expected = expected_shapes(spec)
    for name, shape in expected.items():
        info = found.get(name)
        if info is None:
            raise ElmError(f"{path}: tensor {name!r} is missing")
        want = shape
        module = name[: -len(".weight")]
        if quantization and f"{module}.scales" in found:
            # mlx-lm's per-module entries (mixed recipes) override the top-level bits
            layer_quantization = quantization.get(module)
            if not isinstance(layer_quantization, Mapping):
                layer_quantization = quantization
            bits = int(layer_quantization["bits"])
            want = (*shape[:-1], shape[-1] * bits // 32)
        if info.shape != want:
            raise ElmError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                           f"expected {list(want)} for this config.json")
    allowed_suffixes = (".scales", ".biases") if quantization else ()
    for name in found:
        if name not in expected and not name.endswith(allowed_suffixes):
            raise ElmError(f"{found[name].file}: unexpected tensor {name!r} for this config.json")
    return found


def write_weight_index(directory: Path, tensor_files: Mapping[str, str], total_bytes: int) -> None:
    write_json(directory / INDEX_FILE, {"metadata": {"total_size": total_bytes},
                                        "weight_map": dict(sorted(tensor_files.items()))})


@contextlib.contextmanager
def atomic_output_dir(destination: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside DST; on success it replaces DST in one rename.

    DST is locked against other writers for the whole block, and what killed writers left beside
    it is cleaned first. An existing non-empty DST is refused unless `force`; on any failure DST
    is left as it was.
    """
    target = Path(destination)
    if target.exists() and not target.is_dir():
        raise ElmError(f"{target}: exists and is not a directory")
    with writing(target), output_lock(target):
        clean_leftovers(target)
        if target.is_dir() and any(target.iterdir()) and not force:
            raise ElmError(f"{target}: already exists and is not empty (use --force to replace it)")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield staging
            publish_permissions(staging)
            replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def replace_dir(source: Path, target: Path) -> None:
    """Move SOURCE to TARGET; an old TARGET is moved aside first and removed only afterwards
    (a run killed between the two renames gets it back from `outputs.clean_leftovers`)."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        crash_point("replace-dir")
        os.replace(source, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(source, target)


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
