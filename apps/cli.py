"""Entry point of the `elm` command: builds the typer app from `apps.commands` modules."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import NoReturn

import typer

from apps import commands, process
from elm_spec.errors import ElmError
from elm_spec.writes import write_failure

INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# Usage errors: typer 0.2x vendors click, older versions re-export click's own classes.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="elm",
    help="Train OpenELM-style models in PyTorch, run and fine-tune them in MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(requested: bool) -> None:
    if requested:
        from apps.commands.doctor import elm_version

        print(f"elm {elm_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print elm's version and exit.")) -> None:
    """Train OpenELM-style models in PyTorch, run and fine-tune them in MLX."""


def _register_commands() -> None:
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(app)


_register_commands()


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _usage_line(error: ClickException) -> str:
    """A bad flag or value as one line: the command, what is wrong, where help is."""
    context = getattr(error, "ctx", None)
    if context is None:
        return error.format_message()
    return f"{context.command_path}: {error.format_message()} (see {context.command_path} --help)"


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        process.is_program = True
        process.reexec_with_openblas(sys.argv[1:])
    try:
        # Not typer's standalone mode: that exits 130 in silence on Ctrl-C and draws usage
        # errors as a box; every failure here is one `error:` line.
        code = app(args=argv, prog_name="elm", standalone_mode=False)
    except ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `elm` alone, or `elm data`: the help
            error.show()
            sys.exit(error.exit_code)
        _fail(_usage_line(error), error.exit_code)
    except typer.Abort:
        _fail("aborted")
    except ElmError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED)
    except OSError as error:
        failure = write_failure(error.filename or "output", error)
        _fail(str(failure) if failure else f"{error.filename or 'elm'}: {error.strerror or error}")
    if code == INTERRUPTED:  # typer turns Ctrl-C into this exit code
        _fail("interrupted", INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
