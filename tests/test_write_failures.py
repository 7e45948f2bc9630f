"""An output that cannot be written (disk full, read-only, a path through a file), for every
command that writes: one `error:` line naming the output, exit status 1, and what was there
before left byte for byte."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cli import run_elm
from support.corpora import stdlib_texts
from support.disk import file_size_limit, read_only_tree
from support.training import train_in_process, write_config

from apps.cli import main
from elm_spec import ModelSpec
from elm_spec.writes import write_failure, writing

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


@pytest.mark.parametrize(("error", "reason"), [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EFBIG, "File too large"), "file too large for this file system or limit"),
    (type("SafetensorError", (Exception,), {})(
        "Error while serializing: I/O error: No space left on device (os error 28)"), "disk full"),
    (RuntimeError("[write] Unable to write 2291 bytes to file."), "is the disk full?"),
], ids=["ENOSPC", "EROFS", "EACCES", "EFBIG", "safetensors", "mlx"])
def test_write_failures_are_one_line(error: BaseException, reason: str) -> None:
    failure = write_failure("out/model", error)
    assert failure is not None and str(failure) == (
        f"out/model: write failed ({reason}); nothing was changed there")


def test_other_errors_pass_through_the_writer() -> None:
    with pytest.raises(FileNotFoundError), writing("out"):
        raise FileNotFoundError(errno.ENOENT, "No such file", "input.txt")
    with pytest.raises(RuntimeError, match="a bug"), writing("out"):
        raise RuntimeError("a bug")


# ----- every writing command, on a disk that refuses its writes ------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, make_model_dir, token_data: Path) -> Path:
    """What the commands read: model/, data/ (fine-tuning JSONL), corpus.jsonl, run/ and ckpt/
    (a 1-step training run, train.yaml), adapters/ (a 2-step fine-tune killed after its first
    checkpoint), fused-adapters/ (a finished 1-step fine-tune)."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(make_model_dir(ModelSpec.from_preset("elm-tiny"), seed=5), root / "model")
    data = root / "data"
    data.mkdir()
    rows = [{"text": f"def function_{i}(value):\n    return value * {i}\n" * 4} for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(12)))
    write_config(root / "train.yaml", token_data, root / "run",
                 train={"max_steps": 1, "seq_len": 16, "micro_batch_size": 2},
                 checkpoint={"dir": str(root / "ckpt")})
    train_in_process(root / "train.yaml")
    killed = run_elm(*finetune_args(root, root / "adapters"),
                     env={"ELM_CRASH_AT": "finetune-checkpoint"})
    assert killed.returncode == -9, killed.stderr
    with pytest.raises(SystemExit) as exit_info:
        main(finetune_args(root, root / "fused-adapters", "--iters", "1"))
    assert exit_info.value.code == 0
    return root


def finetune_args(sources: Path, adapters: Path, *extra: str) -> list[str]:
    return ["finetune", "--lora", "--model", str(sources / "model"), "--data",
            str(sources / "data"), "--adapter-path", str(adapters), "--batch-size", "2",
            "--iters", "2", "--save-every", "1", "--max-seq-length", "64", "--steps-per-eval",
            "100", "--val-batches", "1", *extra]


@dataclass(frozen=True)
class Writer:
    """A command writing OUTPUT (a name in the disk directory) over an earlier copy of it."""

    output: str
    args: Callable[[Path, Path], list[str]]  # (sources, output) -> the command line
    earlier: Callable[[Path, Path], None]  # (sources, output): put the earlier copy there
    file_size_limit: int  # small enough that the command's main write fails, in bytes
    logs: tuple[str, ...] = ()  # files under OUTPUT that grow as the command runs
    records: tuple[str, ...] = ()  # files under OUTPUT rewritten at each start: the run's settings


def earlier_text(sources: Path, output: Path) -> None:
    output.write_text('{"an earlier result": 1}\n')


def earlier_dir(sources: Path, output: Path) -> None:
    output.mkdir()
    (output / "keep.txt").write_text("an earlier output lives here")


def earlier_adapters(sources: Path, output: Path) -> None:
    """The killed fine-tune, as if it had run at OUTPUT: the command resumes it."""
    shutil.copytree(sources / "adapters", output)
    config = json.loads((output / "adapter_config.json").read_text())
    (output / "adapter_config.json").write_text(json.dumps({**config, "adapter_path": str(output)},
                                                           indent=2) + "\n")


