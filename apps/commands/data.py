"""`elm data prepare`: tokenize text corpora into packed token shards for `elm train`."""

from __future__ import annotations

from pathlib import Path

import typer

from elm_spec import ElmError

FORMAT_HELP = "Read every source as this format: txt, jsonl, jsonl.gz or parquet (default: by name)."


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("prepare")
    def prepare(
        sources: list[str] = typer.Argument(
            None, show_default=False, help="Files, directories (searched recursively) or globs: .txt, .jsonl, "
                      ".json.gz/.jsonl.gz, .parquet; or Hub datasets, streamed: "
                      "hf://datasets/ORG/NAME[@REV][/GLOB][?split=train&column=text]."),
        mix: Path = typer.Option(None, "--mix",
                                 help="A mix file instead of SOURCES: named sources with weights "
                                      "(token shares of the output); see docs/data.md."),
        tokenizer: Path = typer.Option(..., "--tokenizer",
                                       help="tokenizer.model, or a directory holding one."),
        out: Path = typer.Option(..., "--out", help="Data directory to create."),
        text_key: str = typer.Option("text", "--text-key",
                                     help="JSON key or Parquet column holding the text."),
        text_per_line: bool = typer.Option(False, "--text-per-line",
                                           help="Plain text: each line is a document "
                                                "(default: each file is one)."),
        source_format: str = typer.Option(None, "--format", help=FORMAT_HELP),
        min_chars: int = typer.Option(200, "--min-chars",
                                      help="Drop documents with fewer characters (CoreNet's "
                                           "count: lowercased, punctuation removed)."),
        min_tokens: int = typer.Option(256, "--min-tokens",
                                       help="Drop documents with fewer tokens (corenet: chunks, "
                                            "counting BOS and EOS)."),
        layout: str = typer.Option("packed", "--layout",
                                   help="packed (documents each followed by EOS, packed into "
                                        "windows: no token wasted) or corenet (CoreNet's rows: "
                                        "chunks of --chunk-words words, ftfy NFC, BOS and EOS, "
                                        "filters per chunk; train pads or cuts each row)."),
        chunk_words: int = typer.Option(2048, "--chunk-words",
                                        help="corenet layout: words per document chunk."),
        valid_fraction: float = typer.Option(0.01, "--valid-fraction",
                                             help="Share of documents held out as `valid`."),
        seed: int = typer.Option(0, "--seed", help="Seed of the train/valid assignment."),
        shard_tokens: int = typer.Option(100_000_000, "--shard-tokens",
                                         help="Tokens per shard file."),
        workers: int = typer.Option(None, "--workers",
                                    help="Tokenizing processes (default: all cores)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
        backend: str = typer.Option("local", "--backend",
                                    help="local (a process pool, the default) or datatrove "
                                         "(--tasks tasks with parts in --work-dir, then a merge; "
                                         "same bytes)."),
        tasks: int = typer.Option(None, "--tasks",
                                  help="datatrove backend: number of tasks (default: --workers)."),
        work_dir: Path = typer.Option(None, "--work-dir",
                                      help="datatrove backend: where parts and task logs live; "
                                           "rerun with the same one to resume (default: "
                                           "OUT.work)."),
    ) -> None:
        """Filter, tokenize and pack text into token shards with a held-out split."""
        from elm_train.data.mix import read_mix
        from elm_train.data.prepare import PrepareOptions, default_workers, prepare_data

        if mix is not None and sources:
            raise ElmError("give SOURCES or --mix, not both")
        if mix is None and not sources:
            raise ElmError("no sources given (SOURCES... or --mix FILE)")
        inputs = read_mix(mix) if mix is not None else sources
        options = PrepareOptions(
            text_key=text_key, text_per_line=text_per_line, source_format=source_format,
            min_chars=min_chars, min_tokens=min_tokens, valid_fraction=valid_fraction, seed=seed,
            shard_tokens=shard_tokens, workers=workers or default_workers(), layout=layout,
            chunk_words=chunk_words)
        if backend == "local":
            stats = prepare_data(inputs, tokenizer, out, options, force=force)
        elif backend == "datatrove":
            from elm_train.data.distributed import prepare_data_distributed

            stats = prepare_data_distributed(
                inputs, tokenizer, out, work_dir or out.with_name(out.name + ".work"),
                tasks or options.workers, options, force=force)
        else:
            raise ElmError(f"--backend must be local or datatrove, got {backend!r}")
        typer.echo(describe_stats(out, stats, options))
        unit = "rows" if "rows" in stats else "documents"
        if valid_fraction > 0 and stats[unit]["valid"] == 0:
            kept = stats.get("chunks_kept", stats.get("documents_kept"))
            typer.echo(f"warning: no document fell in the valid split "
                       f"(--valid-fraction {valid_fraction} of {kept} {unit})", err=True)


def describe_stats(out: Path, stats: dict, options) -> str:
    """The summary line, then (for several sources) a line per source."""
    tokens = stats["tokens"]
    mixed = f", {stats['dropped_mix']} left out by the mix weights" if stats["dropped_mix"] else ""
    filtered = (f"{stats['dropped_min_chars']} under {options.min_chars} characters, "
                f"{stats['dropped_min_tokens']} under {options.min_tokens} tokens, "
                f"{stats['undecodable_skipped']} undecodable{mixed}")
    if "rows" in stats:  # corenet layout: the filters judge chunks, each kept chunk is a row
        rows = stats["rows"]
        lines = [f"{out}: {stats['chunks_kept']} of {stats['chunks_read']} chunks of at most "
                 f"{options.chunk_words} words kept, from {stats['documents_read']} documents "
                 f"({filtered}); train {tokens['train']:,} tokens in {rows['train']} rows, "
                 f"valid {tokens['valid']:,} tokens in {rows['valid']} rows"]
    else:
        documents = stats["documents"]
        lines = [f"{out}: {stats['documents_kept']} of {stats['documents_read']} documents kept "
                 f"({filtered}); "
                 f"train {tokens['train']:,} tokens in {documents['train']} documents, "
                 f"valid {tokens['valid']:,} tokens in {documents['valid']} documents"]
    sources = stats["sources"]
    if len(sources) > 1:
        total = max(tokens["train"] + tokens["valid"], 1)
        weights = sum(s["weight"] or 0 for s in sources)
        for source in sources:
            count = source["tokens"]["train"] + source["tokens"]["valid"]
            line = (f"  {source['name']}: {count:,} tokens ({100 * count / total:.2f}%) in "
                    f"{source['documents']['train'] + source['documents']['valid']:,} documents")
            if source["weight"] is not None:
                line += (f"; weight {source['weight']:g} ({100 * source['weight'] / weights:.2f}%)"
                         f", {source['tokens_before_mix']:,} tokens before the mix")
            lines.append(line)
    return "\n".join(lines)
