"""`elm data prepare --backend datatrove`: tokenizing as datatrove tasks, then one merge.

The corpus is cut into the same chunks as the single-machine path (sources.plan_chunks); task
RANK of WORLD tokenizes chunks RANK, RANK + WORLD, ... and saves each chunk's result as one part
file in WORK_DIR/parts, renamed into place only when complete. The merge then feeds the parts in
corpus order to the same writer as the single-machine path (prepare.write_prepared), so shards,
the held-out split and index.json are byte-identical for any number of tasks.

Failure and resumption: a task that dies leaves only whole parts behind (a half-written part is
a temporary file, never read); datatrove marks a task complete only after its last part, and a
rerun skips complete tasks and, inside a task, chunks whose part exists, so no document is
tokenized twice into the output or lost. The merge refuses to write anything until every part
is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from elm_spec import ElmError
from elm_spec.tokenizer import Tokenizer
from elm_train.data.mix import Mix, as_mix
from elm_train.data.prepare import (
    ChunkTokenizer,
    PrepareOptions,
    expand_mix,
    refuse_replacing_inputs,
    save_part,
    write_prepared,
)
from elm_train.data.sources import plan_chunks

RUN_FILE = "run.json"
PARTS_DIR = "parts"


def part_path(work_dir: Path, chunk_index: int) -> Path:
    return work_dir / PARTS_DIR / f"part-{chunk_index:08d}.npz"


class TokenizeTask:
    """A datatrove pipeline step: tokenizes this task's chunks into part files."""

    def __init__(self, mix: Mix, tokenizer_file: Path, work_dir: Path, options: PrepareOptions):
        self.mix = mix
        self.tokenizer_file = tokenizer_file
        self.work_dir = work_dir
        self.options = options

    def __repr__(self) -> str:  # shown in each task's log
        return f"elm TokenizeTask: {len(self.mix.sources)} sources -> {self.work_dir / PARTS_DIR}"

    def __call__(self, data: Any, rank: int = 0, world_size: int = 1) -> None:
        files = expand_mix(self.mix, self.options)
        tokenize = ChunkTokenizer(self.tokenizer_file, self.options)
        chunks = plan_chunks(files, self.options.read_options, self.options.chunk_bytes)
        for index, chunk in enumerate(chunks):
            if index % world_size != rank or part_path(self.work_dir, index).is_file():
                continue
            save_part(part_path(self.work_dir, index), tokenize(chunk))


def part_progress(path: Path) -> tuple[int, int, int]:
    """(documents read, source bytes, tokens) of a part, without reading its token arrays."""
    with np.load(path) as part:
        counts = json.loads(part["counts"].tobytes())
        return counts.get("documents_read", 0), int(part["source_bytes"]), int(part["tokens"])


