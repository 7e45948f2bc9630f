"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class ElmError(Exception):
    """A user-facing error: the message names the file, key, line or tensor at fault."""


def first_line(error: BaseException, limit: int = 500, fallback: str | None = None) -> str:
    """The first line of ERROR's message (at most LIMIT characters) for a one-line report;
    FALLBACK (default: the exception's type name) when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else (fallback or type(error).__name__)
