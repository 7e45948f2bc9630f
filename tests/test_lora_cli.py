"""`elm finetune --lora` and `elm fuse` as a user runs them: exact resume after SIGKILL,
fused and exported models in both twins, and one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from rich.console import Console
from support.cli import REPO, run_elm
from support.lora import make_quantized_model_dir, text_rows, write_jsonl

from elm_mlx.lora.config import build_config
from elm_mlx.lora.fuse import fuse
from elm_mlx.lora.train import finetune, prepare_output
from elm_spec import ElmError

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

IDS = [[1, 40, 300, 269, 285, 419, 461, 2, 77, 5, 6, 100]]


def finetune_args(model: Path, data: Path, adapters: Path) -> list[str]:
    return ["finetune", "--lora", "--model", str(model), "--data", str(data),
            "--adapter-path", str(adapters), "--iters", "40", "--batch-size", "4",
            "--learning-rate", "3e-3", "--warmup", "5", "--dropout", "0.1", "--rank", "4",
            "--grad-accumulation-steps", "2", "--save-every", "10", "--steps-per-eval", "40",
            "--steps-per-report", "10", "--max-seq-length", "64", "--seed", "7"]


@pytest.fixture(scope="module")
def setup(make_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    write_jsonl(root / "data" / "train.jsonl", text_rows(96, seed=4))
    write_jsonl(root / "data" / "valid.jsonl", text_rows(8, seed=5))
    return {"root": root, "model": make_model_dir(seed=21), "data": root / "data"}


@pytest.fixture(scope="module")
def resumed_run(setup) -> dict[str, Path]:
    """An uninterrupted run, and a run SIGKILLed after its first checkpoint, then resumed."""
    root, model, data = setup["root"], setup["model"], setup["data"]
    killed = root / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(adapters: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "apps", *finetune_args(model, data, adapters)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    victim, whole = start(killed), start(root / "whole")
    deadline = time.monotonic() + 300
    while not any((killed / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
        assert victim.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert whole.wait() == 0, whole.stderr.read()
    resumed = run_elm(*finetune_args(model, data, killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return {"whole": root / "whole", "killed": killed, "resume_log": resumed.stdout}


def test_sigkilled_run_resumes_to_the_same_adapters(resumed_run):
    log = resumed_run["resume_log"]
    step = int(log.split("(step ")[1].split(")")[0])
    assert 0 < step < 40, log
    # Piped into a log, report lines stay whole (rich would break them at 80 columns).
    reports = [line for line in log.splitlines() if ": train loss " in line]
    assert reports and all(re.fullmatch(r"step \d+: train loss .*, peak memory [\d.]+ GB", line)
                           for line in reports), log
    assert re.search(r"^lora on .* trainable parameters .*; packing o(n|ff)$", log, re.M), log
    whole = mx.load(str(resumed_run["whole"] / "adapters.safetensors"))
    resumed = mx.load(str(resumed_run["killed"] / "adapters.safetensors"))
    assert sorted(whole) == sorted(resumed)
    for name, value in whole.items():
        np.testing.assert_allclose(np.array(resumed[name]), np.array(value), atol=1e-7, rtol=0,
                                   err_msg=name)
    assert float(mx.abs(whole["transformer.layers.0.attn.qkv_proj.lora_b"]).max()) > 0


def test_fused_export_matches_in_pytorch_and_mlx(setup, resumed_run):
    import torch

    import elm_mlx
    from elm_train import load_model

    exported = setup["root"] / "exported"
    result = run_elm("fuse", "--model", str(setup["model"]), "--adapter-path",
                     str(resumed_run["whole"]), "--save-path", str(exported), "--export")
    assert result.returncode == 0, result.stderr
    with_adapters, _ = elm_mlx.load(setup["model"], adapter_path=resumed_run["whole"])
    expected = np.array(with_adapters(mx.array(IDS)))
    fused, _ = elm_mlx.load(exported)
    np.testing.assert_allclose(np.array(fused(mx.array(IDS))), expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch_logits = load_model(exported)(torch.tensor(IDS)).numpy()
    np.testing.assert_allclose(torch_logits, expected, atol=1e-4, rtol=0)


def test_qlora_fuse_requantizes_or_dequantizes(setup, tmp_path):
    import elm_mlx
    from elm_spec.modeldir import read_config

    quantized = make_quantized_model_dir(setup["model"], tmp_path / "q")
    adapters = tmp_path / "adapters"
    finetune(build_config(None, dict(model=str(quantized), data=str(setup["data"]),
                                     adapter_path=str(adapters), iters=4, learning_rate=1e-2,
                                     max_seq_length=64)), Console(file=io.StringIO()))
    qlora, _ = elm_mlx.load(quantized, adapter_path=adapters)
    expected = np.array(qlora(mx.array(IDS)))
    dequantized = fuse(quantized, adapters, tmp_path / "dequantized", dequantize=True)
    assert "quantization" not in read_config(dequantized)
    np.testing.assert_allclose(np.array(elm_mlx.load(dequantized)[0](mx.array(IDS))), expected,
                               atol=1e-4, rtol=0)
    requantized = fuse(quantized, adapters, tmp_path / "requantized")
    assert read_config(requantized)["quantization"] == {"group_size": 32, "bits": 4}
    logits = np.array(elm_mlx.load(requantized)[0](mx.array(IDS)))
    assert np.isfinite(logits).all() and logits.shape == expected.shape


def test_errors_are_one_line(setup, make_model_dir, resumed_run, tmp_path):
    # --lora is accepted (mlx_lm.lora's spelling) but not needed
    missing = run_elm("finetune", "--model", str(setup["model"]), "--data",
                      str(tmp_path), "--adapter-path", str(tmp_path / "a"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no train.jsonl (a data directory needs train.jsonl; "
        "valid.jsonl and test.jsonl are optional)"]
    from elm_spec import ModelSpec

    other = make_model_dir(ModelSpec.from_preset("elm-tiny").replace(model_dim=96, head_dim=16))
    with pytest.raises(ElmError) as mismatch:
        fuse(other, resumed_run["whole"], tmp_path / "fused")
    assert "adapters do not fit this model" in str(mismatch.value) and "\n" not in str(mismatch.value)
    trained_on = json.loads((resumed_run["whole"] / "adapter_config.json").read_text())["model"]
    assert f"they were fine-tuned on {trained_on}: pass --model {trained_on}" in str(mismatch.value)
    assert re.search(r"transformer\.layers\.\d+\.\w+\.\w+\.lora_[ab]: adapter shape \(\d+, \d+\) "
                     r"does not match model parameter shape", str(mismatch.value))
    assert not (tmp_path / "fused").exists()
    with pytest.raises(ElmError, match=r"whole: already holds adapters; pass --resume"):
        prepare_output(resumed_run["whole"], resume=False)
