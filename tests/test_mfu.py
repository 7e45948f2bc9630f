"""MFU's peak: the GPU table read from real CUDA device names, an unknown GPU left unknown with
one line, and `elm train --peak-flops` reaching the logged MFU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.cli import run_elm
from support.training import write_config

from elm_spec import ModelSpec
from elm_train import metrics

# torch.cuda.get_device_name() strings as the driver reports them, with the data-sheet peaks.
KNOWN = [
    ("NVIDIA A100-SXM4-40GB", 312e12, None),
    ("NVIDIA A100-SXM4-80GB", 312e12, None),
    ("NVIDIA A100-PCIE-40GB", 312e12, None),
    ("NVIDIA A100 80GB PCIe", 312e12, None),
    ("NVIDIA H100 80GB HBM3", 989e12, 1979e12),
    ("NVIDIA H100 PCIe", 756e12, 1513e12),
    ("NVIDIA H100 NVL", 835e12, 1671e12),
    ("NVIDIA H200", 989e12, 1979e12),
    ("NVIDIA H200 NVL", 835e12, 1671e12),
    ("NVIDIA L40S", 362e12, 733e12),
    ("NVIDIA B200", 2.25e15, 4.5e15),
]
# Names that contain a listed GPU's name but are another GPU.
UNKNOWN = ["NVIDIA GH200 480GB", "NVIDIA GB200", "NVIDIA H800", "NVIDIA L40", "NVIDIA A10",
           "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB"]


@pytest.mark.parametrize(("name", "bf16", "fp8"), KNOWN)
def test_each_listed_gpu_gets_its_own_dense_peaks(name: str, bf16: float, fp8: float | None) -> None:
    assert metrics.gpu_peak_flops(name) == bf16
    assert metrics.gpu_peak_flops(name, "fp8") == fp8


@pytest.mark.parametrize("name", UNKNOWN)
def test_an_unlisted_gpu_gets_no_peak(name: str) -> None:
    assert metrics.gpu_peak(name) is None


def test_unknown_gpu_mfu_is_unknown_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800")
    cuda = torch.device("cuda", 0)
    assert metrics.peak_flops(cuda, torch.bfloat16, warn=True) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'NVIDIA H800'" in lines[0] and "--peak-flops" in lines[0], lines
    assert metrics.mfu(1e9, 1e4, None) is None
    # A configured peak wins over the table and over an unknown name, silently.
    assert metrics.peak_flops(cuda, torch.bfloat16, configured=5e14, warn=True) == 5e14
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_flops(cuda, torch.bfloat16, warn=True) == 756e12
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_peak_flops_flag_sets_the_mfu_denominator(token_data: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", token_data, tmp_path / "run",
                          train={"max_steps": 2, "eval_batches": 1})
    result = run_elm("train", str(config), "--peak-flops", "2.5e12", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "event" not in r)
    flops = ModelSpec.from_preset("elm-tiny").flops_per_token(32)
    assert step["mfu"] == pytest.approx(flops * step["tokens_per_s_per_device"] / 2.5e12, rel=1e-9)
    bad = run_elm("train", str(config), "--peak-flops", "-1")
    assert bad.returncode != 0 and "--peak-flops" in bad.stderr
