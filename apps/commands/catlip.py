"""`elm catlip ...`: caption synsets, vocabularies, synthetic data, evaluation, transfer, bench."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from elm_spec import ElmError

catlip_app = typer.Typer(help="CatLIP: image-text pre-training as synset classification.",
                         no_args_is_help=True)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True)


@catlip_app.command("synsets")
def synsets(text: str = typer.Argument(..., help="A caption.")) -> None:
    """Print the synsets CatLIP labels TEXT with: one line per kept word, `id name`."""
    from elm_train.catlip.synsets import shared_extractor

    for synset in shared_extractor()(text):
        typer.echo(f"{synset.id} {synset.name}")


@catlip_app.command("vocab")
def vocab(
    captions: list[Path] = typer.Argument(..., help="Tar shards, CSV/JSONL lists, .txt caption "
                                                    "files, or directories of them."),
    top_k: int = typer.Option(24320, "--top-k", help="Synsets to keep (CoreNet: 24320)."),
    out: Path = typer.Option(..., "--out", help="Vocabulary directory to write."),
    workers: int = typer.Option(2, "--workers", help="Parallel worker processes."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Count caption synsets; write vocab.json, CoreNet's vocab.pkl and the label cache."""
    from elm_train.catlip.sources import expand_sources
    from elm_train.catlip.vocab import build_vocab

    files = expand_sources(captions)
    with _progress() as progress:
        task = progress.add_task("captions", total=len(files))
        summary = build_vocab(files, top_k, out, workers=workers, force=force,
                              progress=lambda _: progress.advance(task))
    typer.echo(f"{out}: {len(summary['synsets'])} synsets (of {summary['distinct_synsets']}) from "
               f"{summary['num_captions']} captions; {summary['empty_captions']} empty, "
               f"{summary['captions_without_synsets']} without synsets")
    for entry in summary["synsets"][:10]:
        typer.echo(f"  {entry['id']} {entry['name']} {entry['count']}")


