"""User-facing errors: one line that names the file and the problem, printed by the CLI without a traceback."""
from __future__ import annotations

import shutil
from pathlib import Path


class DCAEError(Exception):
    """An error caused by the user's input (a file, a value, a checkpoint), not by a bug in dcae.

    Its message is one line wherever it is shown: the user text it quotes (a file name, a value, a tensor name) may
    hold line breaks, so `str()` escapes them (`printable`); `args[0]` keeps the message as raised."""

    def __str__(self) -> str:
        return printable(super().__str__())


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type name when it has none: what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def printable(text: str) -> str:
    """Line breaks and control characters (from a value or a file name the user gave) escaped: one line stays one."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def write_failure(error: BaseException, folder: Path) -> str:
    """A short reason for a failed write: the OS error, or free space when the library's own error has no errno
    (torch.save reports a full disk as `RuntimeError: unexpected pos`, safetensors as its own error type)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = first_line(error)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return first
    return f"No space left on device ({free / 2**20:.1f} MB free)" if free < 64 * 2**20 else first
