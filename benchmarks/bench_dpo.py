"""A DPO step against an SFT step on MLX, same model and pairs: tokens/s and peak memory.

A randomly initialised elm-small directory (as benchmarks/bench_lora.py builds it) is LoRA
fine-tuned (rank 8, every linear layer, batch 4, --max-seq-length 128) on 48 preference
pairs: prompts of 2-5 lines of Python standard-library source, answers of 1-4 lines, lines
cut at 60 characters (the first 48 such pairs that fit untruncated). The SFT run trains on
prompt + chosen (completion rows of the same pairs); the DPO runs on both answers with the
reference computed each step (the base with its adapters switched off) or cached before
training (--cache-ref-logps); ORPO needs no reference.

Timing excludes loading, compilation (once per padded batch shape) and caching by
difference: each run is one epoch and three epochs (12 and 36 steps of 4 pairs, every pair
once per epoch) in this one process, and (time(3) - time(1)) / 2 is one epoch. tokens/s
counts the tokens the model reads, prompts included and padding not: per pair, prompt +
chosen for SFT, 2 x prompt + chosen + rejected for DPO and ORPO (the reference forward of
uncached DPO is not counted again); pairs/s is the same time per pair. Peak memory is MLX's
allocator peak over the training steps (model, activations, gradients, optimizer state;
`elm finetune` resets it when the steps begin). Modes alternate for ROUNDS rounds and the
best time of each is kept.

    python benchmarks/bench_dpo.py [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_lora import prepare, source_rows  # noqa: E402

PAIRS = 48
BATCH_SIZE = 4
MAX_SEQ_LENGTH = 128
MODES = {"sft": {}, "dpo-cached": {"dpo": True, "cache_ref_logps": True},
         "dpo-computed": {"dpo": True}, "orpo": {"orpo": True}}


def lines(text: str, rng: random.Random, low: int, high: int) -> str:
    all_lines = text.splitlines()
    start = rng.randrange(max(len(all_lines) - high, 1))
    picked = [line[:60] for line in all_lines[start: start + rng.randint(low, high)]]
    return "\n".join(picked).strip() or "pass"


def write_pairs(root: Path, model: Path) -> tuple[Path, Path, dict[str, int]]:
    """The first PAIRS candidate pairs that fit MAX_SEQ_LENGTH untruncated, as preference rows
    and as SFT rows (prompt and chosen); and the tokens an epoch reads in each, tokenized as
    the runs do (through the shipped chat template, `elm finetune`'s default)."""
    import elm_mlx
    from elm_mlx.lora.data import Encoder
    from elm_spec.chat_template import shipped_chat_template
    from elm_spec.preference import encode_pair

    _, tokenizer = elm_mlx.load(model)
    encoder = Encoder(tokenizer, shipped_chat_template())
    rng = random.Random(7)
    texts = [r["text"] for r in source_rows(9 * PAIRS, seed=3)]
    rows, tokens = [], {"sft": 0, "preference": 0}
    for i in range(0, len(texts), 3):
        row = {"prompt": lines(texts[i], rng, 2, 5), "chosen": lines(texts[i + 1], rng, 1, 4),
               "rejected": lines(texts[i + 2], rng, 1, 4)}
        pair = encode_pair(encoder, row, "candidate")
        if len(pair) <= MAX_SEQ_LENGTH and pair.chosen != pair.rejected and len(rows) < PAIRS:
            rows.append(row)
            tokens["sft"] += len(pair.prompt) + len(pair.chosen)
            tokens["preference"] += 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
    assert len(rows) == PAIRS, len(rows)
    preference, sft = root / "pairs", root / "sft"
    for directory, data in ((preference, rows),
                            (sft, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])):
        directory.mkdir()
        (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return preference, sft, tokens


def run(model: Path, data: Path, out: Path, iters: int, mode: dict) -> tuple[float, float]:
    """Wall seconds of one in-process `elm finetune` and the MLX peak of its training steps."""
    from rich.console import Console

    from elm_mlx.lora.config import build_config
    from elm_mlx.lora.train import finetune

    config = build_config(None, dict(
        model=str(model), data=str(data), adapter_path=str(out), iters=iters,
        batch_size=BATCH_SIZE, max_seq_length=MAX_SEQ_LENGTH, learning_rate=1e-5, rank=8,
        steps_per_report=100000, save_every=100000, seed=0, **mode))
    start = time.perf_counter()
    finetune(config, Console(file=io.StringIO()))
    seconds = time.perf_counter() - start
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return seconds, last["peak_memory_gb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON.")
    args = parser.parse_args()
    epoch = PAIRS // BATCH_SIZE
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model, _ = prepare(root, None)
        preference, sft, tokens = write_pairs(root, model)
        best = {m: {"short": 1e9, "long": 1e9, "peak": 0.0} for m in MODES}
        for round_index in range(args.rounds):
            for name, mode in MODES.items():
                data = sft if name == "sft" else preference
                for length, iters in (("short", epoch), ("long", 3 * epoch)):
                    out = root / f"out-{name}-{length}-{round_index}"
                    seconds, peak = run(model, data, out, iters, mode)
                    best[name][length] = min(best[name][length], seconds)
                    best[name]["peak"] = max(best[name]["peak"], peak)
                    print(f"round {round_index + 1} {name:12s} {length:5s} {iters:3d} iters "
                          f"{seconds:7.2f} s  MLX peak {peak:.4f} GB", flush=True)
    results = {"preset": "elm-small", "pairs": PAIRS, "batch_size": BATCH_SIZE,
               "max_seq_length": MAX_SEQ_LENGTH, "rounds": args.rounds,
               "tokens_per_epoch": tokens, "modes": {}}
    for name in MODES:
        seconds = (best[name]["long"] - best[name]["short"]) / 2
        read = tokens["sft" if name == "sft" else "preference"]
        results["modes"][name] = {"epoch_seconds": seconds, "tokens_per_second": read / seconds,
                                  "pairs_per_second": PAIRS / seconds,
                                  "mlx_peak_gb": best[name]["peak"]}
    sft_mode = results["modes"]["sft"]
    results["vs_sft"] = {name: {key: mode[key] / sft_mode[key] for key in
                                ("tokens_per_second", "pairs_per_second", "mlx_peak_gb")}
                         for name, mode in results["modes"].items() if name != "sft"}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