@catlip_app.command("synthetic")
def synthetic(
    out: Path = typer.Argument(..., help="Directory to write."),
    samples: int = typer.Option(1024, "--samples", help="Image-caption pairs (tar shards), or "
                                                        "images per class with --folder."),
    image_size: int = typer.Option(64, "--image-size"),
    folder: bool = typer.Option(False, "--folder", help="Write an ImageFolder of shapes instead."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a synthetic data set of coloured shapes with captions (for trials and tests)."""
    from elm_train.catlip.synthetic import write_shapes_folder, write_shapes_shards

    if folder:
        write_shapes_folder(out, samples, image_size, seed)
        typer.echo(f"{out}: image folder, {samples} images per class")
    else:
        shards = write_shapes_shards(out, samples, image_size, seed=seed)
        typer.echo(f"{out}: {samples} samples in {len(shards)} tar shards")


@catlip_app.command("eval")
def evaluate(
    data: list[Path] = typer.Argument(..., help="Held-out tar shards or CSV/JSONL lists."),
    model: Path = typer.Option(..., "--model", help="CatLIP model directory (torch layout)."),
    vocab_dir: Path = typer.Option(None, "--vocab", help="Vocabulary directory whose label "
                                                         "cache covers DATA (default: none)."),
    batch_size: int = typer.Option(64, "--batch-size"),
) -> None:
    """Mean average precision of a CatLIP model over its synsets on held-out captioned images."""
    from elm_train.catlip.data import (
        ImageLabelDataset,
        ImageTransform,
        caption_labels,
        iterate_once,
    )
    from elm_train.catlip.metrics import mean_average_precision, predict
    from elm_train.catlip.modeldir import load_catlip_model

    vit, config = load_catlip_model(model)
    labels = caption_labels(data, vocab_dir or model, config.synsets)
    transform = ImageTransform(config.vit.image_size, train=False, mean=config.mean,
                               std=config.std, crop_fraction=config.crop_fraction)
    dataset = ImageLabelDataset(labels.samples, labels.labels, len(config.synsets), transform)
    logits, targets = predict(vit, iterate_once(dataset, batch_size))
    stats = labels.stats()
    typer.echo(f"mAP {mean_average_precision(logits, targets):.4f} over {stats['samples']} images "
               f"({stats['empty_captions']} empty captions, "
               f"{stats['captions_without_synsets']} without synsets)")


@catlip_app.command("transfer")
def transfer(
    folder: Path = typer.Argument(..., help="Labeled images: FOLDER/<class>/<image>."),
    model: Path = typer.Option(..., "--model", help="Pre-trained CatLIP model directory."),
    valid: Path = typer.Option(None, "--valid", help="Held-out folder (default: 20% of FOLDER)."),
    steps: int = typer.Option(100, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-4, "--learning-rate"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="Write the fine-tuned (transfer-init) model."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Fine-tune on a labeled folder from synset-initialised and random heads; report both."""
    from elm_spec.vit import CatLIPConfig
    from elm_train.catlip.modeldir import load_catlip_model, save_catlip_dir
    from elm_train.catlip.transfer import run_transfer

    vit, config = load_catlip_model(model)
    with _progress() as progress:
        task = progress.add_task("fine-tuning (transfer, random)", total=2 * steps)
        result = run_transfer(vit, config, folder, valid, steps=steps, batch_size=batch_size,
                              lr=lr, seed=seed, progress=lambda: progress.advance(task))
    for name, synset in zip(result.classes, result.matched, strict=True):
        typer.echo(f"  {name}: {synset or 'no synset in the vocabulary (random row)'}")
    typer.echo(f"accuracy after {steps} steps: transfer init {result.transfer_accuracy:.4f}, "
               f"random init {result.random_accuracy:.4f}")
    if out is not None:
        tuned = CatLIPConfig(vit=config.vit.replace(num_classes=len(result.classes)),
                             synsets=tuple(result.classes),
                             names=tuple(m or c for m, c in zip(result.matched, result.classes,
                                                                strict=True)),
                             mean=config.mean, std=config.std, crop_fraction=config.crop_fraction)
        save_catlip_dir(result.model.state_dict(), tuned, out, force=force)
        typer.echo(f"{out}: fine-tuned model written")


@catlip_app.command("bench")
def bench(
    preset: str = typer.Option("vit-base", "--preset", help="ViT preset (vit-base is ViT-B/16)."),
    image_size: int = typer.Option(224, "--image-size"),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per step."),
    steps: int = typer.Option(5, "--steps", help="Timed steps of each model."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed steps of each model first."),
    vocab_size: int = typer.Option(24320, "--vocab-size", help="CatLIP classes (CoreNet: 24320)."),
    text_layers: int = typer.Option(12, "--text-layers", help="CLIP text tower depth (CoreNet: 12)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (autocast)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Images/s and step time of CatLIP vs CLIP (forward + backward + AdamW), side by side."""
    import torch
    from rich.table import Table

    from elm_spec.progress import make_console
    from elm_spec.vit import ViTSpec
    from elm_train.catlip.bench import run_bench
    from elm_train.catlip.clip import TextSpec

    if dtype not in ("float32", "bfloat16"):
        raise ElmError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = ViTSpec.from_preset(preset, image_size=image_size, num_classes=vocab_size)
    text = TextSpec(num_layers=text_layers)
    with _progress() as progress:
        task = progress.add_task("steps", total=2 * (steps + warmup))
        catlip, clip = run_bench(spec, text, batch_size, steps, warmup, device, dtype,
                                 progress=lambda: progress.advance(task))
    table = Table(title=f"{preset} at {image_size} px, batch {batch_size}, {device}, {dtype}")
    for column in ("model", "parameters", "step time (s)", "images/s"):
        table.add_column(column, justify="right")
    for result in (catlip, clip):
        table.add_row(result.name, f"{result.parameters:,}", f"{result.median_step_s:.3f}",
                      f"{result.images_per_s:.2f}")
    make_console().print(table)
    ratio = catlip.images_per_s / clip.images_per_s
    typer.echo(f"CatLIP/CLIP throughput: {ratio:.2f}x")
    if json_out is not None:
        json_out.write_text(json.dumps({
            "preset": preset, "image_size": image_size, "batch_size": batch_size,
            "device": device, "dtype": dtype, "steps": steps, "warmup": warmup,
            "vocab_size": vocab_size, "text_layers": text_layers, "ratio": ratio,
            **{r.name: {"parameters": r.parameters, "median_step_s": r.median_step_s,
                        "images_per_s": r.images_per_s, "step_times": r.step_times}
               for r in (catlip, clip)}}, indent=2) + "\n")


def register(app: typer.Typer) -> None:
    app.add_typer(catlip_app, name="catlip")
