"""The order and grouping of tests under pytest-xdist (tests/conftest.py)."""

from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent


class _Item:
    def __init__(self, file: str, name: str):
        self.path = TESTS / file
        self.nodeid = f"tests/{file}::{name}"
        self.marks = []

    def add_marker(self, mark):
        self.marks.append(mark.mark)


def _collected() -> list[_Item]:
    return [_Item("test_accounting.py", "test_a"), _Item("test_deployment.py", "test_b"),
            _Item("test_faults.py", "test_c"), _Item("test_secagg_deployment.py", "test_d"),
            _Item("test_deployment.py", "test_e"), _Item("test_zzz.py", "test_f")]


def test_every_named_file_exists():
    for name in [*conftest.DEPLOYMENT_FILES, *conftest.REAL_PROCESS_NEXT]:
        assert (TESTS / name).is_file(), name


def test_under_workers_the_deployment_files_go_first_then_the_other_real_process_tests(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    items = _collected()
    conftest.pytest_collection_modifyitems(None, items)
    assert [item.nodeid.split("::")[1] for item in items] == ["test_b", "test_d", "test_e", "test_c", "test_a",
                                                              "test_f"]


def test_without_workers_nothing_changes(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    items = _collected()
    conftest.pytest_collection_modifyitems(None, items)
    assert [item.nodeid for item in items] == [item.nodeid for item in _collected()]
    assert not any(item.marks for item in items)
