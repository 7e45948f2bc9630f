"""`elm export CKPT DST`: a training checkpoint to a model directory `elm convert` takes."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        checkpoint: Path = typer.Argument(..., help="A step-N checkpoint directory, or a checkpoint "
                                                    "directory (its newest complete step)."),
        destination: Path = typer.Argument(..., help="Model directory to write."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
        force: bool = typer.Option(False, "--force", help="Replace an existing DESTINATION."),
        upload_repo: str = typer.Option(None, "--upload-repo", help="Publish the output to this "
                                        "Hub repo (ORG/NAME), with a model card."),
    ) -> None:
        """Write consolidated safetensors, config.json and tokenizer files from a checkpoint."""
        from elm_spec.hf_config import reader_notes
        from elm_spec.modeldir import read_config, read_spec
        from elm_train.export import export_checkpoint

        written = export_checkpoint(checkpoint, destination, dtype=dtype, force=force)
        typer.echo(f"{written}")
        config = written / "config.json"
        if config.is_file() and read_config(written).get("model_type") == "openelm":
            for note in reader_notes(read_spec(written), written):
                typer.echo(note)
        if upload_repo is not None:
            from elm_spec.hub import model_card, publish

            card = model_card(upload_repo, None, "transformers")
            typer.echo(f"uploaded {written} to {publish(written, upload_repo, card)}")
