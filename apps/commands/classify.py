"""`elm classify IMAGE --model DIR`: the top synsets of an image with a CatLIP model, in MLX."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("classify")
    def classify(
        image: Path = typer.Argument(..., help="An image file (JPEG, PNG, WebP, ...)."),
        model: Path = typer.Option(..., "--model", help="CatLIP model directory (MLX or torch "
                                                        "layout)."),
        top_k: int = typer.Option(5, "--top-k", help="How many synsets to print."),
    ) -> None:
        """Print the top-k synsets of IMAGE: `id name score` (sigmoid scores)."""
        from elm_mlx.catlip import classify as classify_image
        from elm_mlx.catlip import load_catlip

        vit, config = load_catlip(model)
        for prediction in classify_image(vit, config, image, top_k):
            typer.echo(f"{prediction.synset} {prediction.name} {prediction.score:.4f}")
