"""The step loop reads no device value on steps that neither log, evaluate nor save."""

from __future__ import annotations

import json
from pathlib import Path

from support.training import train_in_process, write_config

from elm_train.syncs import HostSyncCounter


def test_no_host_sync_between_log_and_eval_steps(token_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", token_data, tmp_path / "run",
                          train={"max_steps": 12, "eval_every": 3, "eval_batches": 1,
                                 "micro_batch_size": 2, "grad_accum_steps": 2},
                          log={"every": 4, "progress": False, "peak_flops": 1e11})
    with HostSyncCounter() as counter:
        train_in_process(config)
    # per_step[k] counts the syncs after optimizer step k: its logging, then step k+1's work.
    busy_steps = {3, 4, 6, 8, 9}  # eval at 3, 6, 9; log at 4, 8; step 12 ends the run
    for step in range(1, 12):
        if step in busy_steps:
            assert counter.per_step[step] > 0, f"step {step} should have read its metrics"
        else:
            assert counter.per_step[step] == 0, f"step {step}: {counter.per_step[step]} host syncs"

    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "event" not in r]
    assert [r["step"] for r in logged] == [4, 8, 12]
    # Throughput covers the whole window since the previous log (4 steps of 2 x 2 x 32 tokens).
    assert [r["steps_timed"] for r in logged] == [4, 4, 4]
    for r in logged:
        assert abs(r["tokens_per_s_per_device"] * r["step_time_s"] * 4 - 4 * 128) < 1e-6 * 512
    evals = [r["step"] for r in records if r.get("valid_loss") is not None and r.get("event") != "end"]
    assert evals == [3, 6, 9, 12]
