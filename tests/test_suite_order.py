"""The order tests run in under pytest-xdist (tests/conftest.py): the slowest first, a quick one behind each."""

import ast
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent


class _Item:
    def __init__(self, nodeid: str):
        self.nodeid = nodeid


def test_every_listed_slow_test_exists():
    """A renamed test would silently lose its place at the front: every name must still be a test function."""
    for name in conftest.SLOWEST_FIRST:
        file, function = name.split("::")
        tree = ast.parse((TESTS / file).read_text())
        assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, name


def test_under_workers_the_slowest_go_first_with_a_quick_one_behind_each(monkeypatch):
    slow = [f"tests/{name}" for name in conftest.SLOWEST_FIRST]
    quick = [f"tests/test_quick.py::test_{i}" for i in range(5)]
    collected = [_Item(nodeid) for nodeid in quick[:2] + slow[::-1] + quick[2:]]  # files' order: slow ones late
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    items = list(collected)
    conftest.pytest_collection_modifyitems(None, items)
    assert [item.nodeid for item in items] == slow[:3] + quick[:3] + slow[3:] + quick[3:]


def test_without_workers_the_files_order_is_kept(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    collected = [_Item(f"tests/test_quick.py::test_{i}") for i in range(3)]
    collected.append(_Item(f"tests/{conftest.SLOWEST_FIRST[0]}"))
    items = list(collected)
    conftest.pytest_collection_modifyitems(None, items)
    assert items == collected
