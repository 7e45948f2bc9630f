"""Work is never lost: one writer per output, interrupted replacements recovered, leftovers of
dead runs cleaned, damaged checkpoints skipped (docs/security.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import REPO, one_line_failure, run_elm
from support.training import THREAD_ENV

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hold_lock(output: Path) -> subprocess.Popen:
    """Another process holding OUTPUT's lock until its stdin closes; returns once it holds it."""
    code = ("import sys; from elm_spec.outputs import output_lock\n"
            f"with output_lock({str(output)!r}):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_writer_is_refused_in_one_line(make_model_dir, tmp_path: Path) -> None:
    source = make_model_dir()
    dst = tmp_path / "out"
    assert run_elm("convert", str(source), str(dst)).returncode == 0
    before = digest(dst)
    holder = hold_lock(dst)
    try:
        result = run_elm("convert", str(source), str(dst), "--force", "-q")
        one_line_failure(result, str(dst), f"in use by another elm process (pid {holder.pid})")
        assert digest(dst) == before
    finally:
        holder.communicate("")
    # Once the holder is gone the lock is free again, and nothing of it is left behind.
    assert run_elm("convert", str(source), str(dst), "--force", "-q").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_data_prepare_on_one_output_is_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Two real `elm data prepare` on one --out: the first, held while it writes (stopped at
    its first result), keeps the output; the second gets one line naming it and its pid."""
    import signal

    from support.corpora import stdlib_files

    def prepare(out: Path) -> list[str]:
        return ["data", "prepare", *map(str, stdlib_files(6)), "--format", "txt", "--tokenizer",
                str(tokenizer_dir), "--out", str(out), "--workers", "1", "--min-tokens", "0"]

    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "-m", "apps", *prepare(out)],
                             env={**os.environ, "PYTHONPATH": str(REPO), "ELM_STOP_AT": "data-prepare"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), first.stderr.read()
        second = run_elm(*prepare(out), "--force")
        one_line_failure(second, str(out), f"in use by another elm process (pid {first.pid})")
        assert not out.exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    reference = run_elm(*prepare(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    assert digest(out) == digest(tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "reference"]  # no lock, no temp


def test_second_training_run_on_a_checkpoint_dir_is_refused(run_copy: Path) -> None:
    checkpoints = run_copy / "checkpoints"
    before = digest(checkpoints)
    holder = hold_lock(checkpoints)
    try:
        result = run_elm("train", str(run_copy / "train.yaml"), "train.max_steps=6", env=THREAD_ENV)
        one_line_failure(result, str(checkpoints), "in use by another elm process")
    finally:
        holder.communicate("")
    assert digest(checkpoints) == before


def test_force_killed_between_renames_is_recovered(make_model_dir, tmp_path: Path) -> None:
    source, other = make_model_dir(seed=0), make_model_dir(seed=1)
    dst = tmp_path / "out"
    assert run_elm("convert", str(source), str(dst), "-q").returncode == 0
    before = digest(dst)
    killed = run_elm("convert", str(other), str(dst), "--force", "-q",
                     env={"ELM_CRASH_AT": "replace-dir"})
    assert killed.returncode == -9
    assert not dst.exists() and list(tmp_path.glob(".out.old-*"))  # the window the kill hit
    result = run_elm("convert", str(source), str(dst), "-q")
    assert "restored the previous copy" in result.stdout + result.stderr
    one_line_failure(result, "already exists")  # no --force: the restored copy is kept
    assert digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging and backup cleaned


def test_leftovers_of_dead_runs_are_cleaned(make_model_dir, tmp_path: Path) -> None:
    source = make_model_dir()
    for leftover in (".out.tmp-k1ll3d", ".out.tmp-4242"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / ".out.lock").write_text("4242\n")  # the lock file of a killed holder
    result = run_elm("convert", str(source), str(tmp_path / "out"), "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("relation", ["same", "symlink", "inside", "holds"])
def test_destination_overlapping_the_source_is_refused(make_model_dir, tmp_path: Path,
                                                       relation: str) -> None:
    from convert import ConvertOptions, convert
    from elm_spec import ElmError

    model = tmp_path / "model"
    shutil.copytree(make_model_dir(), model)
    before = digest(model)
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    destination = {"same": model, "symlink": tmp_path / "link", "inside": model / "q4",
                   "holds": tmp_path}[relation]
    with pytest.raises(ElmError, match="write the output elsewhere"):
        convert(model, destination, ConvertOptions(quantize=True, force=True, progress=False))
    assert digest(model) == before


def test_fuse_and_data_prepare_refuse_outputs_that_would_replace_their_inputs(
        make_model_dir, tokenizer_dir: Path, tmp_path: Path) -> None:
    """--force would delete the model, the adapters, a corpus file or the tokenizer: refused
    before any work, nothing touched."""
    from elm_mlx.lora.fuse import fuse
    from elm_spec import ElmError
    from elm_train.data.distributed import prepare_data_distributed
    from elm_train.data.prepare import prepare_data

    model, adapters = tmp_path / "model", tmp_path / "adapters"
    shutil.copytree(make_model_dir(), model)
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    corpus, tokenizer = tmp_path / "corpus", tmp_path / "tokenizer"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f():\n    return 1\n")
    shutil.copytree(tokenizer_dir, tokenizer)
    before = {d: digest(d) for d in (model, adapters, corpus, tokenizer)}

    for destination in (model, model / "fused", adapters, tmp_path):
        with pytest.raises(ElmError, match="write the output elsewhere"):
            fuse(model, adapters, destination, force=True)
    for destination in (corpus, tokenizer, tmp_path):
        with pytest.raises(ElmError, match="write the output elsewhere"):
            prepare_data([corpus / "a.txt"], tokenizer, destination, force=True,
                         show_progress=False)
        with pytest.raises(ElmError, match="write the output elsewhere"):
            prepare_data_distributed([corpus], tokenizer, destination, tmp_path / "work", tasks=1,
                                     force=True, show_progress=False)
    assert {d: digest(d) for d in before} == before
    assert not (tmp_path / "work").exists()  # refused before the work directory was claimed


def test_resume_false_refuses_an_earlier_runs_checkpoints(run_copy: Path) -> None:
    from support.training import train_in_process

    from elm_spec import ElmError

    before = digest(run_copy / "checkpoints")
    with pytest.raises(ElmError) as error:
        train_in_process(run_copy / "train.yaml", "checkpoint.resume=false", "train.max_steps=2")
    assert str(error.value) == (
        f"{run_copy / 'checkpoints'}: holds checkpoints of an earlier run (newest step-4) and "
        "checkpoint.resume is false; set checkpoint.resume=true to continue it, or choose an "
        "empty checkpoint.dir (nothing was deleted)")
    assert digest(run_copy / "checkpoints") == before


DAMAGE = ["truncated-distcp", "bad-trainer-json", "bad-rank-file"]


def damage_checkpoint(step_dir: Path, damage: str) -> None:
    if damage == "truncated-distcp":
        shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "bad-trainer-json":
        (step_dir / "trainer.json").write_text('{"step": 4, "sched')
    else:
        (step_dir / "rank-00000.pt").write_bytes(b"PK\x03\x04 not a zip")


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(run_copy: Path, damage: str,
                                                               capsys) -> None:
    from support.training import train_in_process

    damage_checkpoint(run_copy / "checkpoints" / "step-4", damage)
    result = train_in_process(run_copy / "train.yaml", "train.max_steps=3")
    assert result.step == 3
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-4" in warnings[0] and "damaged" in warnings[0], captured.err
    assert "resumed from" in captured.out and "step-2 (step 2)" in captured.out
    assert (run_copy / "checkpoints" / "step-4.damaged").is_dir()
    assert json.loads((run_copy / "checkpoints" / "step-3" / "trainer.json").read_text())["step"] == 3


def read_checkpoint(capsys, command: str, source: Path, destination: Path) -> tuple[int, str]:
    """`elm COMMAND SOURCE DESTINATION` in this process: (exit status, stderr)."""
    from apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, str(source), str(destination), *(["-q"] if command == "convert" else [])])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_readers_of_a_damaged_checkpoint_use_the_newest_intact_one(run_copy: Path, capsys,
                                                                   damage: str, command: str) -> None:
    checkpoints = run_copy / "checkpoints"
    code, err = read_checkpoint(capsys, command, checkpoints / "step-2", run_copy / "from-step-2")
    assert code == 0, err
    damage_checkpoint(checkpoints / "step-4", damage)
    before = digest(checkpoints)
    code, err = read_checkpoint(capsys, command, checkpoints, run_copy / "out")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-4" in warnings[0] and "damaged" in warnings[0], err
    assert "reading step-2" in warnings[0], warnings[0]
    assert digest(run_copy / "out") == digest(run_copy / "from-step-2")
    assert digest(checkpoints) == before  # a reader moves nothing aside
    # Named explicitly, the damaged step is an error, not a fallback.
    code, err = read_checkpoint(capsys, command, checkpoints / "step-4", run_copy / "out-4")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "step-4" in errors[0] and "damaged" in errors[0], err
    assert not (run_copy / "out-4").exists()


def test_no_intact_checkpoint_left_to_read(run_copy: Path, capsys) -> None:
    checkpoints = run_copy / "checkpoints"
    damage_checkpoint(checkpoints / "step-4", "bad-trainer-json")
    damage_checkpoint(checkpoints / "step-2", "truncated-distcp")
    code, err = read_checkpoint(capsys, "export", checkpoints, run_copy / "out")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "step-2" in errors[0] and f"no intact checkpoint in {checkpoints}" in errors[0]
    assert not (run_copy / "out").exists()


def process_group_members(group: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_data_prepare_workers_exit_when_the_parent_is_killed(tokenizer_dir: Path,
                                                             tmp_path: Path) -> None:
    import time

    from support.corpora import stdlib_files

    # The parent SIGKILLs itself after its first result, with both workers alive and idle.
    process = subprocess.Popen(
        [sys.executable, "-m", "apps", "data", "prepare", *map(str, stdlib_files(6)),
         "--format", "txt", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "data"),
         "--workers", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO), "ELM_CRASH_AT": "data-prepare"},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.wait(timeout=120) == -9, process.stderr.read()
    deadline = time.monotonic() + 20
    while process_group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_group_members(process.pid) == []
    assert not (tmp_path / "data").exists()


def lora_args(model: Path, data: Path, adapters: Path) -> list[str]:
    return ["finetune", "--lora", "--model", str(model), "--data", str(data), "--adapter-path",
            str(adapters), "--iters", "4", "--batch-size", "2", "--save-every", "2",
            "--steps-per-eval", "4", "--max-seq-length", "32", "--rank", "2"]


@pytest.fixture
def lora_data(tmp_path: Path) -> Path:
    from support.lora import text_rows, write_jsonl

    write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(16, seed=1))
    write_jsonl(tmp_path / "data" / "valid.jsonl", text_rows(4, seed=2))
    return tmp_path / "data"


def test_finetune_killed_in_its_first_checkpoint_resumes(make_model_dir, lora_data: Path,
                                                         tmp_path: Path) -> None:
    model, adapters = make_model_dir(), tmp_path / "adapters"
    killed = run_elm(*lora_args(model, lora_data, adapters),
                     env={"ELM_CRASH_AT": "finetune-checkpoint"})
    assert killed.returncode == -9, killed.stderr
    assert not (adapters / "adapters.safetensors").exists()  # the window: checkpoint, no adapters
    assert [p.name for p in (adapters / "checkpoints").iterdir()] == ["step-0000002"]
    assert oct((adapters / "checkpoints" / "step-0000002").stat().st_mode & 0o777) == oct(
        0o777 & ~current_umask())
    resumed = run_elm(*lora_args(model, lora_data, adapters), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "step 2" in resumed.stdout
    assert (adapters / "adapters.safetensors").is_file()


def test_second_finetune_on_one_adapter_path_is_refused(make_model_dir, lora_data: Path,
                                                        tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    holder = hold_lock(adapters)
    try:
        result = run_elm(*lora_args(make_model_dir(), lora_data, adapters))
        one_line_failure(result, str(adapters), f"in use by another elm process (pid {holder.pid})")
    finally:
        holder.communicate("")
    assert not adapters.exists()
    # Leftovers of killed runs inside the adapter directory are removed by the next run.
    (adapters / "checkpoints" / ".step-0000002.tmp-k1ll3d").mkdir(parents=True)
    (adapters / ".adapters.tmp-4242.safetensors").write_bytes(b"\0" * 64)
    result = run_elm(*lora_args(make_model_dir(), lora_data, adapters))
    assert result.returncode == 0, result.stderr
    assert not list(adapters.rglob(".*tmp-*"))
    assert sorted(p.name for p in (adapters / "checkpoints").iterdir()) == ["step-0000002",
                                                                          "step-0000004"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_model_files_get_the_umask_permissions(make_model_dir) -> None:
    model = make_model_dir()
    mask = current_umask()
    assert model.stat().st_mode & 0o777 == 0o777 & ~mask
    for file in model.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file.name
