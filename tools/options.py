"""Run config from the command line: `--config FILE`, `--set KEY=VALUE` and the flags that name a key.

`run_config_from_args`: every command that starts or writes a federated run (`privrec simulate`, `privrec deploy
local`, `privrec deploy run-config`), through `shared.config.resolve_run`, so they share one set of defaults (the
product's default pipeline unless a model is chosen). `config_from_args`: `privrec baseline` and `audit`, on the
schema's defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from shared.errors import PrivrecError

EPSILON_HELP = ("whole-run user-level epsilon to reach (the private pipelines): the noise multipliers of every "
                "release and of the rounds are scaled by one common factor, the smallest that reaches it at the "
                "config's delta, and target-epsilon is set to it")


def parse_set(pairs: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise PrivrecError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from shared.config import resolve

    return resolve(args.config, _explicit_values(args))


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from shared.config import resolve_run

    return resolve_run(args.config, _explicit_values(args))


def _explicit_values(args: argparse.Namespace) -> dict[str, Any]:
    """`--set KEY=VALUE` under the flags that name a key, each checked."""
    from shared.config import check_keys

    overrides = parse_set(getattr(args, "set", None))
    check_keys(overrides, where="--set: ")  # also the values a flag overrides below: a typo is never silent
    flag_keys = {"dataset": "dataset", "rounds": "num-rounds", "devices_per_round": "devices-per-round",
                 "noise_multiplier": "noise-multiplier", "seed": "seed", "run_dir": "run-dir",
                 "run_name": "run-name", "users_per_device": "users-per-device"}
    flags = {key: getattr(args, attr) for attr, key in flag_keys.items() if getattr(args, attr, None) is not None}
    if getattr(args, "no_dp", False):
        flags["dp"] = False
    if getattr(args, "secure_aggregation", False):
        flags["secure-aggregation"] = True
    for key in sorted(set(flags) & set(overrides)):
        if check_keys({key: overrides[key]})[key] != check_keys({key: flags[key]})[key]:
            print(f"privrec: note: --set {key}={overrides[key]} is overridden by its flag ({flags[key]})",
                  file=sys.stderr)
    return {**overrides, **flags}


def apply_epsilon(cfg: dict[str, Any], epsilon: float | None, num_devices: int) -> None:
    """`--epsilon E` (simulate, deploy local, deploy run-config): scale the private pipeline's noise multipliers by
    one common factor, the smallest that keeps the whole run's user-level epsilon <= E
    (`shared.privacy.pipeline.scale_to_epsilon`), and set `target-epsilon` to E; the config's split of the budget
    between the releases and the rounds is kept. Needs the population: q = expected cohort / devices."""
    if epsilon is None:
        return
    from shared.config import SCORER_MODELS, validate
    from shared.privacy.pipeline import planned_sample_rate, scale_to_epsilon

    if cfg["model"] not in SCORER_MODELS:
        raise PrivrecError(f"--epsilon {epsilon:g}: sets the whole-run user-level epsilon of the private pipelines "
                           f"(model = {' or '.join(SCORER_MODELS)}), not of model = {cfg['model']}; for its noise "
                           "multipliers see `privrec calibrate`")
    multipliers, reached = scale_to_epsilon(cfg, planned_sample_rate(cfg, num_devices), epsilon)
    before = {k: cfg[k] for k in multipliers}
    cfg.update(validate({**cfg, **multipliers, "target-epsilon": epsilon}))
    names = {"popularity-noise-multiplier": "popularity release", "cooc-noise-multiplier": "co-occurrence release",
             "transition-noise-multiplier": "transition release", "user-noise-multiplier": "rounds"}
    shown = ", ".join(f"{names[k]} {before[k]:g} -> {z:g}" for k, z in multipliers.items())
    print(f"privrec: --epsilon {epsilon:g}: noise multipliers scaled by one factor ({shown}) to reach user-level "
          f"epsilon {reached:.3f} <= {epsilon:g} ({cfg['accountant']}, delta {cfg['delta']:g}, {num_devices} devices)",
          flush=True)
