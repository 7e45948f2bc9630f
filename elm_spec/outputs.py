"""One writer per output, no leftovers: the exclusive lock every command takes on what it writes.

An output PARENT/NAME (a model directory, a prepared data directory, a checkpoint directory, an
adapter directory) is locked through `PARENT/.NAME.lock` with `flock`, which the kernel releases
when its holder dies, however it dies. Whoever holds the lock is the only writer of NAME, so any
`.NAME.tmp-*` or `.NAME.old-*` found beside it belongs to a dead run: it is removed, or, for an
old copy whose replacement never arrived, put back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from elm_spec.errors import ElmError
from elm_spec.writes import make_parents, write_failure


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock on OUTPUT (created parents included) for the `with` block.

    A second writer gets one ElmError line naming OUTPUT and the process that holds it.
    """
    target = Path(output).absolute()
    make_parents(target)
    path = lock_path(target)
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise write_failure(target, error) or ElmError(
                f"{path}: cannot create the output's lock file ({error.strerror or error})"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise ElmError(f"{target}: in use by another elm process (pid {holder}); wait for it "
                           "to finish or write somewhere else") from None
        # The previous holder unlinks the file when it is done: lock the file the path names now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(descriptor)
            continue
        if os.fstat(descriptor).st_ino == current.st_ino:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield target
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(descriptor)


def clean_leftovers(output: Path) -> None:
    """Remove what killed writers of OUTPUT left beside it; restore an old copy that a killed
    `--force` moved aside before its replacement was renamed in. Call with the lock held."""
    target = Path(output)
    if not target.parent.is_dir():
        return
    if not target.exists():
        backups = sorted(target.parent.glob(f".{glob_escape(target.name)}.old-*"),
                         key=lambda p: p.stat().st_mtime)
        if backups:
            os.replace(backups[-1], target)
            print(f"note: {target}: restored the previous copy that an interrupted replacement "
                  "had moved aside", flush=True)
    for pattern in (".{}.tmp-*", ".{}.old-*"):
        for leftover in target.parent.glob(pattern.format(glob_escape(target.name))):
            remove(leftover)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def publish_permissions(directory: Path) -> None:
    """Give DIRECTORY and everything in it the modes the umask allows (0644/0755 usually):
    tempfile and some writers create private 0600/0700 entries."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            (Path(root) / name).chmod(0o777 & ~mask)
        for name in files:
            (Path(root) / name).chmod(0o666 & ~mask)


_stopped_at: set[str] = set()


def crash_point(name: str) -> None:
    """Die by SIGKILL here when ELM_CRASH_AT=NAME, or stop (SIGSTOP, the first time only) when
    ELM_STOP_AT=NAME: lets tests kill or hold a run at an exact point of a multi-step write
    (between two renames, say) instead of guessing with timers."""
    if os.environ.get("ELM_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("ELM_STOP_AT") == name and name not in _stopped_at:
        _stopped_at.add(name)
        os.kill(os.getpid(), signal.SIGSTOP)


def refuse_overlap(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Refuse DESTINATION when it is SOURCE, lies inside it, or holds it (symlinks resolved):
    writing it would replace or delete the very input being read."""
    src, dst = Path(source).resolve(), Path(destination).resolve()
    if dst == src:
        raise ElmError(f"{destination}: is the source {source} itself; write the output elsewhere")
    if src in dst.parents:
        raise ElmError(f"{destination}: lies inside the source {source}; write the output elsewhere")
    if dst in src.parents:
        raise ElmError(f"{destination}: holds the source {source}; replacing it would delete the "
                       "source; write the output elsewhere")
