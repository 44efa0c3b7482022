"""The layout is the architecture: imports flow client/ -> shared/ and server/ -> shared/ only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"client": {"server"}, "server": {"client"}, "shared": {"client", "server", "simulations", "tests"}}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_top_levels(p) & FORBIDDEN[package])
                 for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_flower_stays_at_the_edges():
    """Model, data, training and privacy math are plain torch/numpy: no Flower imports."""
    plain = [ROOT / "shared" / name for name in ("model.py", "training.py", "metrics.py", "baselines.py")]
    plain += list((ROOT / "shared" / "data").glob("*.py")) + list((ROOT / "shared" / "privacy").glob("*.py"))
    plain.append(ROOT / "client" / "device.py")
    assert {str(p.relative_to(ROOT)) for p in plain if "flwr" in imported_top_levels(p)} == set()
