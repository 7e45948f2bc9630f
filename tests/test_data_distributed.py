"""`elm data prepare --backend datatrove`: real datatrove tasks, every byte against the single-machine run."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import assert_one_error_line, run_elm

from elm_spec import ElmError
from elm_spec.tokenizer import Tokenizer
from elm_train.data import distributed
from elm_train.data.distributed import (
    merge_parts,
    prepare_data_distributed,
    slurm_executor,
    slurm_launch_script,
)
from elm_train.data.format import read_index
from elm_train.data.prepare import PrepareOptions, prepare_data

pytestmark = pytest.mark.slow  # subprocesses, trained fixtures or servers

# Small chunks and shards: many parts per task and shard boundaries inside documents.
OPTIONS = dict(valid_fraction=0.3, seed=7, chunk_bytes=16 << 10, shard_tokens=3000)


def assert_same_files(expected: Path, actual: Path) -> None:
    names = sorted(p.name for p in expected.iterdir())
    assert names == sorted(p.name for p in actual.iterdir())
    assert any(name.startswith("train-00002") for name in names)  # several shards compared
    for name in names:
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name


@pytest.fixture(scope="module")
def single_machine(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "data"
    prepare_data(corpus[0], tokenizer_dir, out, PrepareOptions(workers=1, **OPTIONS),
                 show_progress=False)
    return out


@pytest.mark.parametrize("tasks", [1, 3, 7])
def test_every_byte_equals_the_single_machine_run(corpus, tokenizer_dir, single_machine,
                                                   tmp_path, tasks):
    out = tmp_path / "data"
    prepare_data_distributed(corpus[0], tokenizer_dir, out, tmp_path / "work", tasks,
                             PrepareOptions(workers=2, **OPTIONS), show_progress=False)
    assert_same_files(single_machine, out)
    assert len(list((tmp_path / "work" / "logs" / "completions").iterdir())) == tasks


def test_a_task_dying_mid_part_is_retried_without_duplicates(corpus, tokenizer_dir,
                                                             single_machine, tmp_path,
                                                             monkeypatch):
    options = PrepareOptions(workers=1, **OPTIONS)
    work = tmp_path / "work"
    real_save = distributed.save_part
    saved: list[Path] = []

    def dies_writing_the_fourth_part(path: Path, result) -> None:
        if len(saved) == 3:  # the task dies with the part half written
            path.with_name(f".{path.name}.tmp").write_bytes(b"half")
            raise RuntimeError("task killed")
        real_save(path, result)
        saved.append(path)

    monkeypatch.setattr(distributed, "save_part", dies_writing_the_fourth_part)
    with pytest.raises(RuntimeError, match="task killed"):
        prepare_data_distributed(corpus[0], tokenizer_dir, tmp_path / "data", work, 2, options,
                                 show_progress=False)
    assert not (tmp_path / "data").exists()
    with pytest.raises(ElmError, match="parts missing"):  # no manifest from an incomplete run
        merge_parts(corpus[0], Tokenizer(tokenizer_dir), work, tmp_path / "data", options,
                    show_progress=False)
    assert not (tmp_path / "data").exists()

    resumed: list[Path] = []
    monkeypatch.setattr(distributed, "save_part",
                        lambda path, result: (resumed.append(path), real_save(path, result)))
    prepare_data_distributed(corpus[0], tokenizer_dir, tmp_path / "data", work, 2, options,
                             show_progress=False)
    assert_same_files(single_machine, tmp_path / "data")
    assert not set(saved) & set(resumed)  # finished parts were not tokenized again
    assert len(saved) + len(resumed) == len(list((work / "parts").glob("part-*.npz")))


def test_work_dir_of_another_run_is_refused(corpus, tokenizer_dir, tmp_path):
    work = tmp_path / "work"
    distributed._claim_work_dir(work, {"settings": {"seed": 1}, "tasks": 2})
    with pytest.raises(ElmError, match=r"another run .*settings"):
        distributed._claim_work_dir(work, {"settings": {"seed": 2}, "tasks": 2})


def test_slurm_launch_is_an_array_job_over_the_tasks(corpus, tokenizer_dir, tmp_path):
    executor = slurm_executor(corpus[0], Tokenizer(tokenizer_dir), tmp_path / "work",
                              PrepareOptions(**OPTIONS), tasks=64, partition="cpu",
                              time="04:00:00", cpus_per_task=2, venv_path="/opt/elm/bin/activate")
    script = slurm_launch_script(executor)
    directives = dict(line.removeprefix("#SBATCH --").partition("=")[::2]
                      for line in script.splitlines() if line.startswith("#SBATCH --"))
    assert "requeue" in directives  # a preempted task runs again and resumes from its parts
    assert directives["array"] == "0-63"
    assert directives["partition"] == "cpu"
    assert directives["time"] == "04:00:00"
    assert directives["cpus-per-task"] == "2"
    assert directives["output"] == str(tmp_path / "work" / "logs" / "slurm" / "%A_%a.out")
    assert "source /opt/elm/bin/activate" in script
    assert f"launch_pickled_pipeline {tmp_path / 'work' / 'logs' / 'executor.pik'}" in script
    assert executor.world_size == 64


def test_cli_datatrove_backend_writes_the_local_backends_bytes(corpus, tokenizer_dir,
                                                               tmp_path):
    common = ["--tokenizer", str(tokenizer_dir), "--valid-fraction", "0.3", "--seed", "7",
              "--shard-tokens", "3000", "--workers", "2"]
    local = run_elm("data", "prepare", *corpus[0], *common, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    result = run_elm("data", "prepare", *corpus[0], *common, "--out", str(tmp_path / "dt"),
                     "--backend", "datatrove", "--tasks", "3")
    assert result.returncode == 0, result.stderr
    assert_same_files(tmp_path / "local", tmp_path / "dt")
    assert (result.stdout.replace(str(tmp_path / "dt"), "OUT")
            == local.stdout.replace(str(tmp_path / "local"), "OUT"))  # summary and per-source lines
    assert (tmp_path / "dt.work" / "run.json").is_file()
    stats = read_index(tmp_path / "dt").stats
    tokens = stats["tokens"]["train"] + stats["tokens"]["valid"]
    summary = [line for line in result.stderr.splitlines() if line.startswith("3 tasks: ")]
    assert summary and (f"{stats['documents_read']:,} documents" in summary[0]
                        and f"{tokens:,} tokens in" in summary[0]), result.stderr


def test_cli_unknown_backend_is_one_line(tokenizer_dir, tmp_path):
    (tmp_path / "a.txt").write_text("x" * 300)
    result = run_elm("data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tokenizer_dir),
                     "--out", str(tmp_path / "d"), "--backend", "ray")
    assert_one_error_line(result, "--backend must be local or datatrove, got 'ray'")
    assert not (tmp_path / "d").exists()


def test_corenet_layout_under_datatrove_is_every_byte_of_the_single_machine_run(
        corpus, tokenizer_dir, tmp_path):
    options = {**OPTIONS, "layout": "corenet", "chunk_words": 300}
    prepare_data(corpus[0], tokenizer_dir, tmp_path / "local", PrepareOptions(workers=1, **options),
                 show_progress=False)
    prepare_data_distributed(corpus[0], tokenizer_dir, tmp_path / "dt", tmp_path / "work", 3,
                             PrepareOptions(workers=2, **options), show_progress=False)
    assert_same_files(tmp_path / "local", tmp_path / "dt")
    assert (tmp_path / "dt" / "train-rows.bin").stat().st_size > 0
