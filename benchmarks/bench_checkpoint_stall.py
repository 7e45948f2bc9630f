"""How long a checkpoint save holds up the training step: blocking against asynchronous saves
(checkpoint.async_save) of the same model and AdamW state, through elm's Checkpointer, in one
process on this CPU.

For each save: the time until `save()` returns (what the step waits for), and for the
asynchronous save also the time until its shards are written and committed, and how much
slower the training steps run while the writer thread works (on a CPU it shares the cores and
the interpreter with the step; a GPU step does not). Saves alternate between the two modes
ROUNDS times so that load from other processes hits both alike; medians are printed.

    PYTHONPATH=. python benchmarks/bench_checkpoint_stall.py [--preset elm-small] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elm_spec import ModelSpec
from elm_train.checkpoint import Checkpointer
from elm_train.config import OptimConfig
from elm_train.data.loader import SyntheticTokenLoader
from elm_train.model import OpenELM
from elm_train.parallel import DistContext
from elm_train.tasks.lm import language_model_loss
from elm_train.trainer import build_optimizer


def step(model, optimizer, loader) -> float:
    start = time.perf_counter()
    batch = next(loader)
    logits = model(batch["input_ids"]).float()
    loss, _ = language_model_loss(logits, batch["labels"], 1e-4)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="elm-small")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="embedding rows (OpenELM's vocabulary: a larger checkpoint)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps timed after each save")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = dataclasses.replace(ModelSpec.from_preset(args.preset), vocab_size=args.vocab_size)
    model = OpenELM(spec)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loader = SyntheticTokenLoader(spec.vocab_size, args.seq_len, args.batch)
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    step(model, optimizer, loader)  # AdamW's state exists from here on
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values())
    figures: dict[str, list[float]] = {k: [] for k in (
        "blocking", "async", "async_written", "steps_quiet", "steps_writing")}
    with tempfile.TemporaryDirectory() as directory:
        savers = {mode: Checkpointer(Path(directory) / mode, ctx, 2, async_save=mode == "async")
                  for mode in ("blocking", "async")}
        number = 0
        for _ in range(args.rounds):
            for mode, saver in savers.items():
                number += 1
                start = time.perf_counter()
                saver.save(number, model, optimizer, scheduler, loader, "")
                figures[mode].append(time.perf_counter() - start)
                steps = sum(step(model, optimizer, loader) for _ in range(args.steps)) / args.steps
                if mode == "async":
                    figures["steps_writing"].append(steps)
                    saver.finish()
                    figures["async_written"].append(time.perf_counter() - start)
                else:
                    figures["steps_quiet"].append(steps)
        for saver in savers.values():
            saver.close()
    median = {k: statistics.median(v) for k, v in figures.items()}
    print(f"{args.preset} with a {args.vocab_size}-row vocabulary: {state_bytes / 1e6:.0f} MB of "
          f"weights and AdamW state; median of {args.rounds} saves each")
    print(f"blocking save:      step waits {median['blocking'] * 1000:7.0f} ms")
    print(f"asynchronous save:  step waits {median['async'] * 1000:7.0f} ms "
          f"({median['async'] / median['blocking']:.2f} of blocking); written and committed "
          f"{median['async_written'] * 1000:.0f} ms after the save began")
    print(f"training step:      {median['steps_quiet'] * 1000:7.0f} ms, "
          f"{median['steps_writing'] * 1000:.0f} ms while the writer thread works")


if __name__ == "__main__":
    main()
