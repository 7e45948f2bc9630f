"""Loss parity across data-parallel strategies, as torchtitan's scripts/loss_compare.py checks.

The same seed and global batch are trained for N steps in one process and, under torchrun,
with each of ddp, fsdp, fsdp-grad-op and hsdp (gloo on CPUs, NCCL on GPUs); every step's loss
must agree with the single process's within a relative tolerance.

    PYTHONPATH=. python benchmarks/loss_parity.py --out runs/parity           # CPU, elm-tiny
    PYTHONPATH=. python benchmarks/loss_parity.py --out $OUT/parity --device cuda --nproc 8 \\
        --preset OpenELM-270M --dtype bfloat16 --seq-len 2048 --micro-batch 4 --steps 50

Data: uniform random tokens unless --data names prepared tokens (`elm data prepare`). Prints
each strategy's largest relative difference and writes OUT/losses.json and each run's
OUT/<strategy>/metrics.jsonl. Exit 1 with one `error:` line naming the first step that
disagrees. hsdp uses 2 replicas (of nproc/2 shards each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTED = ("ddp", "fsdp", "fsdp-grad-op", "hsdp")
# Relative tolerance per step when --tolerance is not given. In fp32 the strategies differ
# only in the order of the gradient sums; in bf16 ddp runs under autocast with fp32 weights,
# the FSDP strategies on bf16 copies of the weights (fp32 reductions), so they drift apart more.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for runs and losses.json")
    parser.add_argument("--preset", default="elm-tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun runs")
    parser.add_argument("--strategies", default=",".join(DISTRIBUTED))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DEFAULT_TOLERANCE))
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=2,
                        help="sequences per process (the single process runs nproc times as many)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data", help="prepared token data (default: uniform random tokens)")
    parser.add_argument("--tolerance", type=float,
                        help="largest relative loss difference allowed at any step "
                             "(default: 1e-4 in float32, 2e-2 in bfloat16)")
    parser.add_argument("--worker", nargs="+", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        unknown = set(args.strategies.split(",")) - set(DISTRIBUTED)
        if unknown:
            parser.error(f"--strategies: unknown {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(DISTRIBUTED)}")
        if args.nproc < 2 or args.steps < 1:
            parser.error("--nproc must be at least 2 and --steps at least 1")
    return args


def run_config(args: argparse.Namespace, strategy: str, run_dir: Path) -> dict[str, Any]:
    processes = 1 if strategy == "none" else args.nproc
    train = {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch * args.nproc // processes,
             "max_steps": args.steps, "dtype": args.dtype, "device": args.device, "eval_batches": 1,
             "seed": 0}
    if args.device == "cpu":
        train["threads"] = 1
    return {
        "model": {"preset": args.preset},
        "data": {"path": args.data} if args.data else {"synthetic": True},
        "optim": {"lr": args.lr, "warmup_steps": 2},
        "train": train,
        "parallel": {"strategy": strategy,
                     "replicate_degree": 2 if strategy == "hsdp" and args.nproc % 2 == 0 else None},
        "log": {"run_dir": str(run_dir), "every": 1, "progress": False, "peak_flops": 1e12},
    }


def step_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "event" not in r]


def compare(reference: list[float], runs: dict[str, list[float]], tolerance: float
            ) -> tuple[dict[str, float], str | None]:
    """Each run's largest relative difference from REFERENCE, and the first disagreement."""
    worst: dict[str, float] = {}
    failure = None
    for strategy, losses in runs.items():
        if len(losses) != len(reference):
            return worst, (f"{strategy} logged {len(losses)} steps, the single process "
                           f"{len(reference)}")
        differences = [abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)]
        worst[strategy] = max(differences)
        if failure is None and worst[strategy] > tolerance:
            step = next(i for i, d in enumerate(differences) if d > tolerance)
            failure = (f"{strategy} step {step + 1}: loss {losses[step]:.6f} differs from the "
                       f"single process's {reference[step]:.6f} by {differences[step]:.2e} "
                       f"(relative; tolerance {tolerance:.0e})")
    return worst, failure


def launch(args: argparse.Namespace) -> int:
    from elm_train.config import load_config
    from elm_train.trainer import train

    strategies = args.strategies.split(",")
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for strategy in ["none", *strategies]:
        path = args.out / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(run_config(args, strategy, args.out / strategy)))
        configs[strategy] = path
    train(load_config(configs["none"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.nproc), __file__, "--out", str(args.out), "--worker",
               *(str(configs[s]) for s in strategies)]
    result = subprocess.run(command, env=env)
    if result.returncode:
        print(f"error: the torchrun runs failed (exit {result.returncode}); see above",
              file=sys.stderr)
        return 1
    reference = step_losses(args.out / "none")
    runs = {s: step_losses(args.out / s) for s in strategies}
    worst, failure = compare(reference, runs, tolerance)
    (args.out / "losses.json").write_text(json.dumps(
        {"tolerance": tolerance, "dtype": args.dtype, "nproc": args.nproc, "preset": args.preset,
         "none": reference, **runs, "max_relative_difference": worst}, indent=2) + "\n")
    for strategy, difference in worst.items():
        print(f"{strategy:>13}: largest relative loss difference {difference:.2e} over "
              f"{len(reference)} steps (tolerance {tolerance:.0e})")
    if failure:
        print(f"error: loss parity: {failure}", file=sys.stderr)
        return 1
    print(f"loss parity: {', '.join(strategies)} agree with one process "
          f"({len(reference)} steps, {args.dtype}, {args.nproc} processes)")
    return 0


def work(configs: list[str]) -> None:
    """Under torchrun: train each config in turn in one process group."""
    import torch
    import torch.distributed as dist

    from elm_train.config import load_config
    from elm_train.trainer import train

    first = load_config(configs[0])
    if first.train.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        for path in configs:
            train(load_config(path))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        work(args.worker)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
