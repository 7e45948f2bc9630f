"""Reading torch.distributed.checkpoint directories without executing anything from them.

DCP itself unpickles `.metadata` with plain `pickle.load` and non-tensor values (optimizer
hyper-parameters) with `torch.load(weights_only=False)`: a crafted checkpoint would run code in
every command that reads it. Here `.metadata` goes through an unpickler that admits only DCP's
own metadata classes, every stored value through `torch.load(weights_only=True)`, and every
storage file named by the metadata must lie inside the checkpoint directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from elm_spec import ElmError
from elm_spec.errors import first_line
from elm_spec.modeldir import listed_file

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


class SafeFileSystemReader(dcp.FileSystemReader):
    """A FileSystemReader whose metadata cannot run code or name files outside its directory."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with self.fs.create_stream(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
                IndexError, ImportError) as error:
            raise ElmError(f"{path}: not checkpoint metadata; refused to unpickle it ({error})"
                           ) from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ElmError(f"{path}: not checkpoint metadata (holds {type(metadata).__name__})")
        _check_storage_files(metadata, Path(self.path), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage_files(metadata: dcp_metadata.Metadata, directory: Path, source: Path) -> None:
    """Every storage file the metadata names lies inside DIRECTORY and is as long as the metadata
    needs: a truncated shard is caught here, before anything is read from it."""
    needed: dict[Path, int] = {}
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo):
            raise ElmError(f"{source}: malformed storage entry ({type(info).__name__})")
        file = listed_file(directory, info.relative_path, source)
        needed[file] = max(needed.get(file, 0), int(info.offset) + int(info.length))
    for file, size in needed.items():
        try:
            found = file.stat().st_size
        except OSError as error:
            raise ElmError(f"{file}: damaged ({error.strerror or error})") from None
        if found < size:
            raise ElmError(f"{file}: damaged (truncated: {found:,} bytes, the checkpoint metadata "
                           f"needs {size:,})")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ElmError(f"value {read_item.dest_index.fqn!r}: refused to unpickle it "
                           f"({first_line(error, 200, 'unpickling refused')})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def read_metadata(directory: str | os.PathLike[str]) -> dcp_metadata.Metadata:
    """The metadata of the DCP checkpoint in DIRECTORY (ElmError if it cannot be trusted/read)."""
    metadata_file = Path(directory) / ".metadata"
    try:
        return SafeFileSystemReader(str(directory)).read_metadata()
    except OSError as error:
        raise ElmError(f"{metadata_file}: cannot be read ({error.strerror or error})") from None


SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns when it runs without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
        yield


def safe_load(state: dict[str, Any], directory: str | os.PathLike[str], *, no_dist: bool = True,
              what: str = "cannot be loaded into this model") -> None:
    """`dcp.load(STATE)` from DIRECTORY in place; every failure becomes one ElmError line."""
    read_metadata(directory)  # first, so that DCP never logs its fallback for unreadable metadata
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)),
                     planner=SafeLoadPlanner(), no_dist=no_dist)
    except ElmError:
        raise
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        cause = original_error(error)
        if isinstance(cause, ElmError):
            raise ElmError(str(cause)) from None
        raise ElmError(f"{directory}: {what} ({first_line(cause)})") from None


def original_error(error: BaseException) -> BaseException:
    """The first rank's own exception inside a CheckpointException (else ERROR itself)."""
    if isinstance(error, CheckpointException) and error.failures:
        inner = next(iter(error.failures.values()))[0]
        return original_error(inner)
    return error


