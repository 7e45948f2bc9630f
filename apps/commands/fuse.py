"""`elm fuse`: merge adapters into a model directory, or export it for PyTorch and HF."""

from __future__ import annotations

import typer

from apps.process import keep_torch_out


def register(app: typer.Typer) -> None:
    @app.command("fuse")
    def fuse(
        model: str = typer.Option(..., "--model", help="Base model directory (plain or quantized)."),
        adapter_path: str = typer.Option("adapters", "--adapter-path", help="Adapters to merge."),
        save_path: str = typer.Option("fused_model", "--save-path", help="Output model directory."),
        dequantize: bool = typer.Option(False, "--dequantize",
                                        help="Write a quantized base back unquantized."),
        export: bool = typer.Option(False, "--export", help="Write the interchange format "
                                    "(unquantized safetensors, config.json, tokenizer) that "
                                    "the PyTorch twin and HF tools load."),
        dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 for "
                                  "unquantized output (default float32 with --export, else unchanged)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --save-path."),
        upload_repo: str = typer.Option(None, "--upload-repo", help="Publish the output to this "
                                        "Hub repo (ORG/NAME), with a model card."),
    ) -> None:
        """Merge LoRA/DoRA adapters into the base weights (re-quantizing a quantized base)."""
        keep_torch_out()
        from elm_mlx.lora.fuse import fuse as run_fuse

        written = run_fuse(model, adapter_path, save_path, dequantize=dequantize, export=export,
                           dtype=dtype, force=force)
        typer.echo(f"fused model written to {written}")
        if upload_repo is not None:
            from elm_spec.hub import model_card, publish

            card = model_card(upload_repo, model, "transformers" if export else "mlx")
            typer.echo(f"uploaded {written} to {publish(written, upload_repo, card)}")
