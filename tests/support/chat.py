"""Shared pieces of the chat and server tests: templated model copies, random adapters, and
`elm serve` as a real process on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .cli import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(*args: str, timeout: float = 120) -> Iterator[str]:
    """`elm serve ARGS` on a free port; yields its base URL and stops it afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "apps", "serve", *args, "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"elm serve exited: {process.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens A and B share (computed here, not by the code under test)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def with_template(model_dir: Path, destination: Path, template: str) -> Path:
    """A copy of MODEL_DIR whose tokenizer_config.json carries TEMPLATE."""
    shutil.copytree(model_dir, destination)
    config_path = destination / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "chat_template": template}))
    return destination


def adapter_dir(path: Path, template: str | None) -> Path:
    """A directory with only an adapter_config.json recording TEMPLATE."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"chat_template": template}))
    return path


def random_adapters(model_dir: Path, path: Path, template: str | None) -> Path:
    """LoRA adapters with random weights (so they change the output) on the last block of
    MODEL_DIR, recording TEMPLATE."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import elm_mlx

    model, _ = elm_mlx.load(model_dir)
    model.freeze()
    parameters = {"rank": 2, "scale": 1.0, "dropout": 0.0}
    linear_to_lora_layers(model, 1, parameters)
    mx.random.seed(3)
    weights = {name: mx.random.normal(value.shape) * 0.5
               for name, value in tree_flatten(model.trainable_parameters())}
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    (path / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 1, "chat_template": template,
        "lora_parameters": parameters}))
    return path
