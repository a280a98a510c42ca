"""The order the suite's tests run in on pytest-xdist's workers (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from helpers import order_for_workers

LONG = {"a.py": 100, "b.py": 80, "c.py": 60}


def items(counts: dict) -> list:
    return [SimpleNamespace(path=Path(f"tests/{name}"), i=i) for name, n in counts.items() for i in range(n)]


def test_long_files_start_the_blocks_of_different_workers():
    """Two workers, each handed half the list: the heaviest file starts one half, the next two the
    other (100 against 80 + 60), short files fill both; every test once, each file's tests together."""
    tests = items({"x.py": 30, "a.py": 3, "y.py": 30, "b.py": 4, "c.py": 5, "z.py": 28})
    order = order_for_workers(tests, 2, LONG)
    assert sorted(map(id, order)) == sorted(map(id, tests))
    half = len(order) // 2
    first, second = [t.path.name for t in order[:half]], [t.path.name for t in order[half:]]
    assert first[:3] == ["a.py"] * 3 and first[3:] == ["x.py"] * 30 + ["y.py"] * 17
    assert second[:9] == ["b.py"] * 4 + ["c.py"] * 5 and set(second[9:]) == {"y.py", "z.py"}


def test_one_worker_runs_the_long_files_first():
    tests = items({"x.py": 2, "c.py": 1, "a.py": 1})
    assert [t.path.name for t in order_for_workers(tests, 1, LONG)] == ["a.py", "c.py", "x.py", "x.py"]
