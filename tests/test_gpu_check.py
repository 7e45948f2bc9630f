"""benchmarks/gpu_check.sh cannot rot: its dry run on the CPU goes through every cell's code path
(a tiny model, two steps), writes its results under $OUT, and the budget and time boxes hold."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import REPO

from elm_spec.names import AC_MODES


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_scripts_install_nothing() -> None:
    for name in ("gpu_check.sh", "gpu_check.py"):
        text = (REPO / "benchmarks" / name).read_text()
        assert "pip " not in text and "pip3" not in text and "install " not in text.replace(
            "Installs nothing", "").replace("not installed", ""), name


def test_a_spent_budget_skips_cells_and_a_time_box_kills_its_process(tmp_path: Path) -> None:
    gpu_check = gpu_check_module()
    args = gpu_check.argparse.Namespace(dry_run=True, out=tmp_path, budget=0)
    plan = gpu_check.build_plan(args)
    listed = gpu_check.run_all(plan)
    assert listed and all(c.outcome["status"].startswith("skipped: budget spent") for c in listed)
    report = gpu_check.write_report(plan, listed).read_text()
    assert report.count("skipped: budget spent") == len(listed)

    started = time.monotonic()
    code, _, _ = gpu_check.run_process([sys.executable, "-c", "import time; time.sleep(60)"], 1,
                                       tmp_path / "sleeper")
    assert code is None and time.monotonic() - started < 20


@pytest.mark.slow
def test_dry_run_exercises_every_cell(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(REPO / "benchmarks/gpu_check.sh"), "--dry-run"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("env.txt", "gpu_check.md", "results.json", "gpu_check.log", "parity/losses.json",
                 "bench/results.jsonl"):
        assert (out / name).is_file(), name
    cells = json.loads((out / "results.json").read_text())
    train = [c for c in cells if c["section"] == "train"]
    ran = {(c["attention"], c["compile"], c["ac"], c["float8"]): c for c in train}
    for key in [("sdpa", False, "none", "none"), ("eager", False, "none", "none"),
                ("sdpa", True, "none", "none"),
                *(("sdpa", False, mode, "none") for mode in AC_MODES if mode != "none")]:
        cell = ran[key]
        assert cell["status"] == "ok", cell
        assert cell["tokens_per_s"] > 0 and cell["step_time_s"] > 0 and cell["mfu"] > 0
        assert (out / "runs" / gpu_check_module().slug(cell["label"]) / "metrics.jsonl").is_file()
    assert ran[("flash", False, "none", "none")]["status"].startswith("not installed")
    float8 = ran[("sdpa", False, "none", "tensorwise")]["status"]
    assert float8.startswith("refused: error: train.float8"), float8
    probes = [c for c in cells if c["section"] == "batch"]
    assert probes and all(c["status"] == "ok" and c["largest_micro_batch"] == 4 for c in probes)
    (parity,) = [c for c in cells if c["section"] == "parity"]
    assert parity["status"] == "ok" and parity["max_relative_difference"]["ddp"] <= parity["tolerance"]
    (bench,) = [c for c in cells if c["section"] == "bench"]
    assert bench["status"] == "ok" and len(bench["cells"]) == 4
    assert all(c["status"] == "ok" for c in bench["cells"])
    assert "skipped" not in (out / "gpu_check.md").read_text()
