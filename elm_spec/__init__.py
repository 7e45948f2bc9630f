"""The layer-wise scaling spec shared by the PyTorch and MLX twins, and the on-disk contract."""

from elm_spec.errors import ElmError
from elm_spec.spec import ModelSpec, make_divisible

__all__ = ["ElmError", "ModelSpec", "make_divisible"]
