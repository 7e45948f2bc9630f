"""`elm train CONFIG.yaml [key=value ...]`: train under one process or torchrun."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train", context_settings={"allow_extra_args": False})
    def train(
        config: Path = typer.Argument(None, help="YAML config (sections model, data, optim, train, "
                                                 "parallel, checkpoint, log)."),
        overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.max_steps=20."),
        recipe: str = typer.Option(None, "--recipe",
                                   help="Start from a recipe: openelm-270m, openelm-450m, "
                                        "openelm-1.1b, openelm-3b."),
        peak_flops: float = typer.Option(None, "--peak-flops", min=0.0,
                                         help="Dense peak FLOP/s per device for MFU (log.peak_flops), "
                                              "for a GPU elm's table lacks or to override it."),
        print_config: bool = typer.Option(False, "--print-config",
                                          help="Print the resolved config and exit."),
    ) -> None:
        """Train a model, in one process or under `torchrun --nproc_per_node N -m apps train ...`."""
        from elm_train.config import dump_config, load_config

        extra = list(overrides or [])
        path = config
        if config is not None and "=" in str(config) and not config.is_file():
            extra.insert(0, str(config))
            path = None
        if recipe is not None:
            extra.insert(0, f"recipe={recipe}")
        if peak_flops is not None:
            extra.append(f"log.peak_flops={peak_flops!r}")
        resolved = load_config(path, extra)
        if print_config:
            typer.echo(dump_config(resolved), nl=False)
            return
        import os

        from elm_train.parallel import choose_cpu_threads
        from elm_train.trainer import train as run_training

        main = int(os.environ.get("RANK", "0")) == 0
        threads = choose_cpu_threads(resolved.train.device, resolved.train.threads)
        if threads and main:
            typer.echo(threads)
        result = run_training(resolved)
        if main:
            loss = f"{result.loss:.4f}" if result.loss is not None else "none"
            typer.echo(f"step {result.step}: loss {loss}"
                       + (f", valid loss {result.valid_loss:.4f}" if result.valid_loss is not None else ""))
            typer.echo(f"metrics: {result.run_dir / 'metrics.jsonl'}")
            if result.checkpoint is not None:
                typer.echo(f"checkpoint: {result.checkpoint}")
