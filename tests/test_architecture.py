"""The layout is the architecture.

client/ (device side) and server/ (server side) import shared/ (the core both use); tools/ (what people run)
imports shared/ and drives the apps only by module path strings (`server.app:app`); nothing imports tools/.
The package import graph has no cycles.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared", "tools")
FORBIDDEN = {
    "client": {"server", "tools", "simulations", "tests"},
    "server": {"client", "tools", "simulations", "tests"},
    "shared": {"client", "server", "tools", "simulations", "tests"},
    "tools": {"client", "server", "simulations", "tests"},
}


def imported_modules(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Absolute module names a file imports, at any depth (also inside functions). `from a.b import c` counts
    a.b.c when that is one of `modules`, else a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: relative import; name the module")
    return names


def imported_top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = package_modules()
    return {name: {m for m in imported_modules(path, set(modules)) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = {str(p.relative_to(ROOT)): sorted(imported_top_levels(p) & FORBIDDEN[package])
                 for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles():
    """Module level, every import (also those inside functions): a cycle is a layering mistake even when lazy."""
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_check_sees_a_cycle():
    graph = import_graph()
    graph["tools.deploy.cli"] = graph["tools.deploy.cli"] | {"tools.cli"}  # the cycle this layout removed
    cycle = find_cycle(graph)
    assert cycle is not None and {"tools.cli", "tools.deploy.cli"} <= set(cycle)


def test_flower_stays_at_the_edges():
    """Model, data, training and privacy math are plain torch/numpy: no Flower imports."""
    plain = [ROOT / "shared" / name for name in ("model.py", "training.py", "metrics.py", "baselines.py")]
    plain += list((ROOT / "shared" / "data").glob("*.py")) + list((ROOT / "shared" / "privacy").glob("*.py"))
    plain.append(ROOT / "client" / "device.py")
    assert {str(p.relative_to(ROOT)) for p in plain if "flwr" in imported_top_levels(p)} == set()


def test_every_module_the_cli_loads_is_installed():
    """The `privrec` console script runs with only the installed packages on its path (not the checkout): every
    top-level package that `tools/` imports, statically or by `importlib.import_module("...")`, must be in
    pyproject's package list, or `privrec simulate` fails after training (it did, for `simulations`)."""
    import re
    import tomllib
    from fnmatch import fnmatch

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    loaded = set()
    for path in (ROOT / "tools").rglob("*.py"):
        text = path.read_text()
        loaded |= set(re.findall(r'import_module\(\s*"([A-Za-z_]\w*)', text))
        loaded |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", text, flags=re.M))
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    missing = sorted(name for name in loaded & local if not any(fnmatch(name, pattern) for pattern in include))
    assert "simulations" in loaded, "the check must see the CLI's import of the simulations drivers"
    assert not missing, f"tools/ imports {missing}, which pyproject does not install"
