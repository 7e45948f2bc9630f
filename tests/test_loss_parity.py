"""benchmarks/loss_parity.py: one process and ddp/fsdp/fsdp-grad-op/hsdp under torchrun (gloo)
train to the same losses; a divergence is named by strategy and step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import REPO
from support.training import THREAD_ENV, losses

SCRIPT = REPO / "benchmarks" / "loss_parity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("loss_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_strategy_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "parity"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--steps", "4"],
                            capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "loss parity: ddp, fsdp, fsdp-grad-op, hsdp agree with one process "
        "(4 steps, float32, 2 processes)")
    summary = json.loads((out / "losses.json").read_text())
    reference = losses(out / "none")
    assert summary["none"] == reference and len(reference) == 4
    for strategy in ("ddp", "fsdp", "fsdp-grad-op", "hsdp"):
        trajectory = losses(out / strategy)
        assert summary[strategy] == trajectory
        worst = max(abs(a - b) / b for a, b in zip(trajectory, reference, strict=True))
        assert worst == summary["max_relative_difference"][strategy] <= 1e-4
        lines = (out / strategy / "metrics.jsonl").read_text().splitlines()
        assert {json.loads(line).get("world_size") for line in lines} == {2}, strategy


def test_a_divergence_is_named_by_strategy_and_step() -> None:
    parity = load_script()
    reference = [6.0, 5.0, 4.0]
    worst, failure = parity.compare(reference, {"ddp": [6.0, 5.0, 4.0],
                                                "fsdp": [6.0, 5.001, 4.1]}, 1e-4)
    assert worst == {"ddp": 0.0, "fsdp": pytest.approx(0.025)}
    assert failure == ("fsdp step 2: loss 5.001000 differs from the single process's 5.000000 by "
                       "2.00e-04 (relative; tolerance 1e-04)")
    _, failure = parity.compare(reference, {"hsdp": [6.0]}, 1e-4)
    assert failure == "hsdp logged 1 steps, the single process 3"


def test_unknown_strategy_is_refused() -> None:
    parity = load_script()
    with pytest.raises(SystemExit):
        parity.parse_args(["--out", "x", "--strategies", "ddp,zero3"])


def test_synthetic_tokens_form_the_same_global_batch_on_any_process_count() -> None:
    import torch

    from elm_train.data.loader import SyntheticTokenLoader

    one = SyntheticTokenLoader(512, 16, 4, rank=0, seed=3)
    ranks = [SyntheticTokenLoader(512, 16, 2, rank=r, seed=3) for r in range(2)]
    for _ in range(3):
        together = next(one)["input_ids"]
        assert torch.equal(together, torch.cat([next(r)["input_ids"] for r in ranks]))
    assert not torch.equal(together[:2], together[2:])
