"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class ElmError(Exception):
    """A user-facing error: the message names the file, key, line or tensor at fault."""
