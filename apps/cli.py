"""Entry point of the `elm` command: builds the typer app from `apps.commands` modules."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from apps import commands, process
from elm_spec.errors import ElmError

app = typer.Typer(
    name="elm",
    help="Train OpenELM-style models in PyTorch, run and fine-tune them in MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Train OpenELM-style models in PyTorch, run and fine-tune them in MLX."""


def _register_commands() -> None:
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(app)


_register_commands()


def _reexec_with_openblas() -> None:
    """On Linux, MLX's CPU wheel links a reference BLAS; restart once with OpenBLAS preloaded.

    Set ELM_OPENBLAS=0 to keep the process as it is. `elm doctor` reports what is in effect.
    """
    from elm_spec.platform import OPENBLAS_PRELOAD_ENV, openblas_preload_path

    library = openblas_preload_path()
    if library is None or os.environ.get(OPENBLAS_PRELOAD_ENV) == "0":
        return
    if library in os.environ.get("LD_PRELOAD", ""):
        return
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, OPENBLAS_PRELOAD_ENV: "0"}
    os.execve(sys.executable, [sys.executable, "-m", "apps", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        process.is_program = True
        _reexec_with_openblas()
    try:
        app(args=argv, prog_name="elm", standalone_mode=True)
    except ElmError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
