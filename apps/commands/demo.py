"""`elm demo`: corpus -> tokenizer -> training -> export -> MLX -> samples, in a few minutes."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        output: Path = typer.Option(Path("elm-demo"), "--output", "-o", help="Directory to create."),
        corpus: Path = typer.Option(None, "--corpus", help="A text file or a directory of text "
                                    "files (default: this machine's Python standard library)."),
        steps: int = typer.Option(350, "--steps", help="Training steps."),
        prompt: str = typer.Option("def", "--prompt", help="Prompt to sample from."),
        max_tokens: int = typer.Option(120, "--max-tokens", "-m", help="Tokens to generate."),
        temp: float = typer.Option(0.7, "--temp", help="Sampling temperature."),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: "
                                    "OMP_NUM_THREADS if set, else the cores the load average "
                                    "leaves idle)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing OUTPUT."),
    ) -> None:
        """Train a small OpenELM on a built-in corpus, export it, run it in MLX and sample."""
        from apps.demo import DemoOptions, run_demo

        result = run_demo(DemoOptions(output=output, corpus=corpus, steps=steps, prompt=prompt,
                                      max_tokens=max_tokens, temp=temp, seed=seed, force=force,
                                      threads=threads),
                          say=typer.echo)
        typer.echo("")
        typer.echo(f"unigram entropy of the corpus : {result.unigram_entropy:.3f} nats/token")
        typer.echo(f"held-out loss (PyTorch)       : {result.valid_loss:.3f} nats/token")
        typer.echo(f"held-out loss (MLX)           : {result.mlx_valid_loss:.3f} nats/token")
        typer.echo("")
        typer.echo("sample (MLX, mlx-lm stream_generate):")
        typer.echo(result.sample)
        typer.echo("")
        for name, path in result.paths.items():
            typer.echo(f"{name:<12} {path}")
        timings = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in result.seconds.items())
        typer.echo(f"time: {timings}")
