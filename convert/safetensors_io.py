"""Streaming safetensors: one tensor read at a time, shards written tensor by tensor.

The safetensors library writes a file from a complete dict of tensors, so a 5 GB shard needs
5 GB of buffers. Every output shape and dtype is known before conversion starts, so here each
shard's header is written first and the tensors follow one by one: peak memory is the largest
tensor, not the shard (measured in benchmarks/results/convert.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from convert.tensors import STORAGE, Tensor
from elm_spec import ElmError
from elm_spec.modeldir import (
    INDEX_FILE,
    MAX_SHARD_BYTES,
    SAFETENSORS_DTYPE_BYTES,
    SINGLE_WEIGHTS_FILE,
    TensorInfo,
    write_weight_index,
)


def read_tensor(info: TensorInfo) -> Tensor:
    """One tensor of a safetensors file, read into its own buffer (no mapping of the file)."""
    if info.dtype not in STORAGE:
        raise ElmError(f"{info.file}: unsupported dtype {info.dtype}")
    count = math.prod(info.shape)
    try:
        data = np.fromfile(info.file, dtype=STORAGE[info.dtype], count=count, offset=info.offset)
    except OSError as error:
        raise ElmError(f"{info.file}: cannot be read ({error})") from None
    if data.size != count:
        raise ElmError(f"{info.file}: truncated")
    return Tensor(data.reshape(info.shape), info.dtype)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return SAFETENSORS_DTYPE_BYTES[self.dtype] * math.prod(self.shape)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int = MAX_SHARD_BYTES
                ) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most MAX_SHARD_BYTES (a larger tensor alone)."""
    shards: list[list[PlannedTensor]] = []
    size = 0
    for tensor in tensors:
        if not shards or size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors, in plan order, into `model.safetensors` or numbered shards + index."""

    def __init__(self, directory: Path, tensors: Sequence[PlannedTensor], file_format: str,
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory = directory
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.format = file_format
        self.order = [t for shard in self.shards for t in shard]
        self.position = 0
        self.handle: BinaryIO | None = None
        self.shard_number = 0
        self.remaining_in_shard = 0

    def file_name(self, number: int) -> str:
        if len(self.shards) == 1:
            return SINGLE_WEIGHTS_FILE
        return f"model-{number + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_next_shard(self) -> None:
        shard = self.shards[self.shard_number]
        header: dict[str, object] = {"__metadata__": {"format": self.format}}
        offset = 0
        for tensor in shard:
            header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.handle = (self.directory / self.file_name(self.shard_number)).open("wb")
        self.handle.write(len(encoded).to_bytes(8, "little"))
        self.handle.write(encoded)
        self.remaining_in_shard = len(shard)

    def write(self, name: str, tensor: Tensor) -> None:
        planned = self.order[self.position]
        if (name, tensor.dtype, tensor.shape) != (planned.name, planned.dtype, planned.shape):
            raise ElmError(f"internal error: wrote {name} {tensor.dtype} {list(tensor.shape)}, "
                           f"planned {planned.name} {planned.dtype} {list(planned.shape)}")
        if self.handle is None:
            self._open_next_shard()
        assert self.handle is not None
        self.handle.write(memoryview(np.ascontiguousarray(tensor.data)).cast("B"))
        self.position += 1
        self.remaining_in_shard -= 1
        if self.remaining_in_shard == 0:
            self.handle.close()
            self.handle = None
            self.shard_number += 1

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self) -> None:
        """Every planned tensor must have been written; writes the index when sharded."""
        if self.position != len(self.order):
            raise ElmError(f"internal error: {len(self.order) - self.position} tensors not written")
        if len(self.shards) > 1:
            files = {t.name: self.file_name(n) for n, shard in enumerate(self.shards) for t in shard}
            write_weight_index(self.directory, files, sum(t.nbytes for t in self.order))
        else:
            (self.directory / INDEX_FILE).unlink(missing_ok=True)