def earlier_run(sources: Path, output: Path) -> None:
    """The 1-step training run's checkpoints and run directory: the command resumes it."""
    shutil.copytree(sources / "ckpt", output / "ckpt")
    shutil.copytree(sources / "run", output / "run")


WRITERS = {
    "init": Writer("model", lambda s, o: ["init", str(o), "--preset", "elm-tiny", "--force"],
                   lambda s, o: shutil.copytree(s / "model", o), 200_000),
    "data prepare": Writer(
        "tokens", lambda s, o: ["data", "prepare", str(s / "corpus.jsonl"), "--tokenizer",
                                str(s / "model"), "--out", str(o), "--min-chars", "0",
                                "--min-tokens", "0", "--workers", "1", "--force"],
        earlier_dir, 50_000),
    "train": Writer("training", lambda s, o: ["train", str(s / "train.yaml"),
                                              f"log.run_dir={o}/run", f"checkpoint.dir={o}/ckpt",
                                              "train.max_steps=2"],
                    earlier_run, 100_000, logs=("run/metrics.jsonl",),
                    records=("run/train_config.yaml",)),
    "finetune": Writer("adapters", lambda s, o: finetune_args(s, o, "--resume"),
                       earlier_adapters, 4_000,
                       logs=("metrics.jsonl",)),
    "export": Writer("exported", lambda s, o: ["export", str(s / "ckpt"), str(o), "--force"],
                     earlier_dir, 200_000),
    "fuse": Writer("fused", lambda s, o: ["fuse", "--model", str(s / "model"), "--adapter-path",
                                          str(s / "fused-adapters"), "--save-path", str(o),
                                          "--force"],
                   earlier_dir, 200_000),
    "convert": Writer("converted", lambda s, o: ["convert", str(s / "model"), str(o), "--force",
                                                 "-q"], earlier_dir, 20_000),
    "eval --output": Writer(
        "result.json", lambda s, o: ["eval", "perplexity", "--model", str(s / "model"), "--data",
                                     str(s / "data" / "train.jsonl"), "--backend", "torch",
                                     "--output", str(o)], earlier_text, 16),
}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ROOT (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, bytes], after: dict[str, bytes], writer: Writer) -> None:
    """AFTER holds what BEFORE held, byte for byte, and nothing more; a log may have grown, a
    record of the run's settings have been rewritten."""
    assert sorted(after) == sorted(before), "files were left behind or removed"
    for name, content in before.items():
        if name in {f"{writer.output}/{log}" for log in writer.logs}:
            assert after[name].startswith(content), name
        elif name not in {f"{writer.output}/{record}" for record in writer.records}:
            assert after[name] == content, f"{name} was changed"


def one_error_line(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 1, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    directory = tmp_path / "disk"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("command", WRITERS)
def test_disk_full(sources: Path, disk: Path, capsys, command: str) -> None:
    writer = WRITERS[command]
    output = disk / writer.output
    writer.earlier(sources, output)
    before = snapshot(disk)
    with file_size_limit(writer.file_size_limit):
        line = one_error_line(capsys, writer.args(sources, output))
    assert f"{output}" in line and "write failed (" in line, line
    assert_kept(before, snapshot(disk), writer)


@pytest.mark.parametrize("command", WRITERS)
def test_read_only_disk(sources: Path, disk: Path, capsys, command: str) -> None:
    writer = WRITERS[command]
    output = disk / writer.output
    writer.earlier(sources, output)
    before = snapshot(disk)
    with read_only_tree(disk) as reason:
        line = one_error_line(capsys, writer.args(sources, output))
        assert f"{output}" in line and f"write failed ({reason})" in line, line
        assert_kept(before, snapshot(disk), writer)


@pytest.mark.parametrize("command", WRITERS)
def test_output_path_through_a_file(sources: Path, disk: Path, capsys, command: str) -> None:
    (disk / "a-file").write_text("not a directory")
    output = disk / "a-file" / WRITERS[command].output
    line = one_error_line(capsys, WRITERS[command].args(sources, output))
    assert f"{disk / 'a-file'}: is a file, not a directory" in line, line
    assert snapshot(disk) == {"a-file": b"not a directory"}
