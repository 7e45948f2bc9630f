"""Asynchronous checkpoints (checkpoint.async_save): the step goes on while the shards are
written, and what is committed is exactly what a blocking save writes (in-process)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from support.training import train_in_process, write_config
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from elm_train.checkpoint import check_intact, complete_checkpoints, load_model_state
from elm_train.config import load_config
from elm_train.metrics import MetricsLog
from elm_train.tasks.lm import LanguageModelTask

pytestmark = pytest.mark.slow  # whole training runs


def checkpoint_contents(step_dir: Path) -> tuple[dict, bytes, bytes]:
    check_intact(step_dir)
    task = LanguageModelTask.for_export(load_config(step_dir / "train_config.yaml"), step_dir)
    return (load_model_state(step_dir, task.build_model()), (step_dir / "trainer.json").read_bytes(),
            (step_dir / "rank-00000.pt").read_bytes())


def test_async_checkpoints_and_their_resume_equal_blocking_ones(token_data: Path,
                                                                tmp_path: Path) -> None:
    def config(name: str, async_save: bool) -> Path:
        return write_config(tmp_path / f"{name}.yaml", token_data, tmp_path / name / "run",
                            train={"max_steps": 6},
                            checkpoint={"dir": str(tmp_path / name / "ckpt"), "every": 2,
                                        "keep": 10, "async_save": async_save})

    def assert_same(step_dir: Path, reference: Path) -> None:
        weights, trainer, rng = checkpoint_contents(step_dir)
        expected_weights, expected_trainer, expected_rng = checkpoint_contents(reference)
        assert trainer == expected_trainer and rng == expected_rng, step_dir
        assert weights.keys() == expected_weights.keys()
        for name, tensor in expected_weights.items():
            assert torch.equal(weights[name], tensor), (step_dir, name)

    assert train_in_process(config("blocking", False)).step == 6
    asynchronous = config("async", True)
    result = train_in_process(asynchronous)
    ours, theirs = (complete_checkpoints(tmp_path / name / "ckpt") for name in ("async", "blocking"))
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [2, 4, 6]
    assert result.checkpoint == ours[-1][1]  # committed before the run returned
    assert not list((tmp_path / "async" / "ckpt").glob("*.tmp"))
    for (_, mine), (_, reference) in zip(ours, theirs, strict=True):
        assert_same(mine, reference)
    # Resumed from the asynchronous step-4 checkpoint, the run writes step 6 again, bit for bit.
    shutil.rmtree(ours[-1][1])
    assert train_in_process(asynchronous).step == 6
    assert_same(ours[-1][1], theirs[-1][1])

def test_training_goes_on_while_a_checkpoint_is_written(token_data: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """The shard writer of the step-2 checkpoint waits until step 3 has been logged: only a
    save that does not block the step lets it through (a blocking one waits out the timeout)."""
    write_data = FileSystemWriter.write_data
    logged = MetricsLog.write
    step_3_logged = threading.Event()
    waited_out: list[bool] = []

    def slow_write(self, plan, planner):
        if "step-2.tmp" in str(self.path):
            waited_out.append(not step_3_logged.wait(timeout=5))
        return write_data(self, plan, planner)

    def log(self, record):
        logged(self, record)
        if record.get("step") == 3 and "loss" in record:
            step_3_logged.set()

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(MetricsLog, "write", log)
    for async_save in (True, False):
        step_3_logged.clear()
        name = "async" if async_save else "blocking"
        config = write_config(tmp_path / f"{name}.yaml", token_data, tmp_path / name / "run",
                              train={"max_steps": 4},
                              checkpoint={"dir": str(tmp_path / name / "ckpt"), "every": 2,
                                          "async_save": async_save})
        assert train_in_process(config).step == 4
        assert [s for s, _ in complete_checkpoints(tmp_path / name / "ckpt")] == [2, 4]
    assert waited_out == [False, True]
