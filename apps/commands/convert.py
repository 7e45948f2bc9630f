"""`elm convert SRC DST`: model directories, CoreNet `.pt`, training checkpoints -> MLX and back."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_command(
        source: Path = typer.Argument(..., help="Model directory, MLX directory, CoreNet .pt, or "
                                                "training checkpoint directory."),
        destination: Path = typer.Argument(..., help="Directory to write (a .pt file for --to corenet)."),
        from_format: str = typer.Option(None, "--from", help="Source format: hf, mlx, corenet or "
                                                             "checkpoint (default: detected)."),
        to: str = typer.Option("mlx", "--to", help="mlx (MLX directory), torch (model directory, "
                                                   "dequantized) or corenet (.pt state dict)."),
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
        tokenizer: Path = typer.Option(None, "--tokenizer", help="tokenizer.model (or a directory "
                                                                 "holding one) the output carries."),
        verify: bool = typer.Option(False, "--verify", help="Compare the PyTorch and MLX twins' "
                                                            "logits on a probe prompt."),
        force: bool = typer.Option(False, "--force", help="Replace an existing DESTINATION."),
    ) -> None:
        """Convert a model between elm's model directory, MLX, CoreNet and training checkpoints."""
        from convert import ConvertOptions, ShapeOptions, convert

        shape = ShapeOptions(preset=preset, corenet_config=corenet_config, vocab_size=vocab_size,
                             tokenizer=tokenizer)
        options = ConvertOptions(source_kind=from_format, target=to, dtype=dtype, quantize=quantize,
                                 q_bits=q_bits, q_group_size=q_group_size, q_recipe=q_recipe,
                                 shape=shape, verify=verify, force=force)
        convert(source, destination, options)
