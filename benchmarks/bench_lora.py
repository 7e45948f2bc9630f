"""`elm finetune --lora` against `python -m mlx_lm lora`: tokens/s and peak memory, same run.

Both tools fine-tune the same model directory on the same text data with mlx-lm's defaults
(rank 8, scale 20, dropout 0, every linear layer of every block, batch 4, the same
--max-seq-length), elm with packing off so both see identical batches: both sort rows by
length into the same batches and pad them the same way, and an epoch visits each batch once.

Timing excludes start-up, loading, compilation and validation by difference: each tool runs
1 epoch and 2 epochs, and (time(2) - time(1)) covers exactly one epoch of identical batches.
tokens/s = trained target tokens of one epoch / that difference. Peak memory is the peak
resident set size of the longer process (everything the process holds: libraries, model,
activations, allocator slack); MLX's allocator peak of the same process is reported beside it
(the arrays alone: model, activations, gradients, optimizer state). Runs alternate (elm, mlx-lm, elm packed, ...) for
ROUNDS rounds and the best time of each is kept, so machine load hits all of them alike.
Packing's gain is elm packed against elm unpacked, by the same method.

    python benchmarks/bench_lora.py [--rounds 2] [--out FILE] [--vocab-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = "elm-small"
BATCH_SIZE = 4
MAX_SEQ_LENGTH = 256
TRAIN_ROWS = 48
LEARNING_RATE = "1e-5"


def source_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Chunks of 5-25 lines of the Python standard library: real text of varied length."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        lines = rng.choice(files).read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) < 80:
            continue
        start = rng.randrange(len(lines) - 60)
        text = "\n".join(lines[start: start + rng.randint(5, 25)]).strip()
        if text:
            rows.append({"text": text})
    return rows


def prepare(root: Path, vocab_size: int | None) -> tuple[Path, Path]:
    """The model directory (the preset, its embedding widened to VOCAB_SIZE rows if given; the
    tokenizer keeps the preset's pieces) and the data directory."""
    from elm_spec import ModelSpec
    from elm_spec.tokenizer import train_tokenizer
    from elm_train.modeldir import init_model, save_model_dir

    preset = ModelSpec.from_preset(PRESET)
    spec = preset.replace(vocab_size=vocab_size) if vocab_size else preset
    tokenizer_dir = root / "tokenizer"
    texts = [r["text"] for r in source_rows(2000, seed=99)]
    train_tokenizer(iter(texts), preset.vocab_size, tokenizer_dir)
    model = root / "model"
    save_model_dir(init_model(spec, seed=0).state_dict(), spec, model,
                   tokenizer_dir / "tokenizer.model")
    data = root / "data"
    data.mkdir()
    for name, count, seed in (("train", TRAIN_ROWS, 1), ("valid", 8, 2)):
        (data / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in source_rows(count, seed)))
    return model, data


def epoch_facts(model: Path, data: Path) -> dict[str, int]:
    """Trained target tokens per epoch, and batches per epoch with and without packing."""
    import elm_mlx
    from elm_mlx.lora.data import Encoder, batch_stream, load_split

    _, tokenizer = elm_mlx.load(model)
    split = load_split(data / "train.jsonl", Encoder(tokenizer, None), MAX_SEQ_LENGTH)
    facts = {"target_tokens": sum(len(e.tokens) - 1 for e in split.examples),
             "truncated_rows": split.truncated}
    for pack in (False, True):
        stream = batch_stream(split, BATCH_SIZE, MAX_SEQ_LENGTH, pack, 0, training=True)
        facts["batches_packed" if pack else "batches"] = len(stream)
        covered = sum(int(stream.batch(i).weights.sum()) for i in range(len(stream)))
        facts["covered_packed" if pack else "covered"] = covered
    return facts


# Runs a tool's command line and reports MLX's allocator peak over the whole process on stderr
# (elm resets the peak after its first validation for its progress bar; disabled here so both
# tools are measured the same way).
PEAK_WRAPPER = """
import runpy, sys
import mlx.core as mx
mx.reset_peak_memory = lambda: None
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print(f"MLX_PEAK {mx.get_peak_memory()}", file=sys.stderr)
"""


