"""Decisions the `elm` program takes for its whole process, and only when it is the program
(not when `apps.cli.main` is called from Python, as tests do)."""

from __future__ import annotations

import sys

is_program = False  # set by apps.cli.main when elm runs as a command


def keep_torch_out() -> None:
    """Keep PyTorch out of an MLX-only command.

    transformers (which reads the tokenizer for mlx-lm) imports torch whenever it is installed:
    about 210 MB of resident memory and over a second of start-up in a command that never uses
    it. A None entry in sys.modules is Python's documented way to mark a module absent:
    transformers then sees no torch, and `import torch` fails. A no-op once torch is imported.
    """
    if is_program:
        sys.modules.setdefault("torch", None)
