"""`elm convert SRC DST`: model directories, CoreNet `.pt`, training checkpoints -> MLX and back."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_command(
        source: str = typer.Argument(..., help="Model directory, MLX directory, CoreNet .pt, "
                                               "training checkpoint directory, or Hub repo "
                                               "(org/name[@revision])."),
        destination: Path = typer.Argument(..., help="Directory to write (a .pt file for --to corenet)."),
        from_format: str = typer.Option(None, "--from", help="Source format: hf, mlx, corenet or "
                                                             "checkpoint (default: detected)."),
        to: str = typer.Option("mlx", "--to", help="mlx (MLX directory), torch (model directory, "
                                                   "dequantized), corenet (.pt state dict) or gguf "
                                                   "(llama.cpp file)."),
        outtype: str = typer.Option(None, "--outtype", help="GGUF tensor type: f32, f16 (default), "
                                    "bf16 or q8_0."),
        dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the "
                                                        "source's; bfloat16 for 3B-class models)."),
        quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (affine)."),
        q_bits: int = typer.Option(4, "--q-bits", help="Bits per weight: 4 or 8."),
        q_group_size: int = typer.Option(64, "--q-group-size", help="Group size: 32, 64 or 128."),
        q_recipe: str = typer.Option(None, "--q-recipe", help="OpenELM mixed recipe: mixed_4_6 or "
                                                              "mixed_4_8 (implies --quantize)."),
        corenet_config: Path = typer.Option(None, "--corenet-config",
                                            help="CoreNet YAML that shapes a CoreNet .pt."),
        preset: str = typer.Option(None, "--preset", help="Preset that shapes a CoreNet .pt or "
                                                          "checkpoint, e.g. OpenELM-270M."),
        vocab_size: int = typer.Option(None, "--vocab-size", help="Embedding rows to keep (import; "
                                       "default: the tokenizer's size) or to pad to (--to corenet)."),
        tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer.model (or a directory "
                                      "holding one, or a Hub repo) the output carries."),
        revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or "
                                     "commit) of SOURCE."),
        upload_repo: str = typer.Option(None, "--upload-repo", help="Publish the output to this "
                                        "Hub repo (ORG/NAME), with a model card."),
        verify: bool = typer.Option(False, "--verify", help="Compare the PyTorch and MLX twins' "
                                                            "logits on a probe prompt."),
        force: bool = typer.Option(False, "--force", help="Replace an existing DESTINATION."),
    ) -> None:
        """Convert a model between elm's model directory, MLX, CoreNet and training checkpoints."""
        from convert import ConvertOptions, ShapeOptions, convert
        from elm_spec.hub import resolve_source, resolve_tokenizer

        tokenizer_path = resolve_tokenizer(tokenizer) if tokenizer is not None else None
        source_path = resolve_source(source, revision, tokenizer_given=tokenizer is not None)
        shape = ShapeOptions(preset=preset, corenet_config=corenet_config, vocab_size=vocab_size,
                             tokenizer=tokenizer_path)
        options = ConvertOptions(source_kind=from_format, target=to, dtype=dtype, quantize=quantize,
                                 q_bits=q_bits, q_group_size=q_group_size, q_recipe=q_recipe,
                                 shape=shape, verify=verify, force=force, outtype=outtype)
        report = convert(source_path, destination, options)
        if upload_repo is not None:
            from elm_spec.hub import model_card, publish

            card = model_card(upload_repo, source if source != str(source_path) else None, to,
                              report.verify.figures() if report.verify is not None else None)
            typer.echo(f"uploaded {destination} to {publish(destination, upload_repo, card)}")
