"""Preemption and failure: real processes killed, resumed, stopped; checkpoints stay loadable."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from support.cli import run_elm
from support.training import (
    final_weights,
    start_train,
    step_records,
    train_in_process,
    wait_for,
    write_config,
)

from elm_train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


def test_sigkill_then_resume_is_bitwise_exact(token_data: Path, tmp_path: Path) -> None:
    sections = {"train": {"max_steps": 20, "seq_len": 64, "micro_batch_size": 8}}
    # The straight run saves blocking, the killed one asynchronously: resuming from an
    # asynchronous checkpoint must give the blocking run's weights bit for bit.
    straight = write_config(tmp_path / "straight.yaml", token_data, tmp_path / "straight-run",
                            checkpoint={"dir": str(tmp_path / "straight-ckpt"),
                                        "async_save": False}, **sections)
    # Every run is a fresh process alike, so that the same kernels run in each.
    straight_process = start_train(straight)

    killed_ckpt = tmp_path / "killed-ckpt"
    killed = write_config(tmp_path / "killed.yaml", token_data, tmp_path / "killed-run",
                          checkpoint={"dir": str(killed_ckpt), "every": 10, "async_save": True},
                          **sections)
    process = start_train(killed)
    wait_for(lambda: (killed_ckpt / "step-10").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert [step for step, _ in complete_checkpoints(killed_ckpt)] == [10]

    resumed_process = start_train(killed)
    _, stderr = resumed_process.communicate(timeout=300)
    assert resumed_process.returncode == 0, stderr
    _, stderr = straight_process.communicate(timeout=300)
    assert straight_process.returncode == 0, stderr
    ours, theirs = final_weights(killed_ckpt), final_weights(tmp_path / "straight-ckpt")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    # The resumed run logged steps 11..20 with the straight run's losses, bit for bit.
    resumed = {r["step"]: r["loss"] for r in step_records(tmp_path / "killed-run")}
    reference = {r["step"]: r["loss"] for r in step_records(tmp_path / "straight-run")}
    assert all(resumed[step] == reference[step] for step in range(11, 21))


@pytest.mark.parametrize("async_save", [False, True])
def test_kill_during_checkpoint_write_leaves_previous_loadable(token_data: Path, tmp_path: Path,
                                                              async_save: bool) -> None:
    checkpoints = tmp_path / "ckpt"
    # A 32000-row embedding makes each checkpoint write long enough to be caught mid-way.
    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run",
                          model={"preset": "elm-tiny", "vocab_size": 32000},
                          train={"max_steps": 1000, "seq_len": 16, "micro_batch_size": 1},
                          checkpoint={"dir": str(checkpoints), "every": 2, "keep": 2,
                                      "async_save": async_save})

    def writing_after_a_complete_one() -> bool:
        return bool(complete_checkpoints(checkpoints)) and any(checkpoints.glob("step-*.tmp"))

    process = start_train(config)
    wait_for(writing_after_a_complete_one, process, interval=0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    partial = sorted(checkpoints.glob("step-*.tmp"))
    assert partial, "the kill landed after the write finished"
    assert not (partial[0] / "trainer.json").exists()
    previous_step, previous = complete_checkpoints(checkpoints)[-1]
    weights = final_weights(checkpoints)
    assert weights["transformer.token_embeddings.weight"].shape == (32000, 64)

    result = train_in_process(config, f"train.max_steps={previous_step + 2}")
    assert result.step == previous_step + 2
    assert not any(checkpoints.glob("step-*.tmp"))
    assert complete_checkpoints(checkpoints)[-1][0] == previous_step + 2
    assert previous.name == f"step-{previous_step}"


def test_sigterm_saves_and_exits_cleanly(token_data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", token_data, run_dir,
                          train={"max_steps": 100000},
                          checkpoint={"dir": str(checkpoints), "every": 0})
    process = start_train(config)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, process,
             interval=0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by signal" in stdout
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["stopped_by_signal"] is True
    last_logged = step_records(run_dir)[-1]["step"]
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [last_logged]
    assert final_weights(checkpoints)["transformer.norm.weight"].shape == (64,)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(token_data: Path,
                                                               tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run",
                          optim={"lr": 1e30, "warmup_steps": 0},
                          checkpoint={"dir": str(checkpoints), "every": 1})
    result = run_elm("train", str(config), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: step ") and "not finite" in message
    failed_step = int(message.split()[2].rstrip(":"))
    saved = [step for step, _ in complete_checkpoints(checkpoints)]
    assert saved and saved[-1] == failed_step - 1
    assert f"step-{failed_step - 1}" in message
    assert final_weights(checkpoints).keys()  # the last checkpoint still loads


def test_config_typo_is_named(token_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run")
    result = run_elm("train", str(config), "optim.lrr=1e-3")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {config}: unknown key 'optim.lrr'"
    (tmp_path / "typo.yaml").write_text(config.read_text().replace("warmup_steps", "warmup_step"))
    result = run_elm("train", str(tmp_path / "typo.yaml"))
    assert result.returncode == 1
    assert "unknown key 'optim.warmup_step'" in result.stderr


def test_empty_data_dir_is_named(token_data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path / "config.yaml", empty, tmp_path / "run")
    result = run_elm("train", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {empty}: no prepared token data (index.json missing; write it with "
        "`elm data prepare`)")


def test_out_of_memory_is_logged_with_exit_code_3(token_data: Path, tmp_path: Path) -> None:
    # A 2-billion-row embedding cannot be allocated on any machine that runs these tests.
    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run",
                          model={"preset": "elm-tiny", "vocab_size": 2_000_000_000})
    result = run_elm("train", str(config), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: out of memory: ")
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "oom" and "allocate" in last["message"]
