"""The layout rule of DESIGN.md §1: nothing under backend/service/, backend/queue/ or backend/media/ imports an
adapter (backend/labelstudio/, backend/cvat/) -- not at module level and not inside a function. Adapters are
reached by dotted name at run time (OSPREY_HANDOFF_DELIVERY, OSPREY_MEDIA_ORIGINS), never imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[2] / "backend"
NEUTRAL = ("service", "queue", "media")
ADAPTERS = ("backend.labelstudio", "backend.cvat")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: resolve against the package
            package = path.relative_to(BACKEND.parent).with_suffix("").parts[: -node.level]
            names.append(".".join([*package, *(node.module.split(".") if node.module else [])]))
    return names


@pytest.mark.parametrize("path", sorted(p for part in NEUTRAL for p in (BACKEND / part).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(BACKEND)))
def test_neutral_modules_import_no_adapter(path: Path) -> None:
    bad = [name for name in imported_modules(path) if name.startswith(ADAPTERS)]
    assert bad == [], f"{path.relative_to(BACKEND)} imports adapter code: {bad}"


def test_the_rule_catches_an_adapter_import(tmp_path: Path) -> None:
    sample = BACKEND / "queue" / "jobs.py"
    assert "backend.queue.keys" in imported_modules(sample)  # the walker sees real imports ...
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from backend.labelstudio.client import LabelStudioAuth\n")
    assert any(n.startswith(ADAPTERS) for n in imported_modules(fake))  # ... including function-level ones
