"""Makes `lm_eval --model elm` work: registers the `lm_eval.models` entry points with lm-eval.

Packages declare lm-eval model backends in the `lm_eval.models` entry-point group, but
lm-eval 0.4 never reads that group. elm's `.pth` file imports this module when Python
starts; it only puts a finder on `sys.meta_path` (nothing else is imported). When lm-eval
imports `lm_eval.models`, which fills its model registry, every declared entry point that
lm-eval does not already know is added to the registry as a lazy placeholder, so the backend
itself (`elm_eval.harness`, with torch or MLX) is imported only when `--model elm` is used.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

MODELS_PACKAGE = "lm_eval.models"
ENTRY_POINT_GROUP = "lm_eval.models"


def register_entry_points(registry: Any) -> None:
    """Add the group's entry points missing from REGISTRY."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name not in registry:
            registry.register(entry_point.name, target=entry_point.value)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs lm-eval's own loader, then registers the entry points."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        from lm_eval.api.registry import model_registry

        register_entry_points(model_registry)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)


class _ModelsImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname != MODELS_PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: find the real spec with the remaining finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Called from the .pth file; a no-op if lm-eval's models are already imported."""
    if MODELS_PACKAGE in sys.modules:
        from lm_eval.api.registry import model_registry

        register_entry_points(model_registry)
    elif not any(isinstance(finder, _ModelsImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ModelsImportHook())
