"""MLX processes stay lean and quiet: MLX-only commands keep PyTorch out (transformers would
import it), and loading a model directory prints no transformers warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support.cli import run_elm

from apps import process
from elm_spec import ModelSpec
from elm_spec.platform import openblas_preload_path


def imported_top_level(stderr: str) -> set[str]:
    """Top-level modules a process imported, from Python's -X importtime report."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture(scope="module")
def model_dir(make_model_dir):
    return make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=2)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_mlx_commands_do_not_import_torch(model_dir, tmp_path, command):
    if command == "generate":
        args = ("generate", "--model", str(model_dir), "--prompt", "def", "--max-tokens", "4",
                "--quiet")
    else:
        text = tmp_path / "text.txt"
        text.write_text("import os\nprint(os.getcwd())\n")
        args = ("eval", "perplexity", "--model", str(model_dir), "--data", str(text),
                "--backend", "mlx", "--json")
    done = run_elm(*args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    modules = imported_top_level(done.stderr)
    assert {"mlx", "mlx_lm", "transformers"} <= modules
    assert "torch" not in modules
    if command == "eval":
        assert json.loads(done.stdout)["tokens"] > 0


def test_torch_commands_still_import_torch(model_dir, tmp_path):
    """The same evaluation on the torch backend (the control: the report does see torch)."""
    text = tmp_path / "text.txt"
    text.write_text("import os\n")
    done = run_elm("eval", "perplexity", "--model", str(model_dir), "--data", str(text),
                   "--backend", "torch", "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" in imported_top_level(done.stderr)


def test_loading_a_model_directory_prints_no_transformers_warning(model_dir):
    """transformers warns that `openelm` is not a model type it knows when it reads the
    tokenizer; `elm_mlx.load` silences that one read, and restores the verbosity after."""
    code = ("from transformers.utils import logging\nbefore = logging.get_verbosity()\n"
            "import elm_mlx\n"
            f"model, tokenizer = elm_mlx.load({str(model_dir)!r})\n"
            "print(tokenizer.encode('def main'), before == logging.get_verbosity() == 30)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model of type" not in done.stderr and done.stderr.strip() == ""
    ids, verbosity_kept = done.stdout.rsplit(" ", 1)
    assert ids.startswith("[1, ") and verbosity_kept.strip() == "True"  # WARNING before and after


@pytest.mark.parametrize("argv", [["train", "config.yaml"], ["data", "prepare", "x"],
                                  ["bench", "run"], ["tokenizer", "check", "t.model"], []])
def test_only_mlx_commands_restart(monkeypatch, argv):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("ELM_OPENBLAS", raising=False)
    restarts = []
    monkeypatch.setattr(process.os, "execve", lambda *args: restarts.append(args))
    process.reexec_with_openblas(argv)
    assert restarts == []
    if openblas_preload_path() is not None:
        process.reexec_with_openblas(["generate", "--model", "m"])
        (_, args, env), = restarts
        assert args[-3:] == ["generate", "--model", "m"] and "-m" not in args
        assert env["LD_PRELOAD"] == openblas_preload_path()


def test_every_mlx_command_is_a_command():
    from apps.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    names |= {g.name for g in app.registered_groups}
    assert names >= process.MLX_COMMANDS, process.MLX_COMMANDS - names