class TaskProgress:
    """Progress across all tasks, from the parts they have finished (whoever runs them).

    Polls WORK_DIR/parts in a thread: documents, source bytes (bar, rate, time left) and tokens/s.
    """

    def __init__(self, work_dir: Path, total_bytes: int, enabled: bool):
        from rich.progress import TextColumn

        from elm_spec.progress import byte_progress

        self.parts = work_dir / PARTS_DIR
        self.seen: set[str] = set()
        self.totals = [0, 0, 0]
        self.start = time.perf_counter()
        self.progress = byte_progress(
            "tasks", TextColumn("{task.fields[documents]:,} docs, {task.fields[rate]} tokens/s"),
            enabled=enabled)
        self.task = self.progress.add_task("tasks", total=total_bytes, documents=0, rate="0")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TaskProgress:
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.poll()
        self.progress.stop()

    def _poll(self) -> None:
        while not self.done.wait(0.5):
            self.poll()

    def poll(self) -> None:
        for path in self.parts.glob("part-*.npz"):
            if path.name not in self.seen:
                self.seen.add(path.name)
                for i, value in enumerate(part_progress(path)):
                    self.totals[i] += value
        documents, source_bytes, tokens = self.totals
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, completed=source_bytes, documents=documents,
                             rate=f"{rate:,.0f}")

    def summary(self, tasks: int) -> str:
        documents, source_bytes, tokens = self.totals
        seconds = time.perf_counter() - self.start
        return (f"{tasks} tasks: {len(self.seen)} parts, {documents:,} documents, "
                f"{source_bytes / 1e6:,.1f} MB, {tokens:,} tokens in {seconds:.1f} s "
                f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")


def run_description(mix: Mix, tok: Tokenizer, options: PrepareOptions, tasks: int
                    ) -> dict[str, Any]:
    """What decides a run's parts: a work dir holding another run's parts is refused."""
    settings = asdict(options)
    settings.pop("workers")
    return {"sources": mix.describe(), "tasks": tasks, "settings": settings,
            "tokenizer_sha256": hashlib.sha256(tok.path.read_bytes()).hexdigest()}


def _claim_work_dir(work_dir: Path, description: dict[str, Any]) -> None:
    (work_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    run_file = work_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != description:
            changed = sorted(k for k in description if previous.get(k) != description[k])
            raise ElmError(f"{run_file}: this work dir belongs to another run (different "
                           f"{', '.join(changed)}); use a new --work-dir")
    else:
        run_file.write_text(json.dumps(description, indent=2) + "\n")


def tokenize_executor(mix: Mix, tok: Tokenizer, work_dir: Path, options: PrepareOptions,
                      tasks: int, workers: int):
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(
        pipeline=[TokenizeTask(mix, tok.path, work_dir, options)], tasks=tasks,
        workers=min(workers, tasks), logging_dir=str(work_dir / "logs"), start_method="fork")


def slurm_executor(sources: Sequence[str] | Mix, tok: Tokenizer, work_dir: Path,
                   options: PrepareOptions, tasks: int, partition: str, time: str,
                   cpus_per_task: int, venv_path: str | None = None):
    """datatrove's SLURM executor for the tokenizing tasks (one array job, a task per element)."""
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        pipeline=[TokenizeTask(as_mix(sources).pinned(), tok.path, work_dir, options)],
        tasks=tasks,
        time=time, partition=partition, cpus_per_task=cpus_per_task, job_name="elm-data-prepare",
        logging_dir=str(work_dir / "logs"), slurm_logs_folder=str(work_dir / "logs" / "slurm"),
        venv_path=venv_path)


def slurm_launch_script(executor) -> str:
    """The sbatch script datatrove submits for EXECUTOR (an array job over its tasks)."""
    return executor.get_launch_file_contents(
        executor.get_sbatch_args(executor.tasks),
        f"srun -l -n 1 launch_pickled_pipeline {executor.logging_dir.resolve_paths('executor.pik')}")


def missing_parts(work_dir: Path, chunk_count: int) -> list[int]:
    return [i for i in range(chunk_count) if not part_path(work_dir, i).is_file()]


def merge_parts(sources: Sequence[str] | Mix, tok: Tokenizer, work_dir: Path,
                output: str | os.PathLike[str], options: PrepareOptions, force: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Write the data directory from complete parts; refuses while any part is missing."""
    mix = as_mix(sources)
    files = expand_mix(mix, options)
    chunk_count = sum(1 for _ in plan_chunks(files, options.read_options, options.chunk_bytes))
    missing = missing_parts(work_dir, chunk_count)
    if missing:
        raise ElmError(f"{work_dir / PARTS_DIR}: {len(missing)} of {chunk_count} parts missing "
                       f"(first: chunk {missing[0]}); rerun the tasks to complete them")

    return write_prepared(None, tok, files, output, options, mix, force=force,
                          show_progress=show_progress,
                          parts=[part_path(work_dir, i) for i in range(chunk_count)])


def prepare_data_distributed(sources: Sequence[str | os.PathLike[str]] | Mix,
                             tokenizer: str | os.PathLike[str], output: str | os.PathLike[str],
                             work_dir: str | os.PathLike[str], tasks: int,
                             options: PrepareOptions | None = None, force: bool = False,
                             show_progress: bool = True) -> dict[str, Any]:
    """Tokenize as TASKS datatrove tasks (options.workers at a time) with parts in WORK_DIR,
    then merge into OUTPUT. Rerunning with the same arguments resumes an interrupted run."""
    if tasks < 1:
        raise ElmError(f"--tasks must be at least 1, got {tasks}")
    options = options or PrepareOptions()
    tok = Tokenizer(tokenizer)
    mix = as_mix(sources).pinned()
    work = Path(work_dir)
    files = expand_mix(mix, options)
    refuse_replacing_inputs(files, tok, output)
    _claim_work_dir(work, run_description(mix, tok, options, tasks))
    with TaskProgress(work, sum(f.size for f in files), show_progress) as progress:
        tokenize_executor(mix, tok, work, options, tasks, options.workers).run()
    if show_progress:
        print(progress.summary(tasks), file=sys.stderr)
    return merge_parts(mix, tok, work, output, options, force=force,
                       show_progress=show_progress)
