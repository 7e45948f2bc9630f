"""How many positions the fine-tuning loss should project to the vocabulary at a time.

One compiled LoRA training step of `elm-small` (every linear of every block, rank 8) on a
batch of 4 x 256 random tokens, with the model's vocabulary set to each --vocab-sizes entry:
MLX's allocator peak and the step time for the whole-logits loss (mlx-lm's) and for elm's
checkpointed chunks of each --rows size. Each configuration runs in its own process.

    python benchmarks/bench_loss_chunks.py [--vocab-sizes 2048,32000] [--rows 16,64,256,1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH, LENGTH, STEPS = 4, 256, 6


def measure(vocab_size: int, rows: int) -> dict[str, float]:
    """In this process: peak MB and ms per step; ROWS 0 means the whole-logits loss."""
    import time
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import elm_mlx.lora.losses as losses
    import elm_mlx.lora.train as train
    from elm_mlx.model import Model
    from elm_spec import ModelSpec

    model = Model(ModelSpec.from_preset("elm-small", vocab_size=vocab_size))
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {
        "rank": 8, "scale": 20.0, "dropout": 0.0,
        "keys": ["attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"]})
    rng = np.random.default_rng(0)
    inputs, targets = (mx.array(rng.integers(0, vocab_size, (BATCH, LENGTH))) for _ in range(2))
    weights = mx.ones((BATCH, LENGTH))

    def whole_logits(model, inputs, targets, weights, segments):
        losses = nn.losses.cross_entropy(model(inputs).astype(mx.float32), targets) * weights
        return losses.sum() / weights.sum(), weights.sum()

    if rows:
        losses.loss_chunk_rows = lambda vocab: rows
    loss_and_grad = nn.value_and_grad(model, train.batch_loss if rows else whole_logits)
    optimizer = optim.Adam(learning_rate=1e-5)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, weights):
        (loss, _), grad = loss_and_grad(model, inputs, targets, weights, None)
        optimizer.update(model, grad)
        return loss

    mx.eval(step(inputs, targets, weights), state)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(STEPS):
        mx.eval(step(inputs, targets, weights), state)
        mx.clear_cache()
    return {"vocab_size": vocab_size, "rows": rows, "peak_mb": mx.get_peak_memory() / 1e6,
            "ms_per_step": (time.perf_counter() - start) / STEPS * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", default="2048,32000")
    parser.add_argument("--rows", default="16,64,256,1024")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # VOCAB,ROWS: child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*map(int, args.one.split(",")))))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    library = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    if Path(library).is_file():
        env["LD_PRELOAD"] = library
    print("| vocabulary | loss | MLX peak | ms/step |\n|---|---|---|---|")
    for vocab in map(int, args.vocab_sizes.split(",")):
        for rows in (0, *map(int, args.rows.split(","))):
            done = subprocess.run([sys.executable, __file__, "--one", f"{vocab},{rows}"], env=env,
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            label = f"chunks of {rows} rows" if rows else "whole logits (mlx-lm)"
            print(f"| {vocab} | {label} | {result['peak_mb']:.0f} MB | "
                  f"{result['ms_per_step']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
