"""`elm init`: a randomly initialised model directory from a preset or a spec file."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from elm_spec import ElmError, ModelSpec
from elm_spec.spec_file import read_spec_file


def load_spec_argument(preset: str | None, spec_file: Path | None, vocab_size: int | None) -> ModelSpec:
    """A ModelSpec from --preset or --spec (a YAML/JSON file of ModelSpec or config.json keys)."""
    if (preset is None) == (spec_file is None):
        raise ElmError("give exactly one of --preset NAME or --spec FILE")
    if vocab_size is not None and vocab_size < 1:
        raise ElmError(f"--vocab-size must be at least 1, got {vocab_size}")
    spec = ModelSpec.from_preset(preset) if preset is not None else read_spec_file(spec_file)
    return spec.replace(vocab_size=vocab_size) if vocab_size is not None else spec


def check_fits_in_memory(spec: ModelSpec) -> None:
    """Refuse, before allocating, a model whose float32 weights exceed this machine's memory."""
    needed = 4 * spec.num_parameters()
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: let the allocator decide
        return
    if needed > available:
        raise ElmError(f"this model has {spec.num_parameters():,} parameters: {needed / 1e9:,.1f} GB "
                       f"of float32 weights, more than this machine's {available / 1e9:,.1f} GB "
                       "of memory (check --vocab-size and the spec)")


def carried_tokenizer(value: str, spec: ModelSpec, vocab_given: bool
                      ) -> tuple[Path, ModelSpec, str | None]:
    """The tokenizer.model for --tokenizer VALUE (a path or a Hub repo), the spec sized to it
    unless --vocab-size was given, and a note when that shrinks the preset's embedding."""
    from elm_spec.hub import resolve_tokenizer
    from elm_spec.tokenizer import SENTENCEPIECE_FILE, Tokenizer

    path = resolve_tokenizer(value)
    tokenizer_file = path / SENTENCEPIECE_FILE if path.is_dir() else path
    if not path.exists():
        raise ElmError(f"--tokenizer {value}: not found")
    if not tokenizer_file.is_file():
        raise ElmError(f"--tokenizer {value}: no {SENTENCEPIECE_FILE} in that directory")
    pieces = Tokenizer(tokenizer_file).vocab_size
    if vocab_given:
        if pieces > spec.vocab_size:
            raise ElmError(f"{tokenizer_file}: has {pieces} pieces, more than --vocab-size "
                           f"{spec.vocab_size}")
        return tokenizer_file, spec, None
    sized = spec.replace(vocab_size=pieces)
    note = None
    if pieces < spec.vocab_size:
        before, after = spec.num_parameters(), sized.num_parameters()
        note = (f"note: the tokenizer has {pieces:,} pieces, fewer than the spec's vocabulary of "
                f"{spec.vocab_size:,}: the embedding shrinks to {pieces:,} rows "
                f"({before / 1e6:,.1f}M -> {after / 1e6:,.1f}M parameters, "
                f"{(before - after) / 1e6:,.1f}M fewer); pass --vocab-size {spec.vocab_size} "
                "to keep the spec's")
    return tokenizer_file, sized, note


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(
        destination: Path = typer.Argument(..., help="Model directory to create."),
        preset: str = typer.Option(None, "--preset", help="Preset name, e.g. OpenELM-270M."),
        spec_file: Path = typer.Option(None, "--spec", help="YAML or JSON file of spec keys."),
        tokenizer: str = typer.Option(None, "--tokenizer",
                                      help="tokenizer.model, a directory holding one, or a Hub "
                                           "repo id (ORG/NAME[@REV]) to carry."),
        vocab_size: int = typer.Option(None, "--vocab-size", help="Override the vocabulary size."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
        seed: int = typer.Option(0, "--seed"),
        force: bool = typer.Option(False, "--force", help="Replace an existing DESTINATION."),
    ) -> None:
        """Write a randomly initialised model directory (CoreNet initialisation)."""
        from elm_train.modeldir import init_model, save_model_dir

        spec = load_spec_argument(preset, spec_file, vocab_size)
        notes = []
        tokenizer_file = None
        if tokenizer is not None:
            tokenizer_file, spec, note = carried_tokenizer(tokenizer, spec, vocab_size is not None)
            notes += [note] if note else []
        else:
            notes.append(f"note: {destination} has no tokenizer, and elm convert, generate, "
                         "finetune and eval need one: run again with --tokenizer PATH|ORG/NAME "
                         "(a tokenizer.model, e.g. from `elm tokenizer train`), or copy "
                         f"tokenizer.model into {destination}")
        check_fits_in_memory(spec)
        model = init_model(spec, seed=seed)
        save_model_dir(model.state_dict(), spec, destination, tokenizer_file, dtype=dtype, force=force)
        typer.echo(f"{destination}: {spec.describe()}"
                   + (f"; tokenizer {tokenizer_file}" if tokenizer_file else ""))
        for note in notes:
            typer.echo(note)
