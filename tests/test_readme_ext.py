"""The README's snippets for Pyramid ViG / single-label classification and
for point clouds run as written (the first ```python block of each section)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ["## Single-label classification: Pyramid ViG and the paper's Table 5", "## Point clouds"]


def first_python_block(text: str, heading: str) -> str:
    if heading not in text:
        pytest.fail(f"{README} has no heading {heading!r}")
    section = text.split(heading, 1)[1]
    block = re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    if block is None or re.search(r"^#{1,6} ", section[: block.start()], flags=re.M):
        pytest.fail(f"the README section {heading!r} has no ```python block")
    return block.group(1)


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_snippet_runs(heading, tmp_path, monkeypatch):
    if heading == "## Point clouds":
        pytest.importorskip("torch_cluster")
    monkeypatch.chdir(tmp_path)  # the snippets read no file of the checkout
    code = first_python_block(README.read_text(encoding="utf-8"), heading)
    exec(compile(code, f"{README}:{heading}", "exec"), {"__name__": "readme_snippet"})
