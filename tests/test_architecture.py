"""The layers declared in docs/architecture.md hold: no module imports a module of a higher floor."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def declared_floors() -> dict[str, int]:
    """Module pattern (`dcae.x` or `dcae.x.*`) -> floor number, from the ARCHITECTURE table."""
    section = DOC.read_text().split("## ARCHITECTURE", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for row in re.findall(r"^\| (\d+) [^|]*\| ([^|]*) \|", section, flags=re.M):
        for name in re.findall(r"`([\w.*]+)`", row[1]):
            floors[name] = int(row[0])
    return floors


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    if module in floors:
        return floors[module]
    parts = module.split(".")
    for i in range(len(parts), 0, -1):  # `dcae.diffusion.*` holds the package dcae.diffusion and all under it
        if ".".join(parts[:i]) + ".*" in floors:
            return floors[".".join(parts[:i]) + ".*"]
    return None


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "dcae").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    """Every dcae module `path` imports, at the top or inside a function (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from dcae import train` imports dcae.train
    return {name for name in found if name == "dcae" or name.startswith("dcae.")}


def test_every_module_has_a_floor():
    floors = declared_floors()
    assert floors, f"{DOC}: no ARCHITECTURE table found"
    missing = [m for m in package_modules() if floor_of(m, floors) is None]
    assert not missing, f"add these modules to the ARCHITECTURE table of {DOC.name}: {missing}"


def test_no_module_imports_upward():
    floors, modules = declared_floors(), package_modules()
    upward = []
    for module, path in modules.items():
        mine = floor_of(module, floors)
        for target in imported_modules(path, module):
            if target not in modules:
                continue  # `from dcae.x import name` also yields dcae.x.name, which is not a module
            theirs = floor_of(target, floors)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} (floor {mine}) imports {target} (floor {theirs})")
    assert not upward, "imports that run up a floor (see docs/architecture.md):\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a floor-4 module importing the runtime (floor 5) is reported."""
    fake = tmp_path / "tiling.py"
    fake.write_text("def f():\n    from dcae.runtime import Runtime\n")
    targets = imported_modules(fake, "dcae.tiling")
    floors = declared_floors()
    assert "dcae.runtime" in targets and floor_of("dcae.runtime", floors) > floor_of("dcae.tiling", floors)
    assert floor_of("dcae.commands.reconstruct", floors) == floor_of("dcae.cli", floors)


@pytest.mark.parametrize("script_dir", ["experiments", "benchmarks", "scripts"])
def test_the_package_never_imports_scripts(script_dir):
    for path in (REPO / "dcae").rglob("*.py"):
        assert f"import {script_dir}" not in path.read_text() and f"from {script_dir}" not in path.read_text(), path
