"""The layout rule of DESIGN.md §1 as a test: the tool-neutral middle never imports a tool adapter.

Reads the import statements of every module under backend/service, backend/queue and backend/media
(static: `import x` / `from x import y`, also inside functions, and relative imports resolved), so a lazy
import inside a function cannot hide a dependency either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEUTRAL = ("backend/service", "backend/queue", "backend/media")
ADAPTERS = ("backend.labelstudio", "backend.cvat")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def neutral_modules() -> list[Path]:
    return sorted(p for folder in NEUTRAL for p in (REPO / folder).rglob("*.py"))


def test_there_are_neutral_modules():
    assert len(neutral_modules()) >= 5


@pytest.mark.parametrize("path", neutral_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_neutral_module_imports_no_adapter(path: Path):
    bad = sorted(m for m in imports_of(path) if m.startswith(ADAPTERS))
    assert not bad, f"{path.relative_to(REPO)} imports adapter code: {bad}"


def test_core_imports_nothing_of_the_backend_or_training():
    offenders = {}
    for path in sorted((REPO / "osprey_core").rglob("*.py")):
        bad = sorted(m for m in imports_of(path) if m.startswith(("backend", "training")))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_training_imports_no_adapter():
    offenders = {}
    for path in sorted((REPO / "training").rglob("*.py")):
        bad = sorted(m for m in imports_of(path) if m.startswith(ADAPTERS))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path):
    probe = REPO / "backend" / "service" / "_layout_probe.py"
    probe.write_text("def f():\n    from ..labelstudio import routes\n    import backend.cvat.x\n")
    try:
        found = imports_of(probe)
    finally:
        probe.unlink()
    assert "backend.labelstudio" in found and "backend.cvat.x" in found
