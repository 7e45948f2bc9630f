"""Device-to-host syncs per optimizer step of `elm train` (elm-tiny, synthetic tokens, CPU).

    python benchmarks/count_syncs.py [--steps 12] [--log-every 4]
    torchrun --standalone --nproc_per_node 2 benchmarks/count_syncs.py    # DDP over gloo

Prints, for each step, the syncs made after it (its logging, then the next step's work), and
the mean over steps that log and over steps that do not. See elm_train/syncs.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from elm_train.config import load_config
from elm_train.syncs import HostSyncCounter
from elm_train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(overrides=[
            "model.preset=elm-tiny", "data.synthetic=true", "train.seq_len=32",
            "train.micro_batch_size=2", f"train.max_steps={args.steps}", "train.dtype=float32",
            "train.device=cpu", f"parallel.strategy={'ddp' if world_size > 1 else 'none'}", f"log.every={args.log_every}", "log.progress=false",
            "log.peak_flops=1e11", f"log.run_dir={run_dir}"])
        with HostSyncCounter() as counter:
            train(config)
    if int(os.environ.get("RANK", "0")):
        return
    logged = [s for s in range(1, args.steps) if s % args.log_every == 0]
    quiet = [s for s in range(1, args.steps) if s % args.log_every]
    print("syncs after each step:", [counter.per_step[s] for s in range(1, args.steps)])
    print(f"mean on log steps: {statistics.fmean(counter.per_step[s] for s in logged):.1f}; "
          f"on other steps: {statistics.fmean(counter.per_step[s] for s in quiet):.1f}")


if __name__ == "__main__":
    main()
