"""Decisions the `elm` program takes for its whole process, and only when it is the program
(not when `apps.cli.main` is called from Python, as tests do)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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


# Commands that run MLX on the CPU, where the OpenBLAS restart pays off. The others (train,
# data, bench, tokenizer, catlip, init, inspect, export, plot) use PyTorch or no BLAS at all.
MLX_COMMANDS = frozenset({"chat", "classify", "convert", "demo", "doctor", "eval", "finetune",
                          "fuse", "generate", "serve"})


def command_name(argv: Sequence[str]) -> str | None:
    """The subcommand in ARGV (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def reexec_with_openblas(argv: Sequence[str]) -> None:
    """On Linux, MLX's CPU wheel links a reference BLAS; restart an MLX command once with
    OpenBLAS preloaded (about 40x faster GEMMs).

    The new interpreter gets exactly this one's `sys.path` and `sys.argv[0]`: `python -m` would
    put the working directory first on the path, where a stray `yaml.py` breaks everything.
    Set ELM_OPENBLAS=0 to keep the process as it is; `elm doctor` reports what is in effect.
    """
    from elm_spec.platform import OPENBLAS_PRELOAD_ENV, openblas_preload_path

    if command_name(argv) not in MLX_COMMANDS or os.environ.get(OPENBLAS_PRELOAD_ENV) == "0":
        return
    library = openblas_preload_path()
    if library is None or library in os.environ.get("LD_PRELOAD", ""):
        return
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, OPENBLAS_PRELOAD_ENV: "0"}
    restart = (f"import sys; sys.path[:] = {sys.path!r}; sys.argv[0] = {sys.argv[0]!r}; "
               "from apps.cli import main; main()")
    os.execve(sys.executable, [sys.executable, "-c", restart, *argv], env)
