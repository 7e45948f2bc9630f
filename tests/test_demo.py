"""`elm demo`, shortened: every stage runs and the PyTorch and MLX twins agree on held-out loss."""

from __future__ import annotations

import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from support.cli import run_elm

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        shutil.copy(file, corpus)
    output = tmp_path / "demo"
    result = run_elm("demo", "--output", str(output), "--corpus", str(corpus), "--steps", "12",
                     "--max-tokens", "20", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = dict(re.findall(r"^(unigram entropy|held-out loss \(\w+\)).*: ([\d.]+)",
                              result.stdout, flags=re.M))
    torch_loss = float(numbers["held-out loss (PyTorch)"])
    mlx_loss = float(numbers["held-out loss (MLX)"])
    assert abs(torch_loss - mlx_loss) <= 2e-3  # printed to 3 decimals

    # The entropy printed is that of the train split's token counts, computed independently here.
    from elm_train.data.format import read_index

    data = read_index(output / "data")
    tokens = np.concatenate([np.fromfile(s.path, dtype=data.dtype) for s in data.shards("train")])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    assert abs(float(numbers["unigram entropy"]) + float((p * np.log(p)).sum())) < 1e-3

    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.model",
                 "curves.png", "run/metrics.jsonl"):
        assert (output / name).is_file(), name
        assert str(output / name.split("/")[0]) in result.stdout
    from elm_train import load_model

    model = load_model(output / "model")
    assert model(torch.tensor([[1, 5, 9]])).shape == (1, 3, 1024)
    sample = result.stdout.split("sample (MLX, mlx-lm stream_generate):\n", 1)[1]
    assert sample.startswith("def") and len(sample.split("\n\n")[0]) > len("def")
    # Piped, the progress lines carry the time left.
    assert re.search(r"^step 10/12 loss \d+\.\d{4} .* eta \d:\d\d:\d\d$", result.stdout, re.M)

    # Nothing printed or recorded names the staging directory the demo was built in, so the
    # recorded config trains on: it resumes the demo's run from its last checkpoint.
    assert ".tmp-" not in result.stdout + result.stderr
    for name in ("run/train_config.yaml", "run/metrics.jsonl",
                 "checkpoints/step-12/train_config.yaml"):
        assert ".tmp-" not in (output / name).read_text(), name
    more = run_elm("train", str(output / "run" / "train_config.yaml"), "train.max_steps=14",
                   env={"OMP_NUM_THREADS": "1"})
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resumed from {output / 'checkpoints'}" in more.stdout
    assert "step 14: loss" in more.stdout and (output / "checkpoints/step-14").is_dir()
