"""Whether a run directory's checkpoint can be continued with a given config.

The launcher and the ServerApp both ask before they write anything into the run directory, so a
refused resume leaves config.json, run-config.toml and status.json as the earlier run left them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.config import aggregation_in_effect, defaults
from shared.errors import PrivrecError

CHECKPOINT_DIR = "checkpoint"
# A run can only continue with the same model and the same aggregation.
MUST_MATCH = ("strategy", "max-len", "hidden-size", "num-heads", "num-blocks", "server-lr", "server-tau", "dp",
              "noise-multiplier", "max-grad-norm", "accountant", "delta", "window", "item-representation",
              # user-level accounting composes one (noise, q) over every round of the run
              "user-dp", "user-noise-multiplier", "user-clipping-norm", "devices-per-round", "fraction-train",
              "deploy-devices",  # the population the user-level q is computed over
              "sample-rate",  # on-device q: some accountants (gdp) need it fixed across rounds
              "aggregation", "model-average",  # the round's model, and the released average's decay
              "row-momentum")  # per-row aggregation's server momentum (its velocity is in the checkpoint)


def checkpoint_state(run_path: Path) -> dict[str, Any] | None:
    """checkpoint/state.json of the run, or None when there is no checkpoint."""
    path = Path(run_path) / CHECKPOINT_DIR / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError("no 'config' object")
    except (OSError, ValueError) as exc:
        raise PrivrecError(f"{path.parent}: unreadable checkpoint ({exc}); set resume = false or choose "
                           "another run-name to start over") from None
    return state


def refuse_incompatible(state: dict[str, Any], cfg: dict[str, Any], directory: Path) -> None:
    for key in MUST_MATCH:
        if key in state["config"] and _in_effect(key, state["config"]) != _in_effect(key, cfg):
            raise PrivrecError(f"{directory}: written with config key '{key}' = {state['config'].get(key)!r}, "
                               f"this run has {cfg[key]!r}; resume with the same value or choose another run-name")
    if int(state.get("round", 0)) > cfg["num-rounds"]:
        raise PrivrecError(f"{directory}: already at round {state.get('round')}, more than num-rounds = "
                           f"{cfg['num-rounds']}")


def check_resumable(run_path: Path, cfg: dict[str, Any]) -> int | None:
    """The checkpointed round this config would continue from (None: no checkpoint, or resume = false);
    PrivrecError when the checkpoint cannot be continued with `cfg`."""
    if not cfg["resume"]:
        return None
    state = checkpoint_state(run_path)
    if state is None:
        return None
    refuse_incompatible(state, cfg, Path(run_path) / CHECKPOINT_DIR)
    return int(state.get("round", 0))


def _in_effect(key: str, values: dict[str, Any]) -> Any:
    """The value that shapes the run: `aggregation = auto` compares as the fedavg or per-row it stands for
    (so a DP run written under the old default `fedavg` continues under `auto`)."""
    if key == "aggregation":
        return aggregation_in_effect({**defaults(), **values})
    return values[key]
