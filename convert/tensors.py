"""Tensors as numpy storage plus a safetensors dtype code, so bf16 needs neither torch nor MLX.

numpy has no bfloat16: BF16 tensors are held as their raw uint16 bits and converted with
round-to-nearest-even, the rounding torch and MLX use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from elm_spec import ElmError

STORAGE: dict[str, type[np.generic]] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "U32": np.uint32, "I16": np.int16, "U16": np.uint16,
    "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


def dtype_code(name: str) -> str:
    if name not in DTYPE_CODES:
        raise ElmError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CODES)}")
    return DTYPE_CODES[name]


@dataclass(frozen=True)
class Tensor:
    """`data` holds the storage (uint16 bits for BF16); `dtype` is the safetensors code."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    def float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        return self.data.astype(np.float32, copy=False)

    def cast(self, code: str) -> Tensor:
        if code == self.dtype:
            return self
        return from_float32(self.float32(), code)

    def count_nonfinite(self) -> int:
        if not self.is_float:
            return 0
        flat = self.data.reshape(-1)
        if self.dtype == "BF16":  # exponent bits all set: inf or NaN
            return sum(int(np.count_nonzero((flat[c] & 0x7F80) == 0x7F80)) for c in _chunks(flat.size))
        return sum(int(flat[c].size - np.count_nonzero(np.isfinite(flat[c]))) for c in _chunks(flat.size))


# Element-wise work goes in slices of this many elements, so temporaries stay small next to
# the largest tensor (an OpenELM-3B embedding is 393 MB in fp32).
CHUNK_ELEMENTS = 1 << 22


def _chunks(size: int) -> list[slice]:
    return [slice(start, min(start + CHUNK_ELEMENTS, size)) for start in range(0, size, CHUNK_ELEMENTS)]


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits, in place on one temporary.

    NaN stays non-finite (a NaN whose payload sits in the low bits rounds to inf), which is
    what the converter's NaN/inf check needs; quiet NaNs stay NaN.
    """
    bits = values.view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded


def from_float32(array: np.ndarray, code: str) -> Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if code == "BF16":
        flat = array.reshape(-1)
        out = np.empty(flat.size, dtype=np.uint16)
        for c in _chunks(flat.size):
            out[c] = _bfloat16_bits(flat[c])
        return Tensor(out.reshape(array.shape), "BF16")
    if code == "F16":
        with np.errstate(over="ignore"):
            return Tensor(array.astype(np.float16), "F16")
    if code == "F32":
        return Tensor(array, "F32")
    raise ElmError(f"cannot convert to dtype {code}")


def torch_dtype_code(dtype: Any) -> str:
    """The safetensors code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
             "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}
    if name not in codes:
        raise ElmError(f"unsupported tensor dtype {name}")
    return codes[name]


def from_torch(tensor: Any) -> Tensor:
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    code = torch_dtype_code(tensor.dtype)
    if code == "BF16":
        return Tensor(tensor.view(torch.int16).numpy().view(np.uint16), "BF16")
    return Tensor(tensor.numpy(), code)


def to_torch(tensor: Tensor) -> Any:
    import torch

    if tensor.dtype == "BF16":
        return torch.from_numpy(tensor.data.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(tensor.data.copy())


def to_mlx(tensor: Tensor) -> Any:
    import mlx.core as mx

    if tensor.dtype == "BF16":
        return mx.array(tensor.data).view(mx.bfloat16)
    return mx.array(tensor.data)


def from_mlx(array: Any) -> Tensor:
    import mlx.core as mx

    codes = {mx.float32: "F32", mx.float16: "F16", mx.uint32: "U32"}
    if array.dtype == mx.bfloat16:
        return Tensor(np.array(array.view(mx.uint16)), "BF16")
    if array.dtype not in codes:
        raise ElmError(f"unsupported MLX dtype {array.dtype}")
    return Tensor(np.array(array), codes[array.dtype])
