"""Count device-to-host synchronisations per optimizer step (a diagnostic for the step loop).

Every way a tensor's value reaches Python (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`bool()`, `float()`, `int()`) makes the host wait for the device to finish all queued work.
On a CPU the wait is free, but the calls are the same ones that stall a GPU, so counting them
on a CPU shows where a GPU run would stall.

    with HostSyncCounter() as counter:
        train(config)
    counter.per_step   # {step: syncs made after optimizer step `step` until the next one}
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class HostSyncCounter:
    """Wraps the syncing Tensor methods and torch.optim's step hook while in use."""

    def __init__(self) -> None:
        self.step = 0
        self.per_step: collections.Counter[int] = collections.Counter()
        self._originals: dict[str, Any] = {}
        self._hook: Any = None

    def _wrap(self, name: str) -> Any:
        original = self._originals[name]

        @functools.wraps(original)
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.per_step[self.step] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step += 1

    def __enter__(self) -> HostSyncCounter:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        for name in SYNCING_METHODS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        self._hook = register_optimizer_step_post_hook(self._after_optimizer_step)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._hook.remove()
