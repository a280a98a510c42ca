"""Every ```python block of the README and of docs/*.md runs as written.

The blocks of one page run in order in one namespace (a later block may use
an earlier one's names), in an empty temporary folder.  Examples that are
not meant to run are fenced as ```text or ```bash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose examples train or compile: the quick run (-m "not slow") leaves them out.
SLOW_PAGES = {"training.md", "single_label.md"}


def python_blocks(text: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p for p in PAGES],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{page.name} has no python example")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_example"}
    for number, code in enumerate(blocks, 1):
        exec(compile(code, f"{page.relative_to(ROOT)} (python block {number})", "exec"), namespace)


def test_docs_links_resolve():
    """Relative links between the pages point at files that exist."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
