"""A DPO (and ORPO) training step against an SFT step on the same model and pairs, torch on the CPU.

What `elm train` runs per optimizer step: for `task: dpo` the policy's forward on both rows of
each pair (prompt + chosen, prompt + rejected), the frozen reference's forward on them under
no_grad (DPO only; ORPO has no reference), the loss, backward, clip and AdamW; for SFT the
cross-entropy of the prompt + chosen rows alone (what `task: lm` runs on them). Each variant
runs in a fresh process (so its peak resident memory is its own), the variants alternated round
by round; ratios are against SFT in the same round.

    python benchmarks/bench_dpo_step.py [--preset elm-small] [--pairs 4] [--prompt 96]
                                        [--answer 32] [--steps 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("sft", "dpo", "orpo")


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import torch

    from elm_spec import ModelSpec
    from elm_spec.preference import PreferencePair
    from elm_train.config import OptimConfig
    from elm_train.data.preference import PreferenceLoader
    from elm_train.model import OpenELM
    from elm_train.tasks.dpo import PreferenceData, batch_loss
    from elm_train.tasks.lm import language_model_loss
    from elm_train.trainer import build_optimizer

    spec = ModelSpec.from_preset(args.preset)
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    reference = None
    if args.worker == "dpo":
        reference = OpenELM(spec).requires_grad_(False).eval()
        reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    rng = np.random.default_rng(1)

    def ids(n: int) -> list[int]:
        return rng.integers(3, spec.vocab_size, n).tolist()

    pairs = [PreferencePair(ids(args.prompt), ids(args.answer), ids(args.answer))
             for _ in range(args.pairs)]
    batch = next(PreferenceLoader(pairs, args.prompt + args.answer, args.pairs, shuffle=False))
    data = PreferenceData(train="pairs", loss="orpo" if args.worker == "orpo" else "sigmoid")

    def step() -> None:
        if args.worker == "sft":
            rows = slice(0, args.pairs)
            logits = model(batch["input_ids"][rows]).float()
            loss, _ = language_model_loss(logits, batch["labels"][rows], 1e-4)
        else:
            loss, _ = batch_loss(model, reference, batch, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = rss_bytes()
    step()  # warm-up: allocations, optimizer state
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rows = args.pairs * (1 if args.worker == "sft" else 2)
    return {"step_s": min(times), "tokens": rows * batch["input_ids"].shape[1],
            "peak_rss": rss_bytes(), "step_rss": rss_bytes() - before,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="elm-small")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens per pair")
    parser.add_argument("--answer", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (best)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    options = [f"--{k}={getattr(args, k)}" for k in ("preset", "pairs", "prompt", "answer", "steps")]
    rounds = []
    for _ in range(args.rounds):
        result = {}
        for mode in MODES:
            done = subprocess.run([sys.executable, str(Path(__file__)), f"--worker={mode}", *options],
                                  capture_output=True, text=True, check=True)
            result[mode] = json.loads(done.stdout.splitlines()[-1])
        rounds.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{args.preset}, {args.pairs} pairs x ({args.prompt} prompt + {args.answer} answer) "
          f"tokens, fp32, {rounds[0]['sft']['threads']} torch threads, {args.rounds} rounds")
    print("| step | step time (s, best) | tokens/s (policy rows) | vs SFT tokens/s | step time vs SFT "
          "| peak RSS (MiB) | RSS growth in the step (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        best = min(r[mode]["step_s"] for r in rounds)
        tokens = rounds[0][mode]["tokens"]
        speed = [r[mode]["tokens"] / r[mode]["step_s"] / (r["sft"]["tokens"] / r["sft"]["step_s"])
                 for r in rounds]
        time_ratio = [r[mode]["step_s"] / r["sft"]["step_s"] for r in rounds]
        peak = max(r[mode]["peak_rss"] for r in rounds) / 2**20
        growth = max(r[mode]["step_rss"] for r in rounds) / 2**20
        print(f"| {mode} | {best:.3f} | {tokens / best:,.0f} | {statistics.median(speed):.2f} "
              f"| {statistics.median(time_ratio):.2f} | {peak:.0f} | {growth:.0f} |")


if __name__ == "__main__":
    main()