def command(tool: str, model: Path, data: Path, out: Path, iters: int) -> list[str]:
    common = ["--model", str(model), "--data", str(data), "--adapter-path", str(out),
              "--iters", str(iters), "--batch-size", str(BATCH_SIZE),
              "--max-seq-length", str(MAX_SEQ_LENGTH), "--learning-rate", LEARNING_RATE,
              "--steps-per-report", "1000", "--steps-per-eval", "100000", "--val-batches", "1",
              "--save-every", "100000", "--seed", "0"]
    if tool == "mlx-lm":
        return [sys.executable, "-c", PEAK_WRAPPER, "mlx_lm", "lora", "--train",
                "--num-layers", "-1", *common]
    packing = "--pack" if tool == "elm-packed" else "--no-pack"
    return [sys.executable, "-c", PEAK_WRAPPER, "apps", "finetune", "--lora", "--rank", "8",
            "--alpha", "160", "--lr-schedule", "constant", "--weight-decay", "0", packing,
            *common]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB) and MLX's allocator peak (GB) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{stderr[-2000:]}")
    mlx_peak = int(stderr.rsplit("MLX_PEAK ", 1)[1].split()[0])
    return elapsed, usage.ru_maxrss * 1024 / 1e9, mlx_peak / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="Embedding rows of the model (default: the preset's 2048; OpenELM "
                             "has 32000), to see how the loss's memory scales with the vocabulary.")
    args = parser.parse_args()
    library = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ELM_OPENBLAS": "0"}
    if Path(library).is_file():  # the same BLAS for both tools
        env["LD_PRELOAD"] = library
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model, data = prepare(root, args.vocab_size)
        facts = epoch_facts(model, data)
        tools = ("elm", "mlx-lm", "elm-packed")
        epochs = {"elm": facts["batches"], "mlx-lm": facts["batches"],
                  "elm-packed": facts["batches_packed"]}
        best: dict[str, dict[str, float]] = {
            t: {"short": 1e9, "long": 1e9, "rss": 0.0, "mlx_peak": 0.0} for t in tools}
        for round_index in range(args.rounds):
            for tool in tools:
                for length, iters in (("short", epochs[tool]), ("long", 2 * epochs[tool])):
                    out = root / f"out-{tool}-{length}-{round_index}"
                    seconds, rss, mlx_peak = timed(command(tool, model, data, out, iters), env)
                    best[tool][length] = min(best[tool][length], seconds)
                    if length == "long":
                        best[tool]["rss"] = max(best[tool]["rss"], rss)
                        best[tool]["mlx_peak"] = max(best[tool]["mlx_peak"], mlx_peak)
                    print(f"round {round_index + 1} {tool:10s} {length:5s} {iters:4d} iters "
                          f"{seconds:7.2f} s  peak RSS {rss:.3f} GB  MLX peak {mlx_peak:.3f} GB",
                          flush=True)
    results = {"preset": PRESET, "vocab_size": args.vocab_size, "batch_size": BATCH_SIZE, "max_seq_length": MAX_SEQ_LENGTH,
               "rounds": args.rounds, **facts, "tools": {}}
    for tool in tools:
        delta = best[tool]["long"] - best[tool]["short"]
        covered = facts["covered_packed" if tool == "elm-packed" else "covered"]
        results["tools"][tool] = {"epoch_seconds": delta,
                                  "tokens_per_second": covered / delta,
                                  "peak_rss_gb": best[tool]["rss"],
                                  "mlx_peak_gb": best[tool]["mlx_peak"]}
    elm, peer, packed = (results["tools"][t] for t in tools)
    results["tokens_per_second_ratio"] = elm["tokens_per_second"] / peer["tokens_per_second"]
    results["peak_memory_ratio"] = elm["peak_rss_gb"] / peer["peak_rss_gb"]
    results["mlx_peak_ratio"] = elm["mlx_peak_gb"] / peer["mlx_peak_gb"]
    results["packing_gain"] = packed["tokens_per_second"] / elm["tokens_per_second"]
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
