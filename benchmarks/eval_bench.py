"""Perplexity of a briefly trained model at fp32 and 4-/8-bit MLX quantization, and torch vs
MLX evaluation throughput on the same model.

    python benchmarks/eval_bench.py --workdir /tmp/elm-eval-bench [--steps 300]

Trains an `elm-demo`-shaped model (6 layers x 192, vocab 1024) on this Python's standard
library sources for a few hundred AdamW steps, writes it as a model directory, quantizes it with
mlx-lm, and scores held-out standard-library files (never trained on) with `elm eval`'s code
path. Throughput runs alternate torch and MLX (A, B, A, B, ...) and keep the best of each, so
machine load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elm_eval.backend import load_eval_model  # noqa: E402
from elm_eval.perplexity import evaluate_perplexity  # noqa: E402
from elm_spec import ModelSpec  # noqa: E402
from elm_spec.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def train(workdir: Path, steps: int, seed: int = 0) -> Path:
    import torch

    from elm_train.modeldir import init_model, save_model_dir

    files = stdlib_files()
    train_texts = [f.read_text(encoding="utf-8", errors="replace") for f in files[:120]]
    train_tokenizer(iter(train_texts), 1024, workdir / "tokenizer")
    tokenizer = Tokenizer(workdir / "tokenizer")
    ids = [t for text in train_texts for t in tokenizer.encode(text, bos=True, eos=True)]
    data = torch.tensor(ids)
    spec = ModelSpec.from_preset("elm-demo").replace(vocab_size=tokenizer.vocab_size)
    model = init_model(spec, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    batch, length = 16, 128
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        window = torch.stack([data[s: s + length + 1] for s in starts.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    return save_model_dir(model.state_dict(), spec, workdir / "model-fp32",
                          workdir / "tokenizer" / "tokenizer.model", force=True)


def held_out_documents(count: int) -> list[str]:
    files = stdlib_files()[-count:]
    return [f.read_text(encoding="utf-8", errors="replace")[:6000] for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--documents", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-only", action="store_true",
                        help="Only train and quantize (light on memory; no timing).")
    parser.add_argument("--measure", choices=("all", "perplexity", "speed"), default="all")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from tests.support.eval_tasks import write_quantized_dir

    fp32 = args.workdir / "model-fp32"
    if not (fp32 / "config.json").is_file():
        train(args.workdir, args.steps)
    quantized = {}
    for bits in (8, 4):
        target = args.workdir / f"model-q{bits}"
        if not target.is_dir():
            write_quantized_dir(fp32, target, bits=bits)
        quantized[bits] = target
    if args.train_only:
        return
    documents = held_out_documents(args.documents)

    summary: dict[str, dict] = {}
    if args.measure in ("all", "perplexity"):
        summary["perplexity"] = perplexities(fp32, quantized, documents)
    if args.measure in ("all", "speed"):
        summary["tokens_per_second"] = throughput(fp32, quantized[4], documents, args.repeats)
    (args.workdir / f"eval_bench_{args.measure}.json").write_text(
        json.dumps(summary, indent=2, default=str))


def perplexities(fp32: Path, quantized: dict[int, Path], documents: list[str]) -> dict:
    rows = {}
    rows["fp32 (torch)"] = evaluate_perplexity(load_eval_model(fp32, backend="torch"), documents)
    rows["fp32 (mlx)"] = evaluate_perplexity(load_eval_model(fp32, backend="mlx"), documents)
    for bits, directory in quantized.items():
        rows[f"{bits}-bit (mlx)"] = evaluate_perplexity(load_eval_model(directory, backend="mlx"),
                                                       documents)
    rows["fp32 (torch), stride 128"] = evaluate_perplexity(
        load_eval_model(fp32, backend="torch"), documents, stride=128)

    print("\n| model | perplexity | bits/byte | tokens |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['perplexity']:.3f} | {row['bits_per_byte']:.4f} | {row['tokens']:,} |")
    assert all(math.isfinite(r["perplexity"]) for r in rows.values())
    return rows


def throughput(fp32: Path, q4: Path, documents: list[str], repeats: int) -> dict:
    """Scored tokens per second, alternating the backends; best of REPEATS for each."""
    speed: dict[str, list[float]] = {"torch": [], "mlx": [], "mlx 4-bit": []}
    models = {"torch": load_eval_model(fp32, backend="torch"),
              "mlx": load_eval_model(fp32, backend="mlx"),
              "mlx 4-bit": load_eval_model(q4, backend="mlx")}
    for _ in range(repeats):
        for name, model in models.items():
            speed[name].append(evaluate_perplexity(model, documents)["tokens_per_second"])

    best = {name: max(values) for name, values in speed.items()}
    print("\n| backend | best tokens/s | runs | vs torch |\n|---|---:|---:|---:|")
    for name, value in best.items():
        print(f"| {name} | {value:,.0f} | {', '.join(f'{v:,.0f}' for v in speed[name])} | "
              f"{value / best['torch']:.2f}x |")
    return speed


if __name__ == "__main__":
    main()
