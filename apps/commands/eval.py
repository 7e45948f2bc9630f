"""`elm eval`: perplexity, zero-shot tasks in lm-eval's formats, and lm-eval-harness itself."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from apps.process import keep_torch_out
from elm_spec import ElmError
from elm_spec.errors import first_line

eval_app = typer.Typer(help="Evaluate a model: perplexity, zero-shot tasks, lm-eval-harness.",
                       no_args_is_help=True)

MODEL = typer.Option(..., "--model", help="Model directory (plain or quantized).")
BACKEND = typer.Option(None, "--backend",
                       help="torch or mlx (default: mlx on macOS when installed, else torch).")
ADAPTER = typer.Option(None, "--adapter-path", help="LoRA adapter directory (mlx backend).")
BATCH = typer.Option(8, "--batch-size", help="Sequences per forward pass.")
CONTEXT = typer.Option(None, "--context-length",
                       help="Tokens per window (default: the model's max_context_length).")
DTYPE = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: as stored).")
DEVICE = typer.Option(None, "--device", help="torch: cpu, cuda, cuda:1...; mlx: cpu or gpu.")


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """add(description, total) -> advance(n); the bar goes to stderr, so --json stays clean."""
    from rich.progress import Progress

    from elm_spec.progress import make_console

    with Progress(console=make_console(stderr=True), transient=True) as progress:
        def add(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        yield add


def _load(model: Path, backend: str | None, adapter_path: Path | None, batch_size: int,
          context_length: int | None, dtype: str | None, device: str | None):
    from elm_eval.backend import chosen_backend, load_eval_model

    backend = backend or chosen_backend(model)
    if backend == "mlx":
        keep_torch_out()
    return load_eval_model(model, backend=backend, adapter_path=adapter_path,
                           batch_size=batch_size, max_length=context_length, dtype=dtype,
                           device=device)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
def perplexity(
    model: Path = MODEL,
    data: list[Path] = typer.Option(..., "--data",
                                    help=".txt (the file is one document) or .jsonl (one per "
                                         "line); repeat for several files."),
    text_key: str = typer.Option("text", "--text-key", help="Field holding the text in .jsonl."),
    stride: int = typer.Option(None, "--stride",
                               help="New tokens scored per window after the first "
                                    "(default: the context length, disjoint windows)."),
    backend: str = BACKEND, adapter_path: Path = ADAPTER, batch_size: int = BATCH,
    context_length: int = CONTEXT, dtype: str = DTYPE, device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    output: Path = typer.Option(None, "--output", help="Also write the JSON result here."),
) -> None:
    """Token perplexity and bits per byte of text, sliding windows over long documents."""
    from elm_eval.perplexity import evaluate_perplexity, read_documents
    from elm_eval.report import perplexity_markdown
    from elm_spec.writes import write_json_atomic

    documents = read_documents(data, text_key)
    loaded = _load(model, backend, adapter_path, batch_size, context_length, dtype, device)
    with progress_bar() as add:
        result = evaluate_perplexity(loaded, documents, stride,
                                     lambda total: add("perplexity", total))
    result = {"model": str(model), **result}
    if output is not None:
        write_json_atomic(output, result)
    typer.echo(json.dumps(result) if as_json else perplexity_markdown(result))


@eval_app.command("tasks")
def tasks(
    model: Path = MODEL,
    task_names: str = typer.Option(..., "--tasks",
                                   help="Comma-separated: arc_easy, arc_challenge, hellaswag, "
                                        "piqa, sciq, winogrande, boolq."),
    data_dir: Path = typer.Option(..., "--data-dir",
                                  help="Directory with TASK.jsonl files in lm-eval's layout."),
    limit: int = typer.Option(None, "--limit", help="Only the first N rows of each task."),
    add_bos: bool = typer.Option(True, "--add-bos/--no-add-bos",
                                 help="Prepend BOS to each context (as OpenELM's numbers did)."),
    backend: str = BACKEND, adapter_path: Path = ADAPTER, batch_size: int = BATCH,
    context_length: int = CONTEXT, dtype: str = DTYPE, device: str = DEVICE,
    output: Path = typer.Option(None, "--output", help="Write the results as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Zero-shot multiple-choice accuracy (acc, acc_norm) as lm-eval-harness computes it."""
    from elm_eval.report import tasks_markdown
    from elm_eval.tasks import evaluate_tasks, load_tasks, parse_task_names
    from elm_spec.writes import write_json_atomic

    names = parse_task_names(task_names)
    if limit is not None and limit < 1:
        raise ElmError(f"--limit {limit} must be at least 1")
    questions = load_tasks(names, data_dir, limit)
    loaded = _load(model, backend, adapter_path, batch_size, context_length, dtype, device)
    with progress_bar() as add:
        results = evaluate_tasks(loaded, questions, add_bos, add)
    report = {"model": str(model), "backend": loaded.backend, "add_bos": add_bos,
              "adapter_path": str(adapter_path) if adapter_path else None, "results": results}
    if output is not None:
        write_json_atomic(output, report)
    typer.echo(json.dumps(report) if as_json else tasks_markdown(results))


@eval_app.command("harness", context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True,
                                               "help_option_names": []})
def harness(context: typer.Context) -> None:
    """Run lm-eval-harness with --model elm available (all arguments are lm-eval's).

    Example: elm eval harness --model elm --model_args pretrained=DIR,backend=mlx --tasks arc_easy
    """
    try:
        from lm_eval.__main__ import cli_evaluate

        import elm_eval.harness  # noqa: F401  (registers --model elm)
    except ImportError as error:
        raise ElmError(f"lm-eval-harness is not installed ({error}); pip install 'elm[eval]'") from None
    sys.argv = ["lm-eval", *context.args]
    try:
        cli_evaluate()
    except ConnectionError as error:  # datasets' "Couldn't reach ..." and the Hub's offline mode
        raise ElmError(f"lm-eval cannot fetch a task's data set ({first_line(error)}): run once "
                       "where the Hub is reachable to fill the datasets cache (then "
                       "HF_DATASETS_OFFLINE=1 works offline), or score the same tasks from "
                       "local JSONL files with `elm eval tasks --data-dir DIR` (docs/eval.md)"
                       ) from None
