"""What `elm convert` reads: every source becomes HF-named tensors read one at a time.

Kinds (detected from SRC, or named with `--from`):
- `hf`: a model directory (HF apple/OpenELM layout: safetensors, sharded safetensors or
  `pytorch_model.bin`), which is also the MLX layout: quantized tensors are dequantized on read;
- `corenet`: a CoreNet `.pt` flat state dict, shaped by `--corenet-config` or `--preset`;
- `checkpoint`: an elm training checkpoint (torch.distributed.checkpoint directory): a `step-N`
  directory, or a run's checkpoint directory, read at its newest complete step.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert import corenet
from convert.safetensors_io import read_tensor
from convert.tensors import DTYPE_NAMES, Tensor, from_mlx, from_torch, to_mlx, torch_dtype_code
from elm_spec import ElmError, ModelSpec
from elm_spec.modeldir import CONFIG_FILE, check_tensors, expected_shapes, read_config, read_spec
from elm_spec.tokenizer import SENTENCEPIECE_FILE, Tokenizer

SOURCE_KINDS = ("hf", "mlx", "corenet", "checkpoint")
TORCH_BIN_FILE = "pytorch_model.bin"
DCP_METADATA_FILE = ".metadata"
DCP_MODEL_KEY = "model."
# step-N directories (and step-N.tmp writes in progress) of a training run's checkpoint directory
STEP_DIR_PATTERN = re.compile(r"^step-\d+(\.tmp)?$")


@dataclass
class ShapeOptions:
    """What shapes a checkpoint that carries no config.json."""

    preset: str | None = None
    corenet_config: Path | None = None
    vocab_size: int | None = None
    tokenizer: Path | None = None


@dataclass
class Source:
    path: Path
    kind: str
    spec: ModelSpec
    tokenizer: Path | None
    dtype: str  # safetensors code of the stored floating-point weights
    tensor_bytes: dict[str, int]  # stored bytes per HF name, in expected order
    reader: Callable[[str], Tensor]
    quantization: dict[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.tensor_bytes)

    @property
    def is_model_dir(self) -> bool:
        return self.kind in ("hf", "mlx")

    def read(self, name: str) -> Tensor:
        return self.reader(name)

    def describe(self) -> str:
        what = {"hf": "model directory", "mlx": "MLX model directory",
                "corenet": "CoreNet checkpoint", "checkpoint": "elm training checkpoint"}[self.kind]
        quantized = " (quantized)" if self.quantization else ""
        return f"{self.path}: {what}{quantized}, {self.spec.describe()}"


def detect_kind(path: Path) -> str:
    if path.is_file():
        return "corenet"
    if not path.is_dir():
        raise ElmError(f"{path}: not found")
    if dcp_directory(path) is not None or holds_checkpoint_steps(path):
        return "checkpoint"
    if (path / CONFIG_FILE).is_file():
        return "mlx" if read_config(path).get("quantization") else "hf"
    raise ElmError(f"{path}: no config.json (not a model directory), no {DCP_METADATA_FILE} "
                   "(not a training checkpoint); name the format with --from")


def open_source(path: Path, kind: str | None, options: ShapeOptions) -> Source:
    if kind is not None and kind not in SOURCE_KINDS:
        raise ElmError(f"unknown source format {kind!r}; choose from {', '.join(SOURCE_KINDS)}")
    kind = kind or detect_kind(path)
    if kind in ("hf", "mlx"):
        for flag, value in (("--preset", options.preset), ("--corenet-config", options.corenet_config),
                            ("--vocab-size", options.vocab_size)):
            if value is not None:
                raise ElmError(f"{flag} applies to CoreNet and training checkpoints; "
                               f"{path}/config.json already gives the shape")
        return open_model_dir(path, options)
    if kind == "corenet":
        return open_corenet(path, options)
    return open_checkpoint(path, options)


# ----- shared checks -----------------------------------------------------------------------
def resolve_spec(options: ShapeOptions, where: Path, config_dirs: tuple[Path, ...] = ()
                 ) -> tuple[ModelSpec, int | None]:
    """The spec from --corenet-config, --preset or a config.json beside the checkpoint, and the
    embedding rows the checkpoint trains with (None: as the spec says)."""
    if options.corenet_config is not None and options.preset is not None:
        raise ElmError("give only one of --corenet-config and --preset")
    if options.corenet_config is not None:
        spec, rows = corenet.spec_from_corenet_yaml(options.corenet_config)
        return spec, rows
    if options.preset is not None:
        return ModelSpec.from_preset(options.preset), None
    for directory in config_dirs:
        if (directory / CONFIG_FILE).is_file():
            return read_spec(directory), None
    raise ElmError(f"{where}: carries no model shape; pass --corenet-config FILE.yaml or --preset NAME "
                   "(or put the model's config.json beside it)")


def apply_vocab(spec: ModelSpec, rows: int, tokenizer: Path | None, options: ShapeOptions,
                where: Path) -> ModelSpec:
    """Output vocabulary: --vocab-size, else the tokenizer's piece count, else 32000 when the
    checkpoint has CoreNet's padded rows, else the checkpoint's rows."""
    pieces = Tokenizer(tokenizer).vocab_size if tokenizer is not None else None
    if options.vocab_size is not None:
        vocab = options.vocab_size
    elif pieces is not None:
        vocab = pieces
    elif rows == corenet.CORENET_VOCAB_SIZE:
        vocab = corenet.LLAMA_VOCAB_SIZE
    else:
        vocab = rows
    if vocab > rows:
        raise ElmError(f"{where}: --vocab-size {vocab} is larger than the checkpoint's {rows} "
                       "embedding rows")
    if pieces is not None and pieces > vocab:
        raise ElmError(f"{tokenizer}: has {pieces} pieces, more than the vocabulary size {vocab}")
    return spec.replace(vocab_size=vocab)


def check_shapes(found: Mapping[str, tuple[int, ...]], spec: ModelSpec, where: Path,
                 rows: int) -> None:
    """Name the first missing, unexpected or wrongly shaped tensor (embedding rows may be padded)."""
    expected = expected_shapes(spec.replace(vocab_size=rows))
    for name, shape in expected.items():
        if name not in found:
            raise ElmError(f"{where}: tensor {name!r} is missing")
        if tuple(found[name]) != shape:
            raise ElmError(f"{where}: tensor {name!r} has shape {list(found[name])}, expected "
                           f"{list(shape)} for {spec.describe()}")
    for name in found:
        if name not in expected:
            raise ElmError(f"{where}: unexpected tensor {name!r} for {spec.describe()}")


def find_tokenizer(options: ShapeOptions, *directories: Path) -> Path | None:
    if options.tokenizer is not None:
        path = options.tokenizer / SENTENCEPIECE_FILE if options.tokenizer.is_dir() else options.tokenizer
        Tokenizer(path)
        return path
    for directory in directories:
        if (directory / SENTENCEPIECE_FILE).is_file():
            return directory / SENTENCEPIECE_FILE
    return None


def dominant_dtype(codes: list[str]) -> str:
    floats = [c for c in codes if c in DTYPE_NAMES]
    return max(set(floats), key=floats.count) if floats else "F32"


def cut_rows(name: str, tensor: Tensor, vocab: int) -> Tensor:
    if name in ("transformer.token_embeddings.weight", corenet.HF_HEAD) and tensor.shape[0] > vocab:
        return Tensor(tensor.data[:vocab], tensor.dtype)
    return tensor


# ----- model directories (HF, elm, MLX) ----------------------------------------------------
def open_model_dir(path: Path, options: ShapeOptions) -> Source:
    config = read_config(path)
    spec = read_spec(path)
    quantization = config.get("quantization") or None
    bin_file = path / TORCH_BIN_FILE
    tokenizer = find_tokenizer(options, path)
    if not list(path.glob("model*.safetensors")) and bin_file.is_file():
        return _torch_bin_source(path, spec, bin_file, tokenizer)
    infos = check_tensors(path, spec, quantization)
    names = list(expected_shapes(spec))
    tensor_bytes = {name: _quantized_bytes(infos, name) for name in names}
    codes = [infos[n].dtype for n in names] + [i.dtype for n, i in infos.items() if n.endswith(".scales")]

    def read(name: str) -> Tensor:
        module = name[: -len(".weight")]
        if f"{module}.scales" not in infos:
            return read_tensor(infos[name])
        from convert.quantize import dequantize

        parts = [to_mlx(read_tensor(infos[f"{module}.{part}"])) for part in ("weight", "scales", "biases")]
        return from_mlx(dequantize(*parts, module, quantization))

    kind = "mlx" if quantization else "hf"
    return Source(path, kind, spec, tokenizer, dominant_dtype(codes), tensor_bytes, read, quantization)


def _quantized_bytes(infos: Mapping[str, Any], name: str) -> int:
    module = name[: -len(".weight")]
    return sum(infos[n].nbytes for n in (name, f"{module}.scales", f"{module}.biases") if n in infos)


def _torch_bin_source(path: Path, spec: ModelSpec, bin_file: Path, tokenizer: Path | None) -> Source:
    state = corenet.load_state_dict(bin_file)
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, spec, bin_file, spec.vocab_size)
    return _torch_state_source(path, "hf", spec, tokenizer, state, spec.vocab_size)


def _torch_state_source(path: Path, kind: str, spec: ModelSpec, tokenizer: Path | None,
                        state: Mapping[str, Any], vocab: int) -> Source:
    names = list(expected_shapes(spec))
    tensor_bytes = {n: state[n].numel() * state[n].element_size() for n in names}
    codes = [torch_dtype_code(state[n].dtype) for n in names]
    return Source(path, kind, spec, tokenizer, dominant_dtype(codes), tensor_bytes,
                  lambda name: cut_rows(name, from_torch(state[name]), vocab))


# ----- CoreNet .pt ----------------------------------------------------------------------------
def open_corenet(path: Path, options: ShapeOptions) -> Source:
    if path.is_dir():
        raise ElmError(f"{path}: is a directory; a CoreNet checkpoint is a .pt file")
    spec, rows_from_config = resolve_spec(options, path, (path.parent,))
    state = {corenet.hf_name(k): v for k, v in corenet.load_state_dict(path).items()}
    embedding = state.get("transformer.token_embeddings.weight")
    if embedding is None:
        raise ElmError(f"{path}: tensor 'token_embeddings.weight' is missing")
    rows = rows_from_config or int(embedding.shape[0])
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, spec, path, rows)
    tokenizer = find_tokenizer(options)
    spec = apply_vocab(spec, rows, tokenizer, options, path)
    return _torch_state_source(path, "corenet", spec, tokenizer, state, spec.vocab_size)


# ----- elm training checkpoints (torch.distributed.checkpoint) --------------------------------
def dcp_directory(path: Path) -> Path | None:
    """The DCP directory of a checkpoint: SRC itself or SRC/model."""
    for candidate in (path, path / "model"):
        if (candidate / DCP_METADATA_FILE).is_file():
            return candidate
    return None


def holds_checkpoint_steps(path: Path) -> bool:
    """Whether PATH is a training run's checkpoint directory (it holds step-N directories)."""
    return any(STEP_DIR_PATTERN.match(child.name) and child.is_dir() for child in path.iterdir())


