"""`elm tokenizer train` and `elm tokenizer check`: Llama-2-layout SentencePiece tokenizers."""

from __future__ import annotations

import itertools
from pathlib import Path

import typer

from apps.commands.data import FORMAT_HELP


def register(app: typer.Typer) -> None:
    tokenizer_app = typer.Typer(help="Train or check SentencePiece tokenizers.",
                                no_args_is_help=True)
    app.add_typer(tokenizer_app, name="tokenizer")

    @tokenizer_app.command("train")
    def train(
        sources: list[str] = typer.Argument(
            ..., help="Files, directories or globs, in the formats `elm data prepare` reads."),
        vocab_size: int = typer.Option(..., "--vocab-size", help="Number of pieces."),
        out: Path = typer.Option(..., "--out", help="Directory for tokenizer.model and configs."),
        text_key: str = typer.Option("text", "--text-key",
                                     help="JSON key or Parquet column holding the text."),
        text_per_line: bool = typer.Option(False, "--text-per-line",
                                           help="Plain text: each line is a document."),
        source_format: str = typer.Option(None, "--format", help=FORMAT_HELP),
        max_documents: int = typer.Option(None, "--max-documents",
                                          help="Train on the first N documents only."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    ) -> None:
        """Train a BPE tokenizer with byte fallback (unk 0, bos 1, eos 2, as Llama-2)."""
        from elm_spec.modeldir import atomic_output_dir
        from elm_spec.tokenizer import Tokenizer, train_tokenizer
        from elm_train.data.sources import ReadOptions, expand_sources, iter_texts

        files = expand_sources(sources, source_format)
        texts = iter_texts(files, ReadOptions(text_key, text_per_line))
        read = {"documents": 0, "chars": 0}

        def counted(stream):
            for text in stream:
                read["documents"] += 1
                read["chars"] += len(text)
                yield text

        with atomic_output_dir(out, force=force) as staging:
            model = train_tokenizer(counted(itertools.islice(texts, max_documents)),
                                    vocab_size, staging)
            pieces = Tokenizer(model).vocab_size
        typer.echo(f"{out}: {pieces}-piece tokenizer trained on {read['documents']} documents "
                   f"({read['chars']:,} characters)")

    @tokenizer_app.command("check")
    def check(
        path: Path = typer.Argument(..., help="tokenizer.model, or a directory holding one."),
        text: str = typer.Option(None, "--text", help="Also show how TEXT is encoded."),
    ) -> None:
        """Check that a tokenizer has the Llama-2 layout elm needs, and describe it."""
        from elm_spec.tokenizer import Tokenizer
        from elm_train.data.format import token_dtype

        tokenizer = Tokenizer(path)
        processor = tokenizer.processor
        typer.echo(f"{tokenizer.path}: {describe_model(tokenizer.path)}, "
                   f"{tokenizer.vocab_size} pieces")
        special = [f"{name} {i} {processor.IdToPiece(i)}" for name, i in
                   (("unk", processor.unk_id()), ("bos", processor.bos_id()),
                    ("eos", processor.eos_id()), ("pad", processor.pad_id())) if i >= 0]
        typer.echo(f"special ids: {', '.join(special)}")
        typer.echo(f"prepared data dtype: {token_dtype(tokenizer.vocab_size).name}")
        if text is not None:
            ids = tokenizer.encode(text)
            typer.echo(f"ids: {ids}")
            typer.echo(f"pieces: {[processor.IdToPiece(i) for i in ids]}")


def describe_model(model_file: Path) -> str:
    """Model type, byte fallback and normalisation, from the SentencePiece model's own spec."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    trainer = proto.trainer_spec
    model_type = model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
    fallback = "yes" if trainer.byte_fallback else "no"
    return (f"SentencePiece {model_type}, byte fallback {fallback}, "
            f"normalization {proto.normalizer_spec.name or 'none'}")
