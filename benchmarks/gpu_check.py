"""Training throughput on one GPU: OpenELM-270M and 1.1B, sdpa vs flash attention, torch.compile
off and on, bf16. Each configuration is a real `elm train` run on synthetic tokens in its own
process; the table gives the median tokens/s per device and MFU over the steps after warm-up.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.md]
    python benchmarks/gpu_check.py --dry-run      # on a CPU: tiny model, float32, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (preset, micro batch) at sequence 2048; sized for 80 GB and up.
GPU_MODELS = (("OpenELM-270M", 16), ("OpenELM-1_1B", 8))
DRY_MODELS = (("elm-tiny", 2),)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def run_config(preset: str, batch: int, attention: str, compile_blocks: bool, args, work: Path
               ) -> dict:
    run_dir = work / f"{preset}-{attention}-{'compile' if compile_blocks else 'eager'}"
    overrides = [
        f"model.preset={preset}", f"model.attention={attention}", "data.synthetic=true",
        f"train.seq_len={args.seq_len}", f"train.micro_batch_size={batch}",
        f"train.max_steps={args.warmup + args.steps}", f"train.compile={str(compile_blocks).lower()}",
        f"train.dtype={args.dtype}", f"train.device={args.device}", "optim.warmup_steps=2",
        f"log.run_dir={run_dir}", "log.every=1", "log.progress=false",
    ]
    command = [sys.executable, "-m", "apps", "train", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.timeout}s"}
    wall = time.perf_counter() - started
    metrics = run_dir / "metrics.jsonl"
    records = []
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if result.returncode != 0:
        oom = [r for r in records if r.get("event") == "oom"]
        if oom:
            return {"status": "out of memory"}
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {last[:120]}"}
    steps = [r for r in records if "event" not in r and r["step"] > args.warmup]
    tokens = statistics.median(r["tokens_per_s_per_device"] for r in steps)
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {"status": "ok", "tokens_per_s": tokens,
            "mfu": statistics.median(mfus) if mfus else None,
            "step_time_s": statistics.median(r["step_time_s"] for r in steps),
            "peak_memory_gb": max(r["peak_memory_bytes"] for r in steps) / 1e9,
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU check of the script itself.")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--timeout", type=int, default=150, help="Seconds per configuration.")
    args = parser.parse_args()
    if args.dry_run:
        args.seq_len, args.steps, args.warmup = 64, 2, 1
        args.dtype, args.device, models = "float32", "cpu", DRY_MODELS
    else:
        args.dtype, args.device, models = "bfloat16", "cuda", GPU_MODELS
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device (use --dry-run to check the script on a CPU)")
    device = "CPU (dry run)" if args.dry_run else _gpu_name()
    has_flash = flash_available() and not args.dry_run
    rows = []
    with tempfile.TemporaryDirectory(prefix="elm-gpu-check-") as scratch:
        for preset, batch in models:
            for attention in ("sdpa", "flash"):
                for compile_blocks in (False, True):
                    label = f"{preset} {attention} compile={'on' if compile_blocks else 'off'}"
                    if attention == "flash" and not has_flash:
                        outcome = {"status": "not installed"}
                    else:
                        outcome = run_config(preset, batch, attention, compile_blocks, args,
                                             Path(scratch))
                    print(f"{label}: {outcome}", flush=True)
                    rows.append((preset, batch, attention, compile_blocks, outcome))
    write_table(args, device, rows)
    print(f"wrote {args.out}")


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def write_table(args, device: str, rows: list) -> None:
    lines = [f"# Training throughput on {device}", "",
             f"`elm train` on synthetic tokens, sequence {args.seq_len}, {args.dtype}, one device; "
             f"median of {args.steps} steps after {args.warmup} warm-up steps; MFU against the "
             "dense bf16 peak (docs/reference.md section 6).", "",
             "| model | micro batch | attention | compile | tokens/s | MFU | step (s) | peak memory (GB) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset, batch, attention, compile_blocks, outcome in rows:
        if outcome["status"] == "ok":
            mfu = f"{100 * outcome['mfu']:.1f}%" if outcome["mfu"] is not None else "n/a"
            cells = (f"{outcome['tokens_per_s']:,.0f}", mfu, f"{outcome['step_time_s']:.3f}",
                     f"{outcome['peak_memory_gb']:.1f}")
        else:
            cells = ("–", "–", "–", "–")
        lines.append(f"| {preset} | {batch} | {attention} | {'on' if compile_blocks else 'off'} | "
                     + " | ".join(cells) + f" | {outcome['status']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
