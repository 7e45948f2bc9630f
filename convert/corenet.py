"""CoreNet's side of OpenELM: its YAML configs, tensor names and flat `.pt` state dicts.

CoreNet names drop the HF `transformer.` prefix and call an untied head `classifier`; it trains
with 32128 embedding rows (32000 Llama-2 pieces, pad id 32000, hardware padding), which import
cuts to the tokenizer's size (docs/reference.md section 2).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elm_spec import ElmError, ModelSpec
from elm_spec.errors import first_line
from elm_spec.outputs import clean_leftovers, output_lock

CORENET_VOCAB_SIZE = 32128
LLAMA_VOCAB_SIZE = 32000
HF_PREFIX = "transformer."
CORENET_HEAD = "classifier.weight"
HF_HEAD = "lm_head.weight"
# Wrappers a training script may leave around the model's own names.
NESTED_STATE_KEYS = ("model", "model_state_dict", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def hf_name(corenet_name: str) -> str:
    return HF_HEAD if corenet_name == CORENET_HEAD else HF_PREFIX + corenet_name


def corenet_name(name: str) -> str:
    if name == HF_HEAD:
        return CORENET_HEAD
    if not name.startswith(HF_PREFIX):
        raise ElmError(f"tensor {name!r} has no CoreNet name")
    return name[len(HF_PREFIX):]


def strip_wrappers(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def spec_from_corenet_yaml(path: Path) -> tuple[ModelSpec, int]:
    """The ModelSpec of a CoreNet OpenELM config (`model.language_modeling.general_gpt`) and
    the embedding rows it trains with (its `vocab_size`, usually 32128)."""
    import yaml

    if not path.is_file():
        raise ElmError(f"{path}: not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ElmError(f"{path}: not valid YAML ({first_line(error)})") from None
    section: Any = config
    key_path = "model.language_modeling.general_gpt"
    for key in key_path.split("."):
        if not isinstance(section, dict) or key not in section:
            raise ElmError(f"{path}: no {key_path} section (not a CoreNet language-model config)")
        section = section[key]
    if not isinstance(section, dict) or "model_name" not in section:
        raise ElmError(f"{path}: {key_path}.model_name is missing")
    name = section["model_name"]
    try:
        spec = ModelSpec.from_preset(str(name))
    except ElmError as error:
        raise ElmError(f"{path}: {key_path}.model_name: {error}") from None
    rows = int(section.get("vocab_size") or CORENET_VOCAB_SIZE)
    context = section.get("max_context_length")
    if context:
        spec = spec.replace(max_context_length=int(context))
    return spec, rows


def load_state_dict(path: Path) -> dict[str, Any]:
    """A flat {name: tensor} state dict from a `.pt` file, never executing pickled code.

    `torch.load(weights_only=True)` refuses any object that is not a tensor or a plain container;
    the file is memory-mapped where its format allows, so tensors are paged in one at a time.
    """
    import torch

    if not path.is_file():
        raise ElmError(f"{path}: not found")
    try:
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ElmError(f"{path}: not a plain state dict; refused to unpickle it "
                       f"({first_line(error, 200, 'unsupported object')})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ElmError(f"{path}: truncated or corrupt checkpoint ({first_line(error, 200)})") from None
    if isinstance(state, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise ElmError(f"{path}: not a state dict (expected a mapping of tensor names to tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ElmError(f"{path}: not a plain state dict (entry {key!r} is a {type(value).__name__})")
    return {strip_wrappers(key): value for key, value in state.items()}


@contextlib.contextmanager
def atomic_output_file(destination: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside DST; on success it replaces DST in one rename."""
    if destination.is_dir():
        raise ElmError(f"{destination}: is a directory; --to corenet writes a .pt file")
    with output_lock(destination):
        clean_leftovers(destination)
        if destination.exists() and not force:
            raise ElmError(f"{destination}: already exists (use --force to replace it)")
        staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
        try:
            yield staging
            os.replace(staging, destination)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
