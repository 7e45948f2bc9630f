"""A full training step of an OpenELM-270M-shape model on this CPU against the torch GEMM ceiling.

The step is what `elm train` runs (the lm task's loss with z-loss, backward, gradient clipping,
AdamW); its FLOPs are ModelSpec.flops_per_token (docs/reference.md section 6). The ceiling is the best
FLOP/s of a square fp32 torch matmul, measured in the same run, interleaved with the steps so
that load from other processes hits both alike. Run it one job at a time.

    python benchmarks/bench_train_step.py [--batch 2] [--seq-len 512] [--rounds 4] [--profile]
"""

from __future__ import annotations

import argparse
import time

import torch

from elm_spec import ModelSpec
from elm_train.config import OptimConfig
from elm_train.metrics import measure_gemm_flops
from elm_train.model import OpenELM
from elm_train.tasks.lm import language_model_loss
from elm_train.trainer import build_optimizer


def build(spec: ModelSpec, attention: str, implementation: str):
    model = OpenELM(spec, attention=attention)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, implementation=implementation))
    return model, optimizer


def train_step(model, optimizer, tokens: torch.Tensor) -> dict[str, float]:
    """One step; seconds spent in forward (with the loss), backward, and clip + AdamW."""
    start = time.perf_counter()
    logits = model(tokens[:, :-1]).float()
    loss, _ = language_model_loss(logits, tokens[:, 1:], 1e-4)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return {"total": end - start, "forward": forward - start, "backward": backward - forward,
            "optimizer": end - backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="OpenELM-270M")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--optimizer", default="auto", choices=("auto", "fused", "foreach", "for-loop"))
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="Print the costliest operators.")
    args = parser.parse_args()

    spec = ModelSpec.from_preset(args.preset)
    model, optimizer = build(spec, args.attention, args.optimizer)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    flops_per_step = spec.flops_per_token(args.seq_len) * args.seq_len * args.batch
    train_step(model, optimizer, tokens)  # warm-up: allocations, optimizer state

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, optimizer, tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    steps, gemms = [], []
    for _ in range(args.rounds):
        gemms.append(measure_gemm_flops(torch.device("cpu"), torch.float32, args.gemm_size, 3))
        steps.append(train_step(model, optimizer, tokens))
    best = min(steps, key=lambda s: s["total"])
    best_step = best["total"]
    ceiling = max(gemms)
    achieved = flops_per_step / best_step
    print(f"model            {args.preset}: {spec.describe()}")
    print(f"step             batch {args.batch} x seq {args.seq_len}, fp32, attention "
          f"{args.attention}, AdamW {args.optimizer}, torch threads {torch.get_num_threads()}")
    print(f"FLOPs per step   {flops_per_step / 1e9:.1f} GFLOP (ModelSpec.flops_per_token)")
    print(f"step time        best {best_step:.3f} s of "
          + ", ".join(f"{s['total']:.3f}" for s in steps))
    print(f"  of which       forward+loss {best['forward']:.3f} s, backward {best['backward']:.3f} s, "
          f"clip+AdamW {best['optimizer']:.3f} s")
    print(f"achieved         {achieved / 1e9:.1f} GFLOP/s")
    print(f"GEMM ceiling     {ceiling / 1e9:.1f} GFLOP/s (best {args.gemm_size}^3 fp32 torch.mm, "
          "interleaved)")
    print(f"ratio            {achieved / ceiling:.3f}")


if __name__ == "__main__":
    main()
