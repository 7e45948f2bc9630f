"""Two gloo processes (torchrun) train exactly as one process at the same global batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support.training import (
    final_weights,
    losses,
    run_under_torchrun,
    train_in_process,
    write_config,
)

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "hsdp")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> Path:
    root = tmp_path_factory.mktemp("single")
    config = write_config(root / "config.yaml", token_data, root / "run",
                          checkpoint={"dir": str(root / "ckpt")})
    train_in_process(config)
    return root


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> Path:
    """One torchrun launch training with each strategy in turn (2 processes x 2 sequences)."""
    root = tmp_path_factory.mktemp("two")
    for strategy in STRATEGIES:
        write_config(root / f"{strategy}.yaml", token_data, root / strategy / "run",
                     train={"micro_batch_size": 2},
                     # hsdp: 2 replicas of 1 shard, the other axis of the mesh from fsdp's.
                     parallel={"strategy": strategy,
                               "replicate_degree": 2 if strategy == "hsdp" else None},
                     # fsdp saves asynchronously (its own gloo group, DTensor shards staged)
                     checkpoint={"dir": str(root / strategy / "ckpt"), "every": 5,
                                 "async_save": strategy == "fsdp"})
    script = (
        "from elm_train.config import load_config\n"
        "from elm_train.trainer import train\n"
        "import torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        f"for strategy in {STRATEGIES!r}:\n"
        f"    train(load_config({str(root)!r} + f'/{{strategy}}.yaml'))\n"
        "dist.destroy_process_group()\n")
    result = run_under_torchrun(script, root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_match_one(strategy: str, single_process_run: Path,
                                 two_process_runs: Path) -> None:
    reference = losses(single_process_run / "run")
    trajectory = losses(two_process_runs / strategy / "run")
    assert len(reference) == len(trajectory) == 10
    for ours, theirs in zip(trajectory, reference, strict=True):
        assert abs(ours - theirs) / abs(theirs) <= 1e-5
    assert reference[-1] < reference[0]  # it does learn
    # The checkpoint written by two processes holds the weights one process reached.
    ours = final_weights(two_process_runs / strategy / "ckpt")
    theirs = final_weights(single_process_run / "ckpt")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


def test_checkpoint_from_two_processes_resumes_in_one(single_process_run: Path,
                                                      two_process_runs: Path, token_data: Path,
                                                      tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(two_process_runs / "fsdp" / "ckpt" / "step-5", checkpoints / "step-5")
    config = write_config(tmp_path / "config.yaml", token_data, tmp_path / "run",
                          checkpoint={"dir": str(checkpoints)})
    result = train_in_process(config)
    assert result.step == 10
    trajectory = losses(tmp_path / "run")
    reference = losses(single_process_run / "run")[5:]
    assert len(trajectory) == 5
    for ours, theirs in zip(trajectory, reference, strict=True):
        assert abs(ours - theirs) / abs(theirs) <= 1e-5
