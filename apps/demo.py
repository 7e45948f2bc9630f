"""`elm demo`: the whole path on one machine in a few minutes.

A corpus (by default this machine's Python standard library sources), a tokenizer trained on
it, token shards with a held-out split, a small layer-wise OpenELM trained with `elm train`'s
engine, exported to a model directory, converted to MLX, and sampled from with mlx-lm.
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elm_spec import ElmError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".html")
HELD_OUT_FRACTION = 0.05
EVAL_BATCHES = 16


@dataclass
class DemoOptions:
    output: Path
    corpus: Path | None = None
    steps: int = 350
    vocab_size: int = 1024
    seq_len: int = 256
    micro_batch_size: int = 4
    lr: float = 5e-3
    preset: str = "elm-demo"
    # "def", not "def ": a trailing space becomes a token of its own ('▁'), which the corpus
    # never has before a word, and the samples after it are gibberish.
    prompt: str = "def"
    max_tokens: int = 120
    temp: float = 0.7
    seed: int = 0
    max_corpus_bytes: int = 8_000_000
    force: bool = False
    threads: int | None = None  # torch threads; None: OMP_NUM_THREADS if set, else idle cores


@dataclass
class DemoResult:
    paths: dict[str, Path] = field(default_factory=dict)
    unigram_entropy: float = math.nan
    valid_loss: float = math.nan
    mlx_valid_loss: float = math.nan
    sample: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def corpus_files(corpus: Path | None, max_bytes: int) -> tuple[list[Path], bool]:
    """The corpus files (sorted, up to MAX_BYTES in all) and whether their lines are the documents.

    A directory or the default corpus gives one document per file; a single file, one per line.
    """
    if corpus is None:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        origin = "the Python standard library"
    elif corpus.is_file():
        files = [corpus]
        origin = str(corpus)
    elif corpus.is_dir():
        files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        origin = str(corpus)
    else:
        raise ElmError(f"{corpus}: --corpus not found")
    chosen, total = [], 0
    for file in files:
        size = file.stat().st_size
        if size == 0:
            continue
        chosen.append(file)
        total += size
        if total >= max_bytes:
            break
    per_line = corpus is not None and corpus.is_file()
    if total < 20_000 or (len(chosen) < 2 and not per_line):
        raise ElmError(f"{origin}: corpus too small ({total} bytes in {len(chosen)} files; "
                       "the demo needs at least 20,000 bytes in 2 files, or one file of lines)")
    return chosen, per_line


def unigram_entropy(data_dir: Path) -> float:
    """Entropy in nats of the train split's token frequencies: what a model without context scores."""
    from elm_train.data.format import read_index

    data = read_index(data_dir)
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    for shard in data.shards("train"):
        counts += np.bincount(data.memmap(shard), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mlx_held_out_loss(model, data_dir: Path, seq_len: int, micro_batch_size: int,
                      batches: int) -> float:
    """Mean next-token cross-entropy of the MLX model on the held-out batches the trainer scores."""
    import mlx.core as mx
    import mlx.nn as nn

    from elm_train.data.loader import TokenWindowLoader

    loader = TokenWindowLoader(data_dir, "valid", seq_len, micro_batch_size, shuffle=False)
    losses = []
    for _ in range(min(batches, loader.batches_per_epoch)):
        batch = next(loader)
        logits = model(mx.array(batch["input_ids"].numpy()))
        loss = nn.losses.cross_entropy(logits.astype(mx.float32),
                                       mx.array(batch["labels"].numpy()), reduction="mean")
        losses.append(loss.item())
    return float(np.mean(losses))


def record_final_paths(staging: Path, final: Path) -> None:
    """Write FINAL for STAGING in what the run recorded (its config, each checkpoint's copy of
    it, the metrics log), so `elm train FINAL/run/train_config.yaml` resumes the demo's run."""
    import json

    import yaml

    from elm_train.checkpoint import CONFIG_COPY

    def moved(value: object) -> object:
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        if isinstance(value, str) and value.startswith(str(staging)):
            return str(final) + value[len(str(staging)):]
        return value

    for config in [staging / "run" / CONFIG_COPY, *staging.glob(f"checkpoints/*/{CONFIG_COPY}")]:
        config.write_text(yaml.safe_dump(moved(yaml.safe_load(config.read_text())),
                                         sort_keys=False))
    metrics = staging / "run" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(moved(json.loads(line))) + "\n"
                               for line in metrics.read_text().splitlines() if line.strip()))


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> DemoResult:
    from convert import ConvertOptions, convert
    from elm_spec.modeldir import atomic_output_dir
    from elm_spec.tokenizer import train_tokenizer
    from elm_train.config import load_config
    from elm_train.data.prepare import PrepareOptions, prepare_data
    from elm_train.data.sources import ReadOptions, expand_sources, iter_texts
    from elm_train.export import export_checkpoint
    from elm_train.plot import plot_run
    from elm_train.trainer import train

    result = DemoResult()
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = now - clock
        clock = now

    with atomic_output_dir(options.output, force=options.force) as staging:
        files, per_line = corpus_files(options.corpus, options.max_corpus_bytes)
        read_options = ReadOptions(text_per_line=per_line)
        sources = expand_sources(files, "txt")
        train_tokenizer(iter_texts(sources, read_options), options.vocab_size,
                        staging / "tokenizer", input_sentence_size=200_000)
        lap("tokenizer")
        stats = prepare_data(files, staging / "tokenizer", staging / "data", PrepareOptions(
            text_per_line=per_line, source_format="txt", min_chars=0, min_tokens=0,
            valid_fraction=HELD_OUT_FRACTION, seed=options.seed), show_progress=False)
        documents, origin = stats["documents"], options.corpus or "Python standard library sources"
        say(f"corpus: {len(files)} files ({origin}), "
            f"{stats['source_bytes']:,} bytes; {documents['train']} documents for training, "
            f"{documents['valid']} held out")
        if documents["valid"] == 0:
            raise ElmError(f"{origin}: none of its {documents['train']} documents fell in "
                           f"the {HELD_OUT_FRACTION:.0%} held-out split; give a larger corpus")
        result.unigram_entropy = unigram_entropy(staging / "data")
        lap("tokens")
        say(f"tokenizer: {options.vocab_size} pieces; unigram entropy of the corpus "
            f"{result.unigram_entropy:.3f} nats/token")

        import torch

        from elm_train.parallel import choose_cpu_threads

        threads = choose_cpu_threads("auto", options.threads or 0)
        on_gpu = torch.cuda.is_available()
        config = load_config(data={
            "model": {"preset": options.preset},
            "data": {"path": str(staging / "data"), "seed": options.seed},
            "optim": {"lr": options.lr, "warmup_steps": max(1, options.steps // 10),
                      "min_lr_ratio": 0.1},
            "train": {"seq_len": options.seq_len, "micro_batch_size": options.micro_batch_size,
                      "max_steps": options.steps, "seed": options.seed,
                      "dtype": "bfloat16" if on_gpu else "float32", "threads": options.threads or 0,
                      "eval_every": max(1, options.steps // 5), "eval_batches": EVAL_BATCHES},
            "checkpoint": {"dir": str(staging / "checkpoints")},
            "log": {"run_dir": str(staging / "run"), "every": 10},
        })
        say(f"training {options.preset} for {options.steps} steps of "
            f"{options.micro_batch_size} x {options.seq_len} tokens on "
            f"{'cuda' if on_gpu else f'cpu, {threads}'}")
        trained = train(config)
        result.valid_loss = trained.valid_loss if trained.valid_loss is not None else math.nan
        lap("train")
        export_checkpoint(trained.checkpoint, staging / "model")
        convert(staging / "model", staging / "mlx",
                ConvertOptions(target="mlx", verify=True, progress=False),
                say=lambda line: say(line.replace(str(staging), str(options.output))))
        plot_run(staging / "run", staging / "curves.png",
                 title=f"elm demo: {options.preset}, {options.steps} steps")
        record_final_paths(staging, options.output)
        lap("export")

    final = options.output
    relocated = {name: final / path.relative_to(staging) for name, path in {
        "tokenizer": staging / "tokenizer", "data": staging / "data",
        "run": staging / "run", "metrics": staging / "run" / "metrics.jsonl",
        "checkpoints": staging / "checkpoints", "model": staging / "model",
        "mlx": staging / "mlx",
        "plot": staging / "curves.png"}.items()}
    result.paths = relocated

    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    import elm_mlx

    mx.random.seed(options.seed)
    model, tokenizer = elm_mlx.load(relocated["mlx"])
    result.mlx_valid_loss = mlx_held_out_loss(model, relocated["data"], options.seq_len,
                                              options.micro_batch_size, EVAL_BATCHES)
    pieces = [response.text for response in stream_generate(
        model, tokenizer, options.prompt, max_tokens=options.max_tokens,
        sampler=make_sampler(temp=options.temp))]
    result.sample = options.prompt + "".join(pieces)
    lap("sample")
    return result
