"""The PyTorch side of elm: the OpenELM twin, data, training, distributed, benchmarks, CatLIP, eval."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OpenELM", "load_model", "save_model_dir"]

# Imported on first use, so that torch-free parts (data preparation, CatLIP caption tools) start without torch.
_EXPORTS = {"OpenELM": "elm_train.model", "load_model": "elm_train.modeldir",
            "save_model_dir": "elm_train.modeldir"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'elm_train' has no attribute {name!r}")
