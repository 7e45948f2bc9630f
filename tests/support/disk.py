"""Disks that refuse writes, for tests of what a command does when its output cannot be written:
full (a file size limit: writes past it fail with EFBIG), read-only, or a path through a file."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def limit_file_size(nbytes: int) -> tuple[object, tuple[int, int]]:
    """From now on a write past NBYTES into any file fails (EFBIG) instead of the process being
    killed by SIGXFSZ, much as on a full disk. Returns what `restore_file_size` puts back.
    Usable as a subprocess's preexec_fn."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, limits[1]))
    return handler, limits


def restore_file_size(previous: tuple[object, tuple[int, int]]) -> None:
    handler, limits = previous
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """`limit_file_size(NBYTES)` in this process for the `with` block (child processes
    started inside inherit it)."""
    previous = limit_file_size(nbytes)
    try:
        yield
    finally:
        restore_file_size(previous)


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only_tree(directory: Path) -> Iterator[str]:
    """DIRECTORY, filled by the caller beforehand, made read-only for the `with` block; yields
    the errno text writes then fail with. Without root, permission bits do it; root ignores
    them, so there the tree is copied onto a tmpfs that is remounted read-only (skipped where
    mounting is not allowed)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")]}
        for path in modes:
            path.chmod(modes[path] & ~0o222)
        try:
            yield "permission denied"
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    staged = directory.with_name(f"{directory.name}.staged")
    directory.rename(staged)
    directory.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(directory)):
        directory.rmdir()
        staged.rename(directory)
        pytest.skip("running as root without permission to mount: cannot make a read-only disk")
    try:
        subprocess.run(["cp", "-a", f"{staged}/.", str(directory)], check=True)
        assert _mount("-o", "remount,ro", str(directory))
        yield "read-only file system"
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()
        staged.rename(directory)
