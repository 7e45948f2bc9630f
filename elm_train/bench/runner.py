"""Run grid cells through the real training engine (`elm train` under torchrun) and record them.

One launch per cell: `warmup_steps` uncounted steps, then `repeats` x `steps_per_repeat` steps
on synthetic tokens. A repeat's throughput is its tokens over the sum of its logged step
times (metrics.jsonl); the cell's tokens/s is the mean over repeats, as in the study. A cell
with a `loss_budget_tokens` gets a second launch on real data for that many tokens.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import io
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from elm_spec import ElmError
from elm_spec.jsonl import read_jsonl_objects, read_jsonl_records
from elm_spec.names import OOM_EXIT_CODE
from elm_spec.settings import set_dotted
from elm_spec.spec_file import is_spec_file
from elm_train.batch_plan import plan_batch
from elm_train.bench import cost
from elm_train.bench.grid import Cell, Grid

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
GRID_FILE = "grid.yaml"
FINISHED = ("ok", "oom")
# Out-of-memory errors raised where the engine does not turn them into exit code 3 (e.g. while
# building or wrapping the model), as torch and Python word them.
OOM_MESSAGE = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|MemoryError",
                         re.IGNORECASE)
LOSS_CURVE_POINTS = 20
# Columns of results.csv, in order (results.jsonl rows carry the same keys).
ROW_FIELDS = (
    "model", "params", "batch_size", "attention", "strategy", "gpus", "nodes", "world_size",
    "global_batch_size", "seq_len", "dtype", "status", "error", "tokens_per_s",
    "tokens_per_s_per_device", "tokens_per_s_repeats", "tokens_per_s_median", "step_time_s",
    "peak_memory_bytes", "device_memory_bytes", "mfu", "gpu_type", "device_name", "price_unit", "price_per_gpu_hour",
    "price_per_hour", "tokens_per_dollar", "loss_budget_tokens", "loss_tokens", "loss_initial",
    "loss_reached", "loss_valid", "loss_per_token", "loss_per_dollar", "loss_cost", "loss_curve", "wall_s",
    "finished_at", "key",
)


@dataclass(frozen=True)
class Context:
    """What every cell of a sweep shares: the device, its price and how processes start."""

    prices: cost.PriceTable
    device_type: str
    device_name: str
    launcher: str = "local"  # "local" (torchrun --standalone) or "slurm" (srun torchrun)
    device_memory_bytes: int | None = None

    @property
    def price_per_gpu_hour(self) -> float:
        return self.prices.price_per_hour(self.device_type)

    def key(self, cell: Cell) -> str:
        """Identifies a result: the cell's parameters on this device type (the same grid run
        on another GPU type measures new cells)."""
        return json.dumps({**cell.parameters(), "gpu_type": self.device_type}, sort_keys=True)


# ----- results ------------------------------------------------------------------------------

class ResultsStore:
    """DIR/results.jsonl (appended, one row per finished cell) and DIR/results.csv (rewritten
    from it). A lock file lets SLURM array tasks append at the same time."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.jsonl = directory / RESULTS_JSONL
        self.csv = directory / RESULTS_CSV

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def rows(self) -> list[dict[str, Any]]:
        """The latest row of every cell, in the order cells first finished."""
        if not self.jsonl.is_file():
            return []
        latest: dict[str, dict[str, Any]] = {}
        for _, row in read_jsonl_objects(self.jsonl, allow_empty=True):
            latest[row.get("key") or json.dumps(row, sort_keys=True)] = row
        return list(latest.values())

    def finished_keys(self) -> set[str]:
        return {row["key"] for row in self.rows() if row.get("status") in FINISHED}

    def append(self, *rows: dict[str, Any]) -> None:
        with self._locked():
            with open(self.jsonl, "a") as out:
                out.writelines(json.dumps(row) + "\n" for row in rows)
            self._write_csv()

    def _write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})
        atomic_write_text(self.csv, buffer.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ----- the engine's configuration -------------------------------------------------------------

def tokens_per_step(cell: Cell) -> int:
    settings = dict(cell.settings.train)
    return plan_batch(cell.world_size, cell.batch_size, cell.seq_len,
                      int(settings.get("train.grad_accum_steps", 1)),
                      int(settings.get("train.global_batch_tokens", 0))).tokens_per_step


def train_config(cell: Cell, run_dir: Path, max_steps: int, data_path: str | None = None
                 ) -> dict[str, Any]:
    """The `elm train` configuration of a cell (TRAIN contract keys)."""
    model: dict[str, Any] = {"spec": cell.model} if is_spec_file(cell.model) else {"preset": cell.model}
    model["attention"] = cell.attention
    config: dict[str, Any] = {
        "task": "lm",
        "model": model,
        "data": {"path": data_path, "seed": 0} if data_path else {"synthetic": True, "seed": 0},
        "optim": {"lr": cell.settings.lr, "warmup_steps": max(1, max_steps // 10)},
        "train": {"seq_len": cell.seq_len, "micro_batch_size": cell.batch_size,
                  "max_steps": max_steps, "dtype": cell.dtype, "seed": 0},
        "parallel": {"strategy": cell.strategy},
        "log": {"run_dir": str(run_dir), "every": 1},
    }
    for dotted, value in cell.settings.train:
        set_dotted(config, dotted, value)
    return config


# ----- launching ------------------------------------------------------------------------------

def source_root() -> Path:
    """The directory holding the `apps` and `elm_train` packages, for the children's path."""
    return Path(__file__).resolve().parents[2]


def child_environment() -> dict[str, str]:
    root = str(source_root())
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def slurm_rendezvous() -> tuple[str, int, str]:
    """Head node, port and id for torchrun's c10d rendezvous inside a SLURM allocation."""
    nodes = os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ElmError("--launcher slurm runs inside a SLURM job (SLURM_JOB_NODELIST is not set)")
    hostnames = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                               text=True, check=True).stdout.split()
    job = os.environ.get("SLURM_JOB_ID", "0")
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    return hostnames[0], 20000 + int(job) % 20000, f"elm-bench-{job}-{task}"


def launch_command(cell: Cell, config_path: Path, log_dir: Path, launcher: str) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    engine = ["--redirects", "3", "-m", "apps", "train", str(config_path)]
    if launcher == "local":
        return [*torchrun, "--standalone", "--nproc_per_node", str(cell.gpus),
                "--log-dir", str(log_dir), *engine]
    head, port, run_id = slurm_rendezvous()
    # One torchrun per node; each writes its workers' logs to its own folder.
    per_node = (f'exec {shlex.join(torchrun)} --log-dir {shlex.quote(str(log_dir))}/'
                f'node"$SLURM_NODEID" "$@"')
    return ["srun", f"--nodes={cell.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "bash", "-c", per_node, "bash", "--nnodes", str(cell.nodes), "--nproc_per_node",
            str(cell.gpus), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head}:{port}",
            "--rdzv_id", run_id, *engine]


def memory_cap(limit_gb: float | None) -> Callable[[], None] | None:
    """A preexec_fn capping the address space of the launcher and every worker it starts."""
    if limit_gb is None:
        return None
    limit = int(limit_gb * 1024**3)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@dataclass(frozen=True)
class Launch:
    returncode: int | None  # None when it timed out
    log: Path               # the launcher's own stdout and stderr
    log_dir: Path           # torchrun's per-worker stdout.log / stderr.log


def launch(cell: Cell, config_path: Path, run_dir: Path, launcher: str) -> Launch:
    log_dir = run_dir.parent / f"{run_dir.name}-logs"
    log = run_dir.parent / f"{run_dir.name}-launcher.log"
    command = launch_command(cell, config_path, log_dir, launcher)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=child_environment(), start_new_session=True,
                                   preexec_fn=memory_cap(cell.settings.memory_limit_gb))
        try:
            returncode: int | None = process.wait(timeout=cell.settings.timeout_s)
        except subprocess.TimeoutExpired:
            stop(process)
            returncode = None
        except BaseException:
            stop(process)
            raise
    return Launch(returncode, log, log_dir)


