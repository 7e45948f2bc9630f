"""`elm plot RUN_DIR`: draw loss and throughput curves to a PNG."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("plot")
    def plot(
        run_dir: Path = typer.Argument(..., help="A training run directory (with metrics.jsonl)."),
        output: Path = typer.Option(None, "--output", "-o", help="PNG path (default RUN_DIR/curves.png)."),
    ) -> None:
        """Plot loss and throughput of a training run."""
        from elm_train.plot import plot_run

        typer.echo(str(plot_run(run_dir, output)))
