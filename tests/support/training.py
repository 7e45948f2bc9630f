"""Training runs for the tests: small configs, in-process and torchrun runs, what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .cli import REPO

# One thread per process: the tests run several processes on two cores.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]




def train_in_process(config: Path, *overrides: str):
    """`elm train CONFIG OVERRIDES` in this process (one torch thread while it runs)."""
    import torch

    from elm_train.config import load_config
    from elm_train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(config, list(overrides)))
    finally:
        torch.set_num_threads(threads)


def run_under_torchrun(script: str, directory: Path, timeout: float = 600
                       ) -> subprocess.CompletedProcess:
    """Run Python SCRIPT in 2 gloo processes launched by torchrun."""
    path = directory / "driver.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), **THREAD_ENV}
    return subprocess.run([*TORCHRUN, str(path)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def write_config(path: Path, data_dir: Path, run_dir: Path, **sections: dict) -> Path:
    """A small fp32 elm-tiny config; SECTIONS update its sections."""
    config = {
        "model": {"preset": "elm-tiny"},
        "data": {"path": str(data_dir)},
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "train": {"seq_len": 32, "micro_batch_size": 4, "max_steps": 10, "dtype": "float32",
                  "eval_batches": 2},
        "log": {"run_dir": str(run_dir), "progress": False, "peak_flops": 1e11},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def start_train(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **THREAD_ENV}
    return subprocess.Popen([sys.executable, "-m", "apps", "train", str(config), *overrides],
                            env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 240.0,
             interval: float = 0.002) -> None:
    """Poll CONDITION() until true; fail if the training PROCESS exits or TIMEOUT passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): "
                                 f"{process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the training process")
        time.sleep(interval)


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in step_records(run_dir)]


def final_weights(checkpoint_root: Path) -> dict:
    """The model tensors of the newest checkpoint, read back with DCP in this process."""
    from elm_train.checkpoint import load_model_state, resolve_checkpoint
    from elm_train.config import load_config
    from elm_train.tasks.lm import LanguageModelTask

    step_dir = resolve_checkpoint(checkpoint_root)
    task = LanguageModelTask.for_export(load_config(step_dir / "train_config.yaml"), step_dir)
    return load_model_state(step_dir, task.build_model())
