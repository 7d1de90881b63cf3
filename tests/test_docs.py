"""The README is a short landing page, its links and the docs' links resolve, and its Quick start block
holds the two commands CI reads (.ci/run runs the second one verbatim)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](path) and [text](path#anchor)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"(https?:|mailto:|#)", target):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_quick_start_has_two_commands():
    # The same pattern as .ci/run.
    block = re.search(r"^#+\s*quick ?start.*?```[^\n]*\n(.*?)```", README.read_text(), re.I | re.S | re.M).group(1)
    cmds = [l.strip() for l in block.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(cmds) == 2, cmds
    assert "pytest" in cmds[1]
