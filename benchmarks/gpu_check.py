"""The first GPU run in one script: training MFU and tokens/s, the largest micro-batch, loss
parity and an `elm bench` grid, each cell time-boxed so the whole run fits its budget.

Cells run in order of what matters most; each is a real `elm train` (or probe, parity script,
`elm bench`) in its own process, killed at its time box; once the budget is spent the rest
are listed as skipped. Nothing is installed: without flash_attn the flash rows say "not
installed", without torchao the float8 rows carry elm's own refusal.

    OUT=DIR benchmarks/gpu_check.sh           # one GPU (under 8 minutes on an H200)
    python benchmarks/gpu_check.py --out DIR [--budget 440]
    python benchmarks/gpu_check.py --dry-run --out DIR   # CPU: every cell's code path, tiny model

OUT gets gpu_check.md (the tables), results.json (every cell), runs/<cell>/ (each run's
metrics.jsonl, stdout, stderr), parity/ and bench/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elm_spec.names import AC_MODES, OOM_EXIT_CODE  # noqa: E402

# (model, micro batch) at sequence 2048 in bf16, sized for an 80 GB GPU and up.
GPU_MODELS = (("OpenELM-270M", 16), ("OpenELM-450M", 12), ("OpenELM-1_1B", 8))
# A one-block model for the dry run (tests/test_compile.py covers many block shapes).
DRY_SPEC = dict(num_transformer_layers=1, model_dim=32, head_dim=8, num_gqa_groups=2,
                ffn_dim_divisor=16, vocab_size=128, max_context_length=64)
FLOAT8 = "tensorwise"
# Seconds for all cells: 7 min 20 s of an 8-minute slot on a GPU; on a shared CPU the dry run
# needs every cell (it checks each one's code path), so it has room to spare.
GPU_BUDGET_S = 440
DRY_BUDGET_S = 1500


@dataclass
class Plan:
    """What the GPU run and the dry run differ in."""
    out: Path
    dry: bool
    device: str
    dtype: str
    seq_len: int
    warmup: int
    steps: int
    models: tuple[tuple[str, int], ...]
    budget_s: float
    probe_max: int
    # Cell time boxes are sized for the GPU; a shared CPU takes this many times longer.
    limit_scale: float = 1.0
    deadline: float = 0.0

    def spec_overrides(self, model: str) -> list[str]:
        if not self.dry:
            return [f"model.preset={model}"]
        return [f"model.spec={self.out / 'dry-spec.json'}"]


@dataclass
class Cell:
    section: str
    label: str
    limit_s: float
    params: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)


def build_plan(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        plan = Plan(args.out, True, "cpu", "float32", 32, 1, 2, (("dry-tiny", 2),),
                    args.budget if args.budget is not None else DRY_BUDGET_S, probe_max=4,
                    limit_scale=5.0)
        plan.out.mkdir(parents=True, exist_ok=True)
        from elm_spec import ModelSpec

        spec = ModelSpec.from_preset("elm-tiny", **DRY_SPEC)
        (plan.out / "dry-spec.json").write_text(json.dumps(spec.to_config()))
        return plan
    return Plan(args.out, False, "cuda", "bfloat16", 2048, 3, 5, GPU_MODELS,
                args.budget if args.budget is not None else GPU_BUDGET_S, probe_max=256)


def cells(plan: Plan) -> list[Cell]:
    """Every cell, most important first: the budget may end the list early."""
    (small, small_batch), *rest = plan.models
    largest = plan.models[-1][0]

    def train(model: str, batch: int, attention: str = "sdpa", compile_: bool = False,
              ac: str = "none", float8: str = "none", limit: float = 60) -> Cell:
        label = (f"{model} {attention} compile={'on' if compile_ else 'off'} ac={ac} "
                 f"float8={'on' if float8 != 'none' else 'off'}")
        return Cell("train", label, limit, dict(model=model, batch=batch, attention=attention,
                                                compile=compile_, ac=ac, float8=float8))

    listed = [train(model, batch) for model, batch in plan.models]
    listed += [train(model, batch, attention="flash", limit=60) for model, batch in plan.models]
    listed += [train(small, small_batch, float8=FLOAT8, limit=45),
               train(small, small_batch, attention="eager"),
               *(train(small, small_batch, ac=mode) for mode in AC_MODES if mode != "none"),
               train(small, small_batch, compile_=True, limit=150),
               Cell("batch", f"{small} ac=none", 60, dict(model=small, ac="none")),
               Cell("batch", f"{largest} ac=none", 60, dict(model=largest, ac="none")),
               Cell("parity", "loss parity", 90),
               Cell("bench", "elm bench, 4 cells", 120)]
    for model, batch in rest:
        listed += [train(model, batch, attention="eager"),
                   *(train(model, batch, ac=mode) for mode in AC_MODES if mode != "none"),
                   train(model, batch, float8=FLOAT8, limit=45)]
    listed += [Cell("batch", f"{largest} ac=full", 60, dict(model=largest, ac="full"))]
    listed += [train(model, batch, compile_=True, limit=180) for model, batch in rest]
    unique = {cell.label: cell for cell in reversed(listed)}  # the dry run has one model
    return [cell for cell in listed if unique[cell.label] is cell]


def flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def run_process(command: list[str], timeout: float, log_dir: Path) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr); the whole process group dies at TIMEOUT
    (inductor's compile workers included)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout))
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        code = None
    (log_dir / "stdout.txt").write_text(stdout)
    (log_dir / "stderr.txt").write_text(stderr)
    return code, stdout, stderr


def last_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    lines = errors or stderr.strip().splitlines() or ["no output"]
    return lines[-1][:200]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_train(cell: Cell, plan: Plan, timeout: float) -> dict[str, Any]:
    p = cell.params
    if p["attention"] == "flash" and not flash_installed():
        return {"status": "not installed (flash_attn does not import)"}
    run_dir = plan.out / "runs" / slug(cell.label)
    overrides = [*plan.spec_overrides(p["model"]), f"model.attention={p['attention']}",
                 "data.synthetic=true", f"train.seq_len={plan.seq_len}",
                 f"train.micro_batch_size={p['batch']}",
                 f"train.max_steps={plan.warmup + plan.steps}",
                 f"train.compile={str(p['compile']).lower()}",
                 f"train.activation_checkpointing={p['ac']}", f"train.float8={p['float8']}",
                 f"train.dtype={plan.dtype}", f"train.device={plan.device}",
                 "optim.warmup_steps=2", f"log.run_dir={run_dir}", "log.every=1",
                 "log.progress=false"]
    started = time.perf_counter()
    code, _, stderr = run_process([sys.executable, "-m", "apps", "train", *overrides], timeout,
                                  run_dir)
    wall = time.perf_counter() - started
    records = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if code is None:
        return {"status": f"timed out after {timeout:.0f} s", "wall_s": wall}
    if code == OOM_EXIT_CODE or any(r.get("event") == "oom" for r in records):
        return {"status": "out of memory", "wall_s": wall}
    if code != 0:
        refused = p["float8"] != "none" and "train.float8" in last_error(stderr)
        return {"status": ("refused: " if refused else "failed: ") + last_error(stderr),
                "wall_s": wall}
    steps = [r for r in records if "event" not in r and r["step"] > plan.warmup]
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {"status": "ok", "wall_s": wall,
            "tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in steps),
            "mfu": statistics.median(mfus) if mfus else None,
            "step_time_s": statistics.median(r["step_time_s"] for r in steps),
            "peak_memory_gb": max(r["peak_memory_bytes"] for r in steps) / 1e9}


def run_batch_probe(cell: Cell, plan: Plan, timeout: float) -> dict[str, Any]:
    p = cell.params
    model = str(plan.out / "dry-spec.json") if plan.dry else p["model"]
    command = [sys.executable, __file__, "--probe", model, "--ac", p["ac"], "--out", str(plan.out),
               "--seq-len", str(plan.seq_len), "--dtype", plan.dtype, "--device", plan.device,
               "--probe-max", str(plan.probe_max)]
    code, stdout, stderr = run_process(command, timeout, plan.out / "runs" / slug(cell.label))
    trials = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    fits = [t for t in trials if t["fits"]]
    if not fits:
        return {"status": f"nothing fits ({last_error(stderr)})" if code is not None else
                f"timed out after {timeout:.0f} s before the first trial", "trials": trials}
    best = max(fits, key=lambda t: t["batch"])
    failed = [t["batch"] for t in trials if not t["fits"]]
    limit = (f"{min(failed)} ran out of memory" if failed else
             f"timed out after {timeout:.0f} s" if code is None else f"stopped at --probe-max {plan.probe_max}")
    return {"status": "ok", "largest_micro_batch": best["batch"], "peak_memory_gb":
            best["peak_memory_gb"], "tried": [t["batch"] for t in trials], "limit": limit}


def probe(args: argparse.Namespace) -> None:
    """In this process: double the micro-batch (then one step between) until a training step
    runs out of memory, one JSON line per trial, with elm's model, loss, AC and AdamW."""
    import torch

    from elm_spec.spec_file import spec_from_preset_or_file
    from elm_train import parallel
    from elm_train.config import OptimConfig
    from elm_train.model import OpenELM
    from elm_train.tasks.lm import language_model_loss
    from elm_train.trainer import build_optimizer

    device = torch.device(args.device)
    spec = spec_from_preset_or_file(args.probe)
    model = OpenELM(spec).to(device)
    parallel.apply_activation_checkpointing(model, args.ac)
    optimizer = build_optimizer(model, OptimConfig())
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    def fits(batch: int) -> bool:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            tokens = torch.randint(0, spec.vocab_size, (batch, args.seq_len + 1), device=device)
            with autocast:
                loss, _ = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
            print(json.dumps({"batch": batch, "fits": True, "peak_memory_gb": peak}), flush=True)
            return True
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            print(json.dumps({"batch": batch, "fits": False}), flush=True)
            return False

    batch, last_fit = 1, 0
    while batch <= args.probe_max and fits(batch):
        last_fit, batch = batch, batch * 2
    if last_fit and batch <= args.probe_max and batch - last_fit > 1:
        fits((last_fit + batch) // 2)


def run_parity(cell: Cell, plan: Plan, timeout: float) -> dict[str, Any]:
    import torch

    gpus = torch.cuda.device_count() if not plan.dry else 0
    out = plan.out / "parity"
    if gpus >= 2:  # NCCL across this machine's GPUs
        options = ["--device", "cuda", "--nproc", str(min(gpus, 8)), "--preset", "OpenELM-270M",
                   "--dtype", "bfloat16", "--seq-len", "512", "--micro-batch", "2", "--steps", "50"]
        where = f"NCCL, {min(gpus, 8)} GPUs, OpenELM-270M bf16"
    else:  # one GPU cannot hold two NCCL ranks: gloo on this machine's CPUs
        steps = "2" if plan.dry else "50"
        options = ["--device", "cpu", "--nproc", "2", "--steps", steps,
                   *(["--strategies", "ddp"] if plan.dry else [])]
        where = f"gloo, 2 CPU processes, elm-tiny fp32, {steps} steps (NCCL needs 2+ GPUs)"
    code, _, stderr = run_process(
        [sys.executable, str(REPO / "benchmarks/loss_parity.py"), "--out", str(out), *options],
        timeout, out)
    if code is None:
        return {"status": f"timed out after {timeout:.0f} s", "where": where}
    if code != 0:
        return {"status": "failed: " + last_error(stderr), "where": where}
    losses = json.loads((out / "losses.json").read_text())
    return {"status": "ok", "where": where, "tolerance": losses["tolerance"],
            "max_relative_difference": losses["max_relative_difference"]}


def run_bench(cell: Cell, plan: Plan, timeout: float) -> dict[str, Any]:
    import yaml

    grid = {"seq_len": plan.seq_len, "dtype": plan.dtype, "warmup_steps": plan.warmup,
            "repeats": 3, "steps_per_repeat": 1 if plan.dry else 3,
            "models": ["elm-tiny" if plan.dry else plan.models[0][0]],
            "batch_sizes": [1, 2] if plan.dry else [8, 16], "attention": ["eager", "sdpa"],
            "strategies": "ddp", "gpus": 1, "nodes": 1, "timeout_s": max(10, int(timeout / 4))}
    if plan.dry:
        grid["seq_len"] = 32
    path = plan.out / "bench-grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = plan.out / "bench"
    code, _, stderr = run_process([sys.executable, "-m", "apps", "bench", "run", "--grid", str(path),
                                   "--out", str(out)], timeout, plan.out / "runs" / "bench")
    rows = []
    if (out / "results.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
                if line.strip()]
    cells_ = [{k: row.get(k) for k in ("model", "batch_size", "attention", "status",
                                       "tokens_per_s", "mfu")} for row in rows]
    if code is None:
        return {"status": f"timed out after {timeout:.0f} s ({len(rows)} cells done)",
                "cells": cells_}
    if code != 0:
        return {"status": "failed: " + last_error(stderr), "cells": cells_}
    return {"status": "ok", "cells": cells_, "report": str(out / "report.md")}


RUNNERS = {"train": run_train, "batch": run_batch_probe, "parity": run_parity, "bench": run_bench}
# Below this many seconds left, a cell is skipped rather than started.
MIN_CELL_S = 15


def run_all(plan: Plan) -> list[Cell]:
    plan.deadline = time.monotonic() + plan.budget_s
    listed = cells(plan)
    for cell in listed:
        left = plan.deadline - time.monotonic()
        if left < MIN_CELL_S:
            cell.outcome = {"status": f"skipped: budget spent ({max(0, left):.0f} s left)"}
        else:
            cell.outcome = RUNNERS[cell.section](cell, plan,
                                                 min(cell.limit_s * plan.limit_scale, left))
        print(f"[{plan.budget_s - (plan.deadline - time.monotonic()):5.0f} s] {cell.section}: "
              f"{cell.label}: {json.dumps(cell.outcome)}", flush=True)
    return listed


def device_name(plan: Plan) -> str:
    if plan.dry:
        return "CPU (dry run)"
    import torch

    return torch.cuda.get_device_name(0)


def write_report(plan: Plan, listed: list[Cell]) -> Path:
    lines = [f"# GPU check on {device_name(plan)}", "",
             f"`benchmarks/gpu_check.sh`, budget {plan.budget_s:.0f} s; `elm train` on synthetic "
             f"tokens, sequence {plan.seq_len}, {plan.dtype}, one device, median of {plan.steps} "
             f"steps after {plan.warmup} warm-up steps; MFU against the GPU's dense peak "
             "(docs/reference.md section 6).", "",
             "| model | micro batch | attention | compile | AC | float8 | tokens/s | MFU | "
             "step (s) | peak memory (GB) | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in (c for c in listed if c.section == "train"):
        p, o = cell.params, cell.outcome
        if o["status"] == "ok":
            mfu = f"{100 * o['mfu']:.1f}%" if o["mfu"] is not None else "unknown"
            figures = (f"{o['tokens_per_s']:,.0f}", mfu, f"{o['step_time_s']:.3f}",
                       f"{o['peak_memory_gb']:.1f}")
        else:
            figures = ("–",) * 4
        lines.append(f"| {p['model']} | {p['batch']} | {p['attention']} | "
                     f"{'on' if p['compile'] else 'off'} | {p['ac']} | {p['float8']} | "
                     + " | ".join(figures) + f" | {o['status']} |")
    lines += ["", "| largest micro-batch | result |", "|---|---|"]
    for cell in (c for c in listed if c.section == "batch"):
        o = cell.outcome
        result = (f"**{o['largest_micro_batch']}** (peak {o['peak_memory_gb']:.1f} GB; tried "
                  f"{o['tried']}; {o['limit']})" if o["status"] == "ok" else o["status"])
        lines.append(f"| {cell.label} | {result} |")
    for cell in (c for c in listed if c.section == "parity"):
        o = cell.outcome
        lines += ["", f"{cell.label} ({o.get('where', '')}): {o['status']}"
                  + (f", largest relative difference per strategy {o['max_relative_difference']} "
                     f"(tolerance {o['tolerance']:.0e})" if o["status"] == "ok" else "")]
    for cell in (c for c in listed if c.section == "bench"):
        lines += ["", f"{cell.label}: {cell.outcome['status']}", "",
                  "| model | micro batch | attention | tokens/s | MFU | status |",
                  "|---|---|---|---|---|---|"]
        for row in cell.outcome.get("cells", []):
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "–"
            rate = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "–"
            lines.append(f"| {row['model']} | {row['batch_size']} | {row['attention']} | {rate} | "
                         f"{mfu} | {row['status']} |")
    path = plan.out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    (plan.out / "results.json").write_text(json.dumps(
        [{"section": c.section, "label": c.label, **c.params, **c.outcome} for c in listed],
        indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or REPO / "runs/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="CPU check of every cell's path.")
    parser.add_argument("--budget", type=float,
                        help=f"Seconds for all cells together, after which no cell starts "
                             f"(default {GPU_BUDGET_S}; dry run {DRY_BUDGET_S}).")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--ac", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--probe-max", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run to check the script on a CPU)",
                  file=sys.stderr)
            return 1
    plan = build_plan(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    report = write_report(plan, run_all(plan))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
