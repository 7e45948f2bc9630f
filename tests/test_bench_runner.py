"""`elm bench run` on the CPU through the real engine: one process, two processes (gloo), an
out-of-memory cell under a memory cap, a fixed-token-budget loss run, a resumed sweep, SLURM
scripts, and agreement with `elm train`'s own logged throughput."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from support.cli import REPO, run_elm

from elm_train.bench.grid import load_grid
from elm_train.bench.slurm import write_slurm
from elm_train.data.format import Shard, shard_name, write_index

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

# The test machine's cores are shared: one thread per process keeps step times steady (and is
# what torchrun gives each of several processes anyway).
ENV = {"OMP_NUM_THREADS": "1"}
TOKENS_PER_STEP = 8 * 64
BASE = {"models": "elm-tiny", "batch_sizes": 8, "seq_len": 64, "dtype": "float32",
        "warmup_steps": 3, "repeats": 3, "steps_per_repeat": 10}


def write_token_data(directory: Path, vocab: int = 512) -> Path:
    """Prepared token data with an easy rule (next = 5 * previous + 1 mod vocab) to learn."""
    directory.mkdir(parents=True)
    splits = {}
    for split, count in (("train", 24_000), ("valid", 4_000)):
        tokens = np.empty(count, dtype=np.uint16)
        tokens[0] = 3
        for i in range(1, count):
            tokens[i] = (5 * int(tokens[i - 1]) + 1) % vocab
        path = directory / shard_name(split, 0)
        tokens.tofile(path)
        splits[split] = [Shard(path, count)]
    write_index(directory, np.dtype(np.uint16), vocab, 2, splits, {})
    return directory


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell_dir(out: Path, row: dict) -> Path:
    [directory] = [d for d in (out / "cells" / "cpu").iterdir()
                   if d.name.startswith(f"elm-tiny_b{row['batch_size']}_sdpa_{row['strategy']}_")]
    return directory


def wait_for_file(directory: Path, pattern: str, process: subprocess.Popen, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern)) if directory.is_dir() else []
        if found:
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended before {pattern} appeared: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"{pattern} did not appear in {timeout} s")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bench")
    data = write_token_data(root / "data")
    grid = {**BASE, "sweeps": [
        {"strategies": "ddp", "warmup_steps": 5, "steps_per_repeat": 20,
         "loss_budget_tokens": 16 * TOKENS_PER_STEP, "data_path": str(data), "lr": 0.01},
        # 100000 x 32 tokens need far more than a 3 GB address space: out of memory.
        {"strategies": "ddp", "batch_sizes": 100_000, "seq_len": 32, "memory_limit_gb": 3},
        {"strategies": "fsdp", "gpus": 2},
    ]}
    grid_path = root / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    out = root / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), **ENV}
    # While the first cell runs, run its configuration directly with `elm train` the same way
    # (torchrun, one process), both on the same core, so that whatever else loads this shared
    # machine slows both alike.
    cpu = min(os.sched_getaffinity(0))
    def one_core() -> None:
        os.sched_setaffinity(0, {cpu})

    bench = subprocess.Popen([sys.executable, "-m", "apps", "bench", "run", "--grid", str(grid_path),
                              "--out", str(out), "--max-cpu-processes", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=one_core)
    try:
        launched = wait_for_file(out / "cells" / "cpu", "elm-tiny_b8_sdpa_ddp_1x1_*/throughput-launcher.log",
                                 bench, timeout=300)
        direct_dir = root / "direct"
        direct = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "1", "-m", "apps", "train",
                                 str(launched.parent / "throughput.yaml"), f"log.run_dir={direct_dir}"],
                                capture_output=True, text=True, env=env, timeout=600,
                                preexec_fn=one_core)
        assert direct.returncode == 0, direct.stderr
        os.sched_setaffinity(bench.pid, os.sched_getaffinity(0))  # the later cells get every core
        stdout, stderr = bench.communicate(timeout=900)
        assert bench.returncode == 0, stderr
    finally:
        if bench.poll() is None:
            bench.kill()
    rows = read_jsonl(out / "results.jsonl")
    by_kind = {("oom" if r["batch_size"] == 100_000 else r["strategy"]): r for r in rows}
    return SimpleNamespace(root=root, grid=grid, grid_path=grid_path, out=out, stdout=stdout,
                           rows=rows, by_kind=by_kind, direct_dir=direct_dir,
                           cell_run_dir=launched.parent / "throughput")


def test_sweep_records_every_cell(sweep: SimpleNamespace) -> None:
    assert len(sweep.rows) == 3
    one, two, oom = sweep.by_kind["ddp"], sweep.by_kind["fsdp"], sweep.by_kind["oom"]
    assert (one["status"], two["status"], oom["status"]) == ("ok", "ok", "oom")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["gpu_type"] == "cpu" and one["price_unit"] == "relative"
    for row in (one, two):
        assert row["tokens_per_s"] > 0 and row["step_time_s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / row["world_size"])
        assert len(row["tokens_per_s_repeats"]) == 3
    # Token/$ = tokens/s x 3600 / price per hour, in every measured row; OOM rows have none.
    for row in sweep.rows:
        if row["status"] == "ok":
            assert row["tokens_per_dollar"] == pytest.approx(
                row["tokens_per_s"] * 3600 / row["price_per_hour"], rel=1e-12)
            assert row["price_per_hour"] == pytest.approx(row["price_per_gpu_hour"] * row["world_size"])
        else:
            assert row["tokens_per_s"] is None and row["tokens_per_dollar"] is None
    with open(sweep.out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["status"] for r in table] == [r["status"] for r in sweep.rows]
    assert [float(r["tokens_per_dollar"] or 0) for r in table] == [
        r["tokens_per_dollar"] or 0 for r in sweep.rows]
    # The report is written at the end; DDP (1 process) vs FSDP (2) makes figure 3.
    report = (sweep.out / "report.md").read_text()
    assert "3 cells: 2 measured, 1 out of memory, 0 failed" in report
    assert "![DDP vs FSDP by number of GPUs](fig3_strategies.png)" in report
    pixels = np.asarray(Image.open(sweep.out / "fig3_strategies.png").convert("RGB")).astype(int)
    assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum() > 100  # the plotted points
    assert "FlashAttention vs vanilla attention: not drawn" in report


def test_throughput_is_the_mean_of_repeats_after_warmup(sweep: SimpleNamespace) -> None:
    for kind, warmup, per_repeat in (("ddp", 5, 20), ("fsdp", 3, 10)):
        row = sweep.by_kind[kind]
        records = read_jsonl(cell_dir(sweep.out, row) / "throughput" / "metrics.jsonl")
        steps = [r for r in records if "event" not in r]
        assert [r["step"] for r in steps] == list(range(1, warmup + 3 * per_repeat + 1))
        assert {r["world_size"] for r in steps} == {row["world_size"]}
        tokens = TOKENS_PER_STEP * row["world_size"]
        measured = steps[warmup:]
        repeats = [per_repeat * tokens / sum(r["step_time_s"] for r in
                                             measured[i * per_repeat:(i + 1) * per_repeat])
                   for i in range(3)]
        assert row["tokens_per_s_repeats"] == pytest.approx(repeats, rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(sum(repeats) / 3, rel=1e-9)
        assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in steps)
        # The engine's own tokens/s of a step is the same accounting.
        assert measured[0]["tokens_per_s"] == pytest.approx(tokens / measured[0]["step_time_s"])


def test_out_of_memory_cell_is_recorded_and_the_sweep_goes_on(sweep: SimpleNamespace) -> None:
    oom = sweep.by_kind["oom"]
    assert oom["status"] == "oom"
    assert "memory" in oom["error"].lower()
    # The sweep went on to the next cell.
    assert [r["status"] for r in sweep.rows] == ["ok", "oom", "ok"]


def test_engine_reports_out_of_memory_by_the_contract(sweep: SimpleNamespace) -> None:
    """A CPU allocation failure in a training step: {"event": "oom"} and exit code 3."""
    directory = cell_dir(sweep.out, sweep.by_kind["oom"])
    events = [r for r in read_jsonl(directory / "throughput" / "metrics.jsonl") if "event" in r]
    assert events and events[0]["event"] == "oom"
    assert "exitcode  : 3" in (directory / "throughput-launcher.log").read_text()


def test_loss_budget_measures_loss_per_dollar(sweep: SimpleNamespace) -> None:
    row = sweep.by_kind["ddp"]
    records = read_jsonl(cell_dir(sweep.out, row) / "loss" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 16 and row["loss_tokens"] == 16 * TOKENS_PER_STEP
    assert row["loss_initial"] == losses[0]
    assert row["loss_reached"] == pytest.approx(losses[-1])  # 16 steps: one step per point
    assert row["loss_curve"] == [[float(TOKENS_PER_STEP * (i + 1)), loss]
                                 for i, loss in enumerate(losses)]
    assert row["loss_reached"] < row["loss_initial"] - 0.5  # the rule in the data is learnable
    assert row["loss_valid"] == next(r for r in records if r.get("event") == "end")["valid_loss"]
    per_token = (row["loss_initial"] - row["loss_reached"]) / row["loss_tokens"]
    assert row["loss_per_token"] == pytest.approx(per_token)
    assert row["loss_per_dollar"] == pytest.approx(
        per_token * row["tokens_per_s"] * 3600 / row["price_per_hour"])
    assert row["loss_cost"] == pytest.approx(
        row["loss_tokens"] / row["tokens_per_s"] / 3600 * row["price_per_hour"])
    report = (sweep.out / "report.md").read_text()
    assert "## Loss per dollar (measured)" in report
    assert f"Cheapest configuration to reach loss {row['loss_reached']:.3f}" in report


def test_bench_agrees_with_elm_train_logged_throughput(sweep: SimpleNamespace) -> None:
    """The cell's figures recomputed from what its own `elm train` logged, and the same
    configuration run directly by `elm train` at the same time on the same core."""
    row = sweep.by_kind["ddp"]
    settings = sweep.grid["sweeps"][0]
    steps = [r for r in read_jsonl(sweep.cell_run_dir / "metrics.jsonl") if "event" not in r]
    measured = steps[settings["warmup_steps"]:]
    tokens_per_step = BASE["batch_sizes"] * BASE["seq_len"]  # one process
    size = settings["steps_per_repeat"]
    per_repeat = [tokens_per_step * size / sum(r["step_time_s"] for r in measured[i:i + size])
                  for i in range(0, len(measured), size)]
    assert row["tokens_per_s"] == pytest.approx(statistics.fmean(per_repeat), rel=1e-6)
    assert row["tokens_per_s_median"] == pytest.approx(
        statistics.median(tokens_per_step / r["step_time_s"] for r in measured), rel=1e-6)
    direct = [r for r in read_jsonl(sweep.direct_dir / "metrics.jsonl") if "event" not in r]
    assert len(direct) == len(steps) == 65
    # Two timed runs side by side on a machine other test processes share: the same ballpark.
    direct_median = statistics.median(r["tokens_per_s"] for r in direct[settings["warmup_steps"]:])
    assert 0.5 < row["tokens_per_s_median"] / direct_median < 2, (row, direct_median)


def test_rerun_skips_finished_cells_and_records_a_crash(sweep: SimpleNamespace) -> None:
    out = sweep.root / "resumed"
    shutil.copytree(sweep.out, out)
    before = {r["key"]: r["finished_at"] for r in sweep.rows}
    grid = {**sweep.grid, "sweeps": [*sweep.grid["sweeps"],
                                     {"strategies": "ddp", "train": {"train.no_such_key": 1}}]}
    grid_path = sweep.root / "grid-more.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    # The default subcommand: `elm bench --grid ...` is `elm bench run --grid ...`.
    result = run_elm("bench", "--grid", str(grid_path), "--out", str(out),
                     "--max-cpu-processes", "2", env=ENV)
    assert result.returncode == 0, result.stderr
    assert "skipping 3 finished cell(s)" in result.stdout and "1 cell(s)" not in result.stdout
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 4
    assert {r["key"]: r["finished_at"] for r in rows[:3]} == before
    crashed = rows[3]
    assert crashed["status"] == "failed"
    assert crashed["error"].startswith("error: ") and "no_such_key" in crashed["error"]
    assert len(list((out / "cells" / "cpu").iterdir())) == 4


def test_slurm_array_scripts(sweep: SimpleNamespace, tmp_path: Path) -> None:
    paper = load_grid(preset="paper")
    scripts = write_slurm(paper, tmp_path / "paper", 8, [], ["--partition=gpu"])
    assert [s.name for s in scripts] == ["bench-1-nodes.sbatch", "bench-2-nodes.sbatch",
                                         "bench-4-nodes.sbatch", "bench-8-nodes.sbatch",
                                         "report.sbatch", "submit.sh"]
    again = load_grid(tmp_path / "paper" / "grid.yaml")
    assert [c.key for c in again.cells] == [c.key for c in paper.cells]
    two_nodes = scripts[1].read_text()
    indices = [i for i, c in enumerate(paper.cells) if c.nodes == 2]
    assert f"#SBATCH --array={','.join(map(str, indices))}\n" in two_nodes
    assert "#SBATCH --nodes=2\n" in two_nodes and "#SBATCH --gpus-per-node=8\n" in two_nodes
    assert "#SBATCH --partition=gpu\n" in two_nodes
    assert '--launcher slurm --no-report --cell-index "$SLURM_ARRAY_TASK_ID"' in two_nodes
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # An array task on a one-machine "cluster": srun and scontrol stand-ins on PATH, the real
    # per-node torchrun with a c10d rendezvous, and the row appended to the shared results.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                'SLURM_NODEID=0 exec "$@"\n')
    (shims / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    out = sweep.root / "slurm-sweep"
    shutil.copytree(sweep.out, out)
    crash = {**sweep.grid, "sweeps": [*sweep.grid["sweeps"],
                                      {"strategies": "ddp", "train": {"train.no_such_key": 2}}]}
    crash_path = tmp_path / "crash.yaml"
    crash_path.write_text(yaml.safe_dump(crash))
    [array] = write_slurm(load_grid(crash_path), out, 2, [], [])[:1]
    assert "#SBATCH --array=0,1,2,3\n" in array.read_text()
    env = {**ENV, "PATH": f"{shims}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1]"}
    result = subprocess.run(["bash", str(array)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out / "results.jsonl")
    assert rows[:3] == sweep.rows and len(rows) == 4
    assert rows[3]["status"] == "failed" and "no_such_key" in rows[3]["error"]
    [node_logs] = (out / "cells" / "cpu").glob("*/throughput-logs/node0")
    assert list(node_logs.rglob("stderr.log"))