def stop(process: subprocess.Popen) -> None:
    """End the launcher and its workers (they share its process group)."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            return


# ----- reading a run --------------------------------------------------------------------------

def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-step records sorted by step, events) from the engine's metrics.jsonl."""
    steps, events = [], []
    for record in read_jsonl_records(path) if path.is_file() else []:
        if "event" in record:
            events.append(record)
        elif "step" in record:
            steps.append(record)
    return sorted(steps, key=lambda r: r["step"]), events


def worker_exit_code(launch_log: Path) -> tuple[int | None, str | None]:
    """(exit code, local rank) of the first worker that failed, from torchrun's summary."""
    text = launch_log.read_text(errors="replace") if launch_log.is_file() else ""
    root = text.rfind("Root Cause")
    if root < 0:
        return None, None
    code = re.search(r"exitcode\s*:\s*(-?\d+)", text[root:])
    rank = re.search(r"local_rank:\s*(\d+)", text[root:])
    return (int(code.group(1)) if code else None), (rank.group(1) if rank else None)


def last_line(path: Path) -> str | None:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def failure_message(run: Launch, local_rank: str | None) -> str:
    """The last stderr line of the worker that failed (else of any worker, else the launcher)."""
    logs = sorted(run.log_dir.rglob("stderr.log")) if run.log_dir.is_dir() else []
    failed = [p for p in logs if p.parent.name == local_rank] + logs
    for path in failed:
        line = last_line(path)
        if line:
            return line
    return (last_line(run.log) if run.log.is_file() else None) or "no output"


