"""Writing outputs: a failed write (disk full, read-only file system, no permission) becomes one
error line naming the output, and a file is replaced only once its new content is complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from elm_spec.errors import ElmError

WRITE_FAILURES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# safetensors' Rust writer reports the OS error only in its message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer (inline_container.cc) names no cause either: a short write shows as a
# position mismatch or a failed write.
_TORCH_ZIP_WRITE = re.compile(r"inline_container\.cc.*(unexpected pos|file write failed)")


def _write_errno(error: BaseException) -> int | None:
    """The errno of a failed write, from an OSError or from a library's own error text."""
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        match = _RUST_OS_ERROR.search(str(error))
        return int(match.group(1)) if match else None
    if isinstance(error, RuntimeError) and (str(error).startswith("[write]")
                                            or _TORCH_ZIP_WRITE.search(str(error))):
        return errno.EIO  # MLX's and torch's writers name no cause; a full disk is the usual one
    return None


def _first_failure(error: BaseException) -> BaseException:
    """The first rank's own exception inside torch.distributed.checkpoint's CheckpointException
    (which wraps every rank's failure, and derives from BaseException); else ERROR itself."""
    failures = getattr(error, "failures", None)
    if type(error).__name__ == "CheckpointException" and isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return _first_failure(inner[0] if isinstance(inner, tuple) else inner)
    return error


def write_failure(destination: str | os.PathLike[str], error: BaseException) -> ElmError | None:
    """The one-line error for a failed write under DESTINATION, or None if ERROR is not one."""
    code = _write_errno(_first_failure(error))
    if code not in WRITE_FAILURES and code != errno.EIO:
        return None
    reason = WRITE_FAILURES.get(code, "is the disk full?")
    return ElmError(f"{destination}: write failed ({reason}); nothing was changed there")


@contextlib.contextmanager
def writing(destination: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, a write that fails for lack of space or permission raises one
    ElmError naming DESTINATION; other errors pass through unchanged."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as error:  # DCP's CheckpointException derives from BaseException only
        failure = write_failure(destination, error)
        if failure is None:
            raise
        raise failure from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write TEXT to PATH through a temporary file beside it, renamed into place when complete."""
    path = Path(path)
    with writing(path):
        make_parents(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.chmod(temporary, 0o666 & ~current_umask())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path beside PATH (ending in SUFFIX) for a writer to fill; renamed onto PATH
    when the block completes, removed if it fails."""
    path = Path(path)
    with writing(path):
        make_parents(path)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        try:
            yield temporary
            os.chmod(temporary, 0o666 & ~current_umask())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def make_parents(path: str | os.PathLike[str]) -> None:
    """Create the directories above PATH; one ElmError line naming the file in the way when a
    component of the path is a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()),
                          path.parent)
        raise ElmError(f"{in_the_way}: is a file, not a directory; cannot write {path} "
                       "below it") from None


def write_json_atomic(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
