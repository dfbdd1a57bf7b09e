"""The documentation stays true: every setting is documented, every doc link resolves, the README keeps
its shape (the two commands first, then a picture, then links)."""

from __future__ import annotations

import re
from pathlib import Path

from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_configuration_doc():
    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}: run `python -m backend.settings --markdown`"


def test_relative_links_in_docs_resolve():
    broken = []
    for md in [REPO / "README.md", REPO / "backend" / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_starts_with_the_two_commands_then_a_picture():
    text = (REPO / "README.md").read_text()
    run, test, picture = text.find("make run"), text.find("make test"), text.find("![")
    assert 0 < run < picture and 0 < test < picture
    assert "## " not in text[:picture], "the two commands and the picture come before any section"