def outcome(run: Launch, cell: Cell, events: list[dict[str, Any]]) -> tuple[str, str | None]:
    """("ok" | "oom" | "failed", message) of one launch."""
    oom = [e for e in events if e.get("event") == "oom"]
    if oom:
        return "oom", str(oom[0].get("message", "out of memory"))
    if run.returncode is None:
        return "failed", f"timed out after {cell.settings.timeout_s:g} s (timeout_s)"
    if run.returncode == 0:
        return "ok", None
    code, local_rank = worker_exit_code(run.log)
    message = failure_message(run, local_rank)
    if OOM_EXIT_CODE in (code, run.returncode) or OOM_MESSAGE.search(message):
        return "oom", message
    if code is not None and code < 0:
        message = f"killed by signal {-code} ({message})"
    return "failed", message


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    repeats: list[float]
    median: float
    step_time_s: float
    peak_memory_bytes: int | None
    mfu: float | None


def measure_throughput(steps: list[dict[str, Any]], cell: Cell) -> Throughput:
    settings = cell.settings
    if len(steps) < settings.max_steps:
        raise ElmError(f"metrics.jsonl has {len(steps)} steps, expected {settings.max_steps}")
    measured = steps[settings.warmup_steps: settings.max_steps]
    tokens = tokens_per_step(cell)
    repeats = []
    for r in range(settings.repeats):
        chunk = measured[r * settings.steps_per_repeat: (r + 1) * settings.steps_per_repeat]
        repeats.append(tokens * len(chunk) / sum(s["step_time_s"] for s in chunk))
    tokens_per_s = statistics.fmean(repeats)
    peaks = [s["peak_memory_bytes"] for s in steps if s.get("peak_memory_bytes") is not None]
    # The engine's MFU is proportional to its per-device throughput; carry its ratio over.
    last = measured[-1]
    mfu = None
    if last.get("mfu") is not None and last.get("tokens_per_s_per_device"):
        mfu = tokens_per_s / cell.world_size * last["mfu"] / last["tokens_per_s_per_device"]
    return Throughput(tokens_per_s, repeats,
                      statistics.median(tokens / s["step_time_s"] for s in measured),
                      statistics.fmean(s["step_time_s"] for s in measured),
                      max(peaks) if peaks else None, mfu)


@dataclass(frozen=True)
class LossRun:
    tokens: int
    initial: float
    reached: float            # mean training loss over the last chunk of steps
    valid: float | None       # the engine's held-out loss at the end, when the data has one
    curve: list[list[float]]  # [tokens seen, mean loss] at the end of each chunk of steps


def measure_loss(steps: list[dict[str, Any]], events: list[dict[str, Any]], cell: Cell,
                 expected_steps: int) -> LossRun:
    if len(steps) < expected_steps:
        raise ElmError(f"loss run: metrics.jsonl has {len(steps)} steps, expected {expected_steps}")
    losses = [float(s["loss"]) for s in steps[:expected_steps]]
    tokens = tokens_per_step(cell)
    chunk = math.ceil(len(losses) / LOSS_CURVE_POINTS)
    curve = [[float(tokens * min(i + chunk, len(losses))), statistics.fmean(losses[i: i + chunk])]
             for i in range(0, len(losses), chunk)]
    valid = next((e.get("valid_loss") for e in events if e.get("event") == "end"), None)
    return LossRun(tokens * len(losses), losses[0], curve[-1][1], valid, curve)


# ----- one cell -------------------------------------------------------------------------------

def run_engine(cell: Cell, cell_dir: Path, name: str, max_steps: int, launcher: str,
               data_path: str | None = None
               ) -> tuple[Launch, list[dict[str, Any]], list[dict[str, Any]]]:
    run_dir = cell_dir / name
    config_path = cell_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(train_config(cell, run_dir, max_steps, data_path),
                                          sort_keys=False))
    run = launch(cell, config_path, run_dir, launcher)
    steps, events = read_metrics(run_dir / "metrics.jsonl")
    return run, steps, events


def cell_row(cell: Cell, context: Context) -> dict[str, Any]:
    price_per_hour = context.price_per_gpu_hour * cell.world_size
    accumulation = tokens_per_step(cell) // (cell.batch_size * cell.world_size * cell.seq_len)
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(
        model=cell.model_name, params=cell.spec().num_parameters(), batch_size=cell.batch_size,
        attention=cell.attention, strategy=cell.strategy, gpus=cell.gpus, nodes=cell.nodes,
        world_size=cell.world_size,
        global_batch_size=cell.batch_size * cell.world_size * accumulation,
        seq_len=cell.seq_len, dtype=cell.dtype, gpu_type=context.device_type,
        device_name=context.device_name, device_memory_bytes=context.device_memory_bytes,
        price_unit=context.prices.unit,
        price_per_gpu_hour=context.price_per_gpu_hour, price_per_hour=price_per_hour,
        loss_budget_tokens=cell.settings.loss_budget_tokens, key=context.key(cell))
    return row


