"""simulations/README.md indexes every experiment module, so the next engineer finds each study from one page."""

from __future__ import annotations

import re
from pathlib import Path

SIMULATIONS = Path(__file__).resolve().parent.parent / "simulations"


def test_every_simulations_module_is_in_the_index_and_the_index_names_no_missing_one():
    modules = {p.stem for p in SIMULATIONS.glob("*.py") if p.stem != "__init__"}
    index = (SIMULATIONS / "README.md").read_text()
    # the first column of every table row: one or more `module` names
    listed = {name for row in re.findall(r"^\| (`[^|]+`) \|", index, flags=re.M)
              for name in re.findall(r"`([a-z_]+)`", row)}
    assert modules - listed == set(), f"modules missing from simulations/README.md: {sorted(modules - listed)}"
    assert listed - modules == set(), f"simulations/README.md names missing modules: {sorted(listed - modules)}"
