"""Writing files so that a crash, a full disk or a read-only folder never leaves half a file: write a temporary file
beside the target, then `os.replace` it into place. Errors become one-line DCAEErrors naming the target."""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dcae.errors import DCAEError, write_failure


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder: os.replace stays atomic


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block succeeds.

    Errors become DCAEError naming `path`; a failed write leaves neither a partial file nor a temporary one.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(tmp, "xb")  # noqa: SIM115 - closed below; "x" honours the umask unlike mkstemp's 0600
    except OSError as error:
        raise DCAEError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        with handle:
            yield handle
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DCAEError(f"{path}: cannot write: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary path (for writers that want a file name: safetensors, torch.save), which is
    then renamed onto `path`; a failure (full disk, read-only folder) removes it and raises DCAEError."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) make 0600 files; a result is an ordinary file
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(error, Exception) and not isinstance(error, DCAEError):
            raise DCAEError(f"{path}: cannot write: {write_failure(error, path.parent)}") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(data: Any) -> Any:
    """JSON has no inf/nan: non-finite floats (PSNR of identical images) become None, recursively."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data if not isinstance(data, float) or math.isfinite(data) else None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """A results file: indented JSON (non-finite floats as null), written atomically, parent folders created."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DCAEError(f"{path}: cannot write: {error.strerror or error}") from None
    atomic_write_text(path, json.dumps(json_safe(data), indent=2) + "\n")