def run_cell(cell: Cell, cell_dir: Path, context: Context) -> dict[str, Any]:
    """Measure one cell from scratch (its directory is emptied first) and return its row."""
    started = time.monotonic()
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    row = cell_row(cell, context)
    run, steps, events = run_engine(cell, cell_dir, "throughput", cell.settings.max_steps,
                                    context.launcher)
    status, error = outcome(run, cell, events)
    if status == "ok":
        try:
            measured = measure_throughput(steps, cell)
        except (ElmError, KeyError, TypeError, ZeroDivisionError) as problem:
            status, error = "failed", f"unreadable metrics: {problem!r}"
        else:
            row.update(
                tokens_per_s=measured.tokens_per_s,
                tokens_per_s_per_device=measured.tokens_per_s / cell.world_size,
                tokens_per_s_repeats=measured.repeats, tokens_per_s_median=measured.median,
                step_time_s=measured.step_time_s, peak_memory_bytes=measured.peak_memory_bytes,
                mfu=measured.mfu,
                tokens_per_dollar=cost.tokens_per_dollar(measured.tokens_per_s,
                                                         row["price_per_hour"]))
    if status == "ok" and cell.settings.loss_budget_tokens:
        status, error = add_loss_run(cell, cell_dir, context, row)
    row.update(status=status, error=error, wall_s=round(time.monotonic() - started, 2),
               finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return row


def add_loss_run(cell: Cell, cell_dir: Path, context: Context, row: dict[str, Any]
                 ) -> tuple[str, str | None]:
    """Train on real data for the cell's token budget; record the loss reached and its cost."""
    steps_needed = math.ceil(cell.settings.loss_budget_tokens / tokens_per_step(cell))
    run, steps, events = run_engine(cell, cell_dir, "loss", steps_needed, context.launcher,
                                    data_path=cell.settings.data_path)
    status, error = outcome(run, cell, events)
    if status != "ok":
        return status, f"loss run: {error}"
    try:
        loss = measure_loss(steps, events, cell, steps_needed)
    except (ElmError, KeyError, TypeError, ValueError) as problem:
        return "failed", f"loss run: unreadable metrics: {problem!r}"
    per_token = (loss.initial - loss.reached) / loss.tokens
    row.update(loss_tokens=loss.tokens, loss_initial=loss.initial, loss_reached=loss.reached,
               loss_valid=loss.valid, loss_per_token=per_token, loss_curve=loss.curve,
               loss_per_dollar=cost.loss_per_dollar(per_token, row["tokens_per_s"],
                                                    row["price_per_hour"]),
               loss_cost=cost.cost_of_tokens(loss.tokens, row["tokens_per_s"],
                                             row["price_per_hour"]))
    return "ok", None


# ----- a sweep --------------------------------------------------------------------------------

def run_sweep(grid: Grid, out_dir: Path, context: Context, only: Sequence[int] | None = None,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every cell not yet finished in `out_dir` (or only the cells at the given indices),
    appending each row to the results as it ends. Returns the rows run now."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir.mkdir(parents=True, exist_ok=True)
    store = ResultsStore(out_dir)
    finished = store.finished_keys()
    indices = range(len(grid.cells)) if only is None else only
    for index in indices:
        if not 0 <= index < len(grid.cells):
            raise ElmError(f"{grid.source}: no cell {index}; the grid has {len(grid.cells)}")
    cells = [grid.cells[i] for i in indices]
    todo = [c for c in cells if context.key(c) not in finished]
    if len(todo) < len(cells):
        echo(f"skipping {len(cells) - len(todo)} finished cell(s) recorded in {store.jsonl}")
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("bench", total=len(todo))
        for cell in todo:
            progress.update(task, description=cell.describe())
            row = run_cell(cell, out_dir / "cells" / context.device_type / cell.slug, context)
            store.append(row)
            rows.append(row)
            progress.console.print(summary_line(row), markup=False, highlight=False,
                                   soft_wrap=True)
            progress.advance(task)
    return rows


def summary_line(row: dict[str, Any]) -> str:
    name = (f"{row['model']} batch {row['batch_size']} {row['attention']} {row['strategy']} "
            f"{row['nodes']}x{row['gpus']}")
    if row["status"] != "ok":
        return f"{name}: {row['status']}: {row['error']}"
    text = (f"{name}: {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['tokens_per_dollar']:,.0f} tokens/$ ({row['price_unit']} prices)")
    if row.get("loss_reached") is not None:
        text += f", loss {row['loss_reached']:.3f} after {row['loss_tokens']:,} tokens"
    return text
