"""`elm convert` on the checkpoints a real `elm train` run writes, read in a fresh process."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from support.cli import run_elm
from support.training import train_in_process, write_config

from convert import ConvertOptions, convert
from elm_spec import ElmError
from elm_train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_training_checkpoint_matches_export(token_data: Path, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    config = write_config(tmp_path / "train.yaml", token_data, tmp_path / "run",
                          train={"max_steps": 4},
                          checkpoint={"dir": str(checkpoints), "every": 2})
    train_in_process(config)
    steps = complete_checkpoints(checkpoints)
    assert [step for step, _ in steps] == [2, 4]

    # A step directory, and the checkpoint directory itself (its newest complete step).
    converted = run_elm("convert", str(steps[-1][1]), str(tmp_path / "mlx"), "--verify")
    assert converted.returncode == 0, converted.stderr[-2000:]
    from_root = convert(checkpoints, tmp_path / "mlx-root", ConvertOptions(progress=False))
    assert from_root.lines[0].startswith(f"{steps[-1][1]}: elm training checkpoint")
    exported = run_elm("export", str(checkpoints), str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr[-2000:]

    from elm_mlx import load_model as load_mlx
    from elm_train import load_model as load_torch

    ids = np.random.default_rng(0).integers(0, 512, (2, 24))
    reference = load_torch(tmp_path / "model")(torch.from_numpy(ids)).detach().numpy()
    exported_mlx = np.array(load_mlx(tmp_path / "model")(mx.array(ids)))
    for directory in ("mlx", "mlx-root"):
        logits = np.array(load_mlx(tmp_path / directory)(mx.array(ids)))
        np.testing.assert_array_equal(logits, exported_mlx)
        np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)



def test_convert_checkpoint_dir_without_complete_step(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step-6.tmp").mkdir(parents=True)  # an interrupted write is never read
    with pytest.raises(ElmError) as error:
        convert(root, tmp_path / "mlx", ConvertOptions(progress=False))
    assert str(error.value) == (
        f"{root}: no complete checkpoint (expected step-N directories with trainer.json)")
    assert not (tmp_path / "mlx").exists()
