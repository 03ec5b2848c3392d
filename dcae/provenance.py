"""What every results JSON records about where its numbers came from.

    from dcae.provenance import provenance
    result["provenance"] = provenance({"model": "dcae/assets/default-f32c32"})

The record: the command line, the git commit (and whether the work tree had uncommitted changes), the sha256 of
every model file used (a folder stands for the model.safetensors inside it), a UTC timestamp and the machine
(`dcae.runtime.hardware_record`). tests/test_experiments.py reads these hashes back: a results file that claims
the embedded default must carry the shipped file's hash, so replacing the model forces regenerating (or relabelling)
every number it invalidates.
"""
from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_DEFAULT = REPO / "dcae" / "assets" / "default-f32c32" / "model.safetensors"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(path: str | Path, weights: str = "model") -> Path:
    """The weights file a model path stands for: the file itself, or <folder>/model.safetensors (ema.safetensors)."""
    path = Path(path)
    return path / f"{'ema' if weights == 'ema' else 'model'}.safetensors" if path.is_dir() else path


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": hex or None, "dirty": bool or None} of the repository holding this package."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


def provenance(models: Mapping[str, str | Path] | None = None, *, weights: str = "model",
               device: str = "cpu") -> dict[str, Any]:
    """The provenance record: command, git commit + dirty flag, {name: {path, sha256}} per model, time, machine."""
    from dcae.runtime import hardware_record

    files = {}
    for name, path in (models or {}).items():
        file = model_file(path, weights)
        files[name] = {"path": _relative(file), "sha256": file_sha256(file) if file.is_file() else None,
                       "embedded_default": file.resolve() == EMBEDDED_DEFAULT.resolve()}
    return {"command": command_line(), **git_state(),
            "models": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": hardware_record(device)}


def command_line() -> str:
    """This process's command line as typed from the repository root (`python -m module` kept as such)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        head = ["-m", spec.name.removesuffix(".__main__")]
    elif sys.argv and Path(sys.argv[0]).is_file():
        head = [_relative(Path(sys.argv[0]))]
    else:
        head = sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]])


def reproducing_command(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        args: argparse.Namespace) -> str:
    """`prog` plus the options in `args` that differ from the defaults `add_arguments` declares: the command that
    reproduces a run whose options were filled in programmatically (the benches), not read from sys.argv."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = [prog]
    for key, value in vars(args).items():
        if key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is False:  # a --flag/--no-flag option (argparse.BooleanOptionalAction) turned off
            parts.append("--no-" + key.replace("_", "-"))
        else:
            parts.append(" ".join([flag, *map(str, value if isinstance(value, list) else [value])]))
    return " ".join(parts)


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)
