"""The PyTorch side of elm: the OpenELM twin, data, training, distributed, benchmarks, CatLIP, eval."""

from __future__ import annotations

from typing import Any

__all__ = ["OpenELM", "load_model", "save_model_dir"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so torch-free parts (the CatLIP caption tools) load without torch.
    if name == "OpenELM":
        from elm_train.model import OpenELM

        return OpenELM
    if name in ("load_model", "save_model_dir"):
        from elm_train import modeldir

        return getattr(modeldir, name)
    raise AttributeError(f"module 'elm_train' has no attribute {name!r}")