def open_checkpoint(path: Path, options: ShapeOptions) -> Source:
    """Reads tensors one at a time with `dcp.load` on a single process (no process group):
    memory stays at one tensor, where `dcp_to_torch_save` would hold the whole model."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from elm_train.checkpoint import TRAINER_FILE, resolve_checkpoint
    from elm_train.safe_dcp import read_metadata, safe_load

    if (path / TRAINER_FILE).is_file() or (
            dcp_directory(path) is None and path.is_dir() and holds_checkpoint_steps(path)):
        path = resolve_checkpoint(path)  # an intact step (of a run: the newest), or one error
    directory = dcp_directory(path)
    if directory is None:
        raise ElmError(f"{path}: no {DCP_METADATA_FILE} (not a torch.distributed.checkpoint directory)")
    metadata = read_metadata(directory)
    entries = {key: md for key, md in metadata.state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata)}
    has_model_key = any(key.startswith(DCP_MODEL_KEY) for key in entries)
    keys: dict[str, str] = {}
    for key in entries:
        if has_model_key and not key.startswith(DCP_MODEL_KEY):
            continue  # optimizer state, step counters
        name = corenet.strip_wrappers(key[len(DCP_MODEL_KEY):] if has_model_key else key)
        keys[name] = key
    spec, _ = resolve_spec(options, path, (path, path.parent, directory.parent))
    embedding = keys.get("transformer.token_embeddings.weight")
    rows = int(entries[embedding].size[0]) if embedding else spec.vocab_size
    check_shapes({n: tuple(entries[k].size) for n, k in keys.items()}, spec, directory, rows)
    tokenizer = find_tokenizer(options, path, path.parent)
    spec = apply_vocab(spec, rows, tokenizer, options, path)

    def read(name: str) -> Tensor:
        md = entries[keys[name]]
        tensor = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            safe_load({keys[name]: tensor}, directory, what=f"cannot read tensor {keys[name]!r}")
        return cut_rows(name, from_torch(tensor), spec.vocab_size)

    names = list(expected_shapes(spec))
    tensor_bytes = {n: math.prod(entries[keys[n]].size) * _torch_itemsize(entries[keys[n]]) for n in names}
    codes = [torch_dtype_code(entries[keys[n]].properties.dtype) for n in names]
    return Source(path, "checkpoint", spec, tokenizer, dominant_dtype(codes), tensor_bytes, read)


def _torch_itemsize(md: Any) -> int:
    return md.properties.dtype.itemsize
