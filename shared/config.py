"""The run-config schema: every key a privrec run accepts, its type, default, range and meaning.

One schema serves the `privrec` CLI, `--config FILE`, and Flower's `context.run_config`
(`[tool.flwr.app.config]` in pyproject.toml holds the same defaults; a test keeps them in step).
Validation happens here, once, and raises `PrivrecError` naming the key and the value at fault.
"""

from __future__ import annotations

import difflib
import math
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from shared.errors import PrivrecError


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # says in words what `check` demands, for the error message
    # Float keys must be finite: `inf > 0` passes every range check and then fails on each device,
    # after it has reserved privacy spend. No key needs inf or nan today; one that does says so here.
    allow_nonfinite: bool = False


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


# Enumerations: the one list of each (other modules import them from here).
STRATEGIES = ("fedavg", "fedadam", "fedprox")
AGGREGATIONS = ("auto", "fedavg", "per-row")
ACCOUNTANTS = ("rdp", "prv", "gdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
OPTIMIZERS = ("adam", "sgd")
TRAINABLE_SCOPES = ("all", "no-item-tables")  # what a device trains (shared.model.FROZEN_BY_SCOPE)
REPRESENTATIONS = ("id", "text", "text+id")
MODELS = ("sasrec", "content-scorer", "channel-scorer")
SCORER_MODELS = ("content-scorer", "channel-scorer")  # the private pipelines (issue 13): one shape of run

# the data and the simulated population
_DATA: dict[str, Key] = {
    "dataset": Key(str, "ml-100k", "'ml-100k', or a path to a MovieLens/RecBole/CSV file or folder",
                   lambda v: bool(v.strip()), "must not be empty"),
    "data-store": Key(str, "", "prepared device store folder; empty = prepare it from `dataset`"),
    "users-per-device": Key(int, 1, "users whose histories live on one device", _positive, "must be >= 1"),
    "population-dir": Key(str, "", "simulation: folder of the simulated devices' privacy ledgers, shared by every "
                                   "run on the store; empty = <data-store>.population beside the store (pass a "
                                   "fresh folder for fresh simulated people)"),
    "cold-item-share": Key(float, 0.0, "cold-start protocol: share of items (drawn with `seed`) kept out of "
                                       "every training window and evaluated separately; 0 = off",
                           lambda v: 0 <= v < 1, "must be in [0, 1)"),
}
# what a run trains, and the levers of the private content-scorer pipeline (issue 13)
_PIPELINE: dict[str, Key] = {
    "model": Key(str, "sasrec", "what is trained: sasrec (the sequence model below), content-scorer (a DP "
                                "popularity release as federated analytics, then user-level DP-FedAvg of 387 "
                                "weights over public text features and on-device profiles; shared/scorer.py), or "
                                "channel-scorer (DP popularity, then DP windowed co-occurrence among the "
                                "cooc-items it ranks highest, then user-level DP-FedAvg of 9 weights over "
                                "on-device score channels; the default of `privrec simulate`)",
                 _one_of(*MODELS), "must be one of " + ", ".join(MODELS)),
    "popularity-noise-multiplier": Key(float, 4.0, "content-scorer: noise std of the user-level DP popularity "
                                                   "release (sensitivity 1: each user's item set / sqrt(n))",
                                       _positive, "must be > 0"),
    "profile-items": Key(int, 5, "content-scorer: last items of the user's history in the on-device profile",
                         _positive, "must be >= 1"),
    "profile-decay": Key(float, 0.8, "content-scorer: weight decay^k of the k-th most recent item in the profile",
                         lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "scorer-targets": Key(int, 10, "content-scorer: a device's gradient is of its mean loss over its last N "
                                   "training items", _positive, "must be >= 1"),
    "cooc-noise-multiplier": Key(float, 3.0, "channel-scorer: noise std of the user-level DP windowed "
                                             "co-occurrence release (sensitivity 1: each user's pair vector "
                                             "L2-normalised)", _positive, "must be > 0"),
    "cooc-items": Key(int, 100, "channel-scorer: the co-occurrence release covers the pairs among the items the "
                                "released popularity ranks highest (post-processing)",
                      lambda v: v >= 2, "must be >= 2"),
    "cooc-window": Key(int, 10, "channel-scorer: pairs at distance <= N in a user's training sequence count "
                                "(weight 0.9^(distance-1))", _positive, "must be >= 1"),
    "transition-release": Key(bool, False, "channel-scorer: also release, as user-level DP federated analytics, "
                                           "each user's directed (previous -> next) transition counts among the "
                                           "transition-items items the released popularity ranks highest "
                                           "(L2-normalised per user: sensitivity 1), and score them on the device "
                                           "as one more trained channel (opt-in; composed in the run's accountant)"),
    "transition-noise-multiplier": Key(float, 2.76, "channel-scorer with transition-release: noise std of the "
                                                    "user-level DP transition release (sensitivity 1)",
                                       _positive, "must be > 0"),
    "transition-items": Key(int, 512, "channel-scorer with transition-release: the release covers the transitions "
                                      "among the items the released popularity ranks highest (post-processing); "
                                      "the model every round ships carries N x N floats (512: 1 MiB)",
                            lambda v: v >= 2, "must be >= 2"),
    "target-epsilon": Key(float, 2.0, "content-/channel-scorer: user-level budget of the whole run (every "
                                      "analytics release + every round, composed); a config that would exceed "
                                      "it is refused before anything starts (0 = no cap)",
                          _non_negative, "must be >= 0"),
}
# the SASRec model's architecture
_MODEL: dict[str, Key] = {
    "max-len": Key(int, 50, "longest history the model attends to", _positive, "must be >= 1"),
    "hidden-size": Key(int, 64, "embedding and attention width", _positive, "must be >= 1"),
    "num-heads": Key(int, 2, "attention heads per block", _positive, "must be >= 1"),
    "num-blocks": Key(int, 2, "self-attention blocks", _positive, "must be >= 1"),
    "dropout": Key(float, 0.2, "dropout probability", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "item-representation": Key(str, "id", "how the model knows items: id (a trainable embedding per item), "
                                          "text (frozen all-MiniLM-L6-v2 vectors of title, year and genres "
                                          "through trainable projections), text+id (both)",
                               _one_of(*REPRESENTATIONS), "must be one of " + ", ".join(REPRESENTATIONS)),
}
# the federation: rounds, cohorts, aggregation (the server's settings)
_FEDERATION: dict[str, Key] = {
    "strategy": Key(str, "fedavg", "server aggregation: " + ", ".join(STRATEGIES),
                    _one_of(*STRATEGIES), "must be one of " + ", ".join(STRATEGIES)),
    "num-rounds": Key(int, 10, "federated rounds", _positive, "must be >= 1"),
    "devices-per-round": Key(int, 64, "devices trained per round (0 = use fraction-train)",
                             _non_negative, "must be >= 0"),
    "fraction-train": Key(float, 0.0, "share of devices trained per round, used when devices-per-round = 0",
                          lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "server-lr": Key(float, 0.01, "server learning rate (FedAdam's eta)", _positive, "must be > 0"),
    "server-tau": Key(float, 1e-3, "FedAdam's tau, added to the root of its second moment: the floor of its "
                                   "per-coordinate scaling (1e-3 is Flower's default)", _positive, "must be > 0"),
    "proximal-mu": Key(float, 0.0, "FedProx proximal weight (strategy = fedprox)", _non_negative,
                       "must be >= 0"),
    "aggregation": Key(str, "auto", "how the round's model is made from the replies: fedavg (weighted mean), "
                                    "per-row (each item_emb row averaged over the devices that changed it; "
                                    "non-private runs only), or auto (per-row where it is allowed: dp, user-dp "
                                    "and secure-aggregation false, devices-per-node 1, item-representation not "
                                    "text; else fedavg)",
                       _one_of(*AGGREGATIONS), "must be one of " + ", ".join(AGGREGATIONS)),
    "row-momentum": Key(float, 0.0, "server momentum on the item_emb rows under per-row aggregation (FedAvgM, "
                                    "server rate 1, on those rows only; the rest of the model takes FedAvg's "
                                    "step); 0 = the plain per-row mean; no effect under fedavg aggregation",
                        lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model-average": Key(float, 0.0, "decay of a running average of the global model over rounds, which is "
                                     "evaluated centrally and released as model.pt (training continues from "
                                     "the global model); 0 = off", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "eval-every": Key(int, 5, "federated evaluation every N rounds (and after the last); 0 = only after the last",
                      _non_negative, "must be >= 0"),
    "fraction-evaluate": Key(float, 1.0, "share of devices that evaluate in an evaluation round",
                             lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "central-eval": Key(bool, True, "simulation only: also evaluate the global model on every user's "
                                    "held-out items on the server (reads every user's test item)"),
    "seed": Key(int, 0, "seed for model init and the server's choice of devices", _non_negative,
                "must be >= 0"),
    "deterministic-devices": Key(bool, False, "simulation only: derive each device's sampling and DP noise "
                                              "from `seed` so runs repeat exactly; whoever knows the seed "
                                              "can subtract the noise, so never use it in a deployment"),
    "public-share": Key(float, 0.0, "simulation: share of users who consent to share their training histories "
                                    "for non-private pretraining on the server before federation (they get "
                                    "no privacy guarantee; with model = channel-scorer the pretrained SASRec is "
                                    "one more channel of the scorer)", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "public-epochs": Key(int, 20, "epochs of server-side pretraining on the consenting users", _positive,
                         "must be >= 1"),
    "devices-per-node": Key(int, 1, "simulation only: simulated devices one Flower node hosts (consecutive "
                                    "devices, each trained as on its own, sent one message per node; a "
                                    "deployment has one device per SuperNode)", _positive, "must be >= 1"),
    "round-timeout": Key(float, 3600.0, "seconds the server waits for replies in a round; late or lost "
                                        "devices are left out of that round", _positive, "must be > 0"),
}
# on-device training and its DP-SGD (record-level DP); delta and accountant serve both levels
_DEVICE: dict[str, Key] = {
    "local-epochs": Key(int, 1, "local passes over the device's windows per round", _positive, "must be >= 1"),
    "local-lr": Key(float, 0.005, "local Adam learning rate", _positive, "must be > 0"),
    "batch-size": Key(int, 8, "local batch size; under DP the fixed divisor of each step's noisy gradient sum "
                              "(never the device's own expected batch, which would depend on its data)",
                      _positive, "must be >= 1"),
    "sample-rate": Key(float, 1.0, "DP only: Poisson rate q at which each window joins each DP-SGD step; a round "
                                   "takes local-epochs x ceil(1 / q) steps whatever the device's window count",
                       lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "window": Key(int, 50, "interactions per training example (the privacy unit)",
                  lambda v: v >= 2, "must be >= 2"),
    "local-optimizer": Key(str, "adam", "on-device optimizer: adam, sgd", _one_of(*OPTIMIZERS),
                           "must be one of " + ", ".join(OPTIMIZERS)),
    "device-trains": Key(str, "all", "what a device trains: all, or no-item-tables (item embedding and output "
                                     "weights, and text projections, stay global; DP noise falls on far "
                                     "fewer parameters)",
                         _one_of(*TRAINABLE_SCOPES), "must be one of " + ", ".join(TRAINABLE_SCOPES)),
    "dp": Key(bool, True, "DP-SGD on the device (Opacus)"),
    "noise-multiplier": Key(float, 1.0, "DP-SGD noise std / clipping norm (> 0 when dp = true)", _non_negative,
                            "must be >= 0"),
    "max-grad-norm": Key(float, 1.0, "per-example gradient clipping norm", _positive, "must be > 0"),
    "max-epsilon": Key(float, 0.0, "per-device cap on cumulative epsilon: a device whose next round would pass "
                                   "it declines and never trains again with its ledger (0 = no cap)",
                       _non_negative, "must be >= 0"),
    "delta": Key(float, 1e-5, "delta at which epsilon is reported", lambda v: 0 < v < 1, "must be in (0, 1)"),
    "accountant": Key(str, "rdp", "privacy accountant: " + ", ".join(ACCOUNTANTS),
                      _one_of(*ACCOUNTANTS), "must be one of " + ", ".join(ACCOUNTANTS)),
    "grad-sample-mode": Key(str, "hooks", "Opacus per-example gradient mode: " + ", ".join(GRAD_SAMPLE_MODES),
                            _one_of(*GRAD_SAMPLE_MODES), "must be one of " + ", ".join(GRAD_SAMPLE_MODES)),
}
# user-level DP (DP-FedAvg on the server)
_USER_DP: dict[str, Key] = {
    "user-dp": Key(bool, False, "user-level DP: Poisson-sample devices, clip each device's update to "
                                "user-clipping-norm and add Gaussian noise to their sum (DP-FedAvg)"),
    "user-noise-multiplier": Key(float, 1.0, "DP-FedAvg noise std / user-clipping-norm", _positive, "must be > 0"),
    "user-clipping-norm": Key(float, 0.5, "L2 bound on one device's model update (DP-FedAvg)", _positive,
                              "must be > 0"),
}
# secure aggregation (SecAgg+ over the Message API: server/secagg.py, client/secagg.py)
_SECURE_AGGREGATION: dict[str, Key] = {
    "secure-aggregation": Key(bool, False, "SecAgg+: devices mask their updates; the server unmasks only the sum "
                                           "of at least max(secagg-threshold, secagg-min-cohort) devices"),
    "secagg-threshold": Key(int, 8, "Shamir threshold t: shares needed to rebuild a device's secrets; each "
                                    "device has 2(t-1) neighbours", lambda v: v >= 2, "must be >= 2"),
    "secagg-clip-range": Key(float, 2.0, "update coordinates are clipped to [-r, r] before quantization",
                             _positive, "must be > 0"),
    "secagg-quantization-bits": Key(int, 16, "bits per quantized coordinate; devices x (2^bits - 1) must stay "
                                             "below 2^32", lambda v: 1 <= v <= 30, "must be in [1, 30]"),
    "secagg-min-cohort": Key(int, 8, "m_min: the fewest devices whose sum the server unmasks; under user-dp "
                                     "each device adds noise variance (z C)^2 / m_min",
                             _positive, "must be >= 1"),
    "secagg-release-min-cohort": Key(int, 0, "content-/channel-scorer: m_min of the analytics releases, which "
                                             "every device joins (so it may be near the population): the fewest "
                                             "devices whose release sum the server unmasks; each device adds noise "
                                             "variance z^2 / it (0 = secagg-min-cohort)",
                                     _non_negative, "must be >= 0"),
}
# where and how a run is recorded
_OUTPUTS: dict[str, Key] = {
    "run-dir": Key(str, "runs", "folder that receives runs/<run-id>/"),
    "run-name": Key(str, "", "run id (folder name); empty = time stamp"),
    "resume": Key(bool, True, "continue from runs/<run-id>/checkpoint/ when it exists (same run-name)"),
}
# deployment (real SuperNodes)
_DEPLOYMENT: dict[str, Key] = {
    "catalogue": Key(str, "", "deployment: DEVICES_DIR/catalogue from `privrec data split`; when set, the "
                              "ServerApp reads only this public catalogue and never any device data"),
    "deploy-devices": Key(int, 0, "deployment: SuperNodes taking part (0 = every device in the catalogue)",
                          _non_negative, "must be >= 0"),
}

# Section name -> its keys; each section becomes one frozen dataclass below (field = key with "_",
# or the name in RENAMED).
SECTIONS: dict[str, dict[str, Key]] = {"data": _DATA, "pipeline": _PIPELINE, "model": _MODEL,
                                       "federation": _FEDERATION,
                                       "device": _DEVICE, "user_dp": _USER_DP,
                                       "secure_aggregation": _SECURE_AGGREGATION, "outputs": _OUTPUTS,
                                       "deployment": _DEPLOYMENT}
RENAMED = {"local-epochs": "epochs", "local-lr": "lr", "local-optimizer": "optimizer", "device-trains": "trainable",
           "user-dp": "enabled", "user-noise-multiplier": "noise_multiplier", "user-clipping-norm": "clipping_norm",
           "secure-aggregation": "enabled", "secagg-threshold": "threshold", "secagg-clip-range": "clip_range",
           "secagg-quantization-bits": "quantization_bits", "secagg-min-cohort": "min_cohort",
           "secagg-release-min-cohort": "release_min_cohort"}
SCHEMA: dict[str, Key] = {name: key for section in SECTIONS.values() for name, key in section.items()}


def field_name(key: str) -> str:
    """The attribute a config key has in its section (`local-lr` -> `device.lr`)."""
    return RENAMED.get(key, key.replace("-", "_"))


def default_run_name() -> str:
    """A run id for `runs/<run-id>/` when the user gives none: time stamp plus process id."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 100000:05d}"


def defaults() -> dict[str, Any]:
    return {name: key.default for name, key in SCHEMA.items()}


def _unknown_key_message(name: str, where: str) -> str:
    close = difflib.get_close_matches(name, SCHEMA, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}unknown config key '{name}'{hint}"


def _parse_number(text: str, want: type) -> int | float | None:
    """`text` as an int or float (Python's own syntax), or None when it is not one."""
    try:
        return want(text)
    except ValueError:
        return None


def _coerce(name: str, value: Any, where: str) -> Any:
    want = SCHEMA[name].type
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and (number := _parse_number(value, int)) is not None:
            return number
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and (number := _parse_number(value, float)) is not None:
            return number
    elif want is str:
        if isinstance(value, str):
            return value
    raise PrivrecError(f"{where}config key '{name}': {value!r} is not a valid {want.__name__}")


def validate(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Full config from `values` (may be partial: defaults fill the rest), checked key by key.

    `where` prefixes error messages (e.g. "sim.toml: ") so the user knows which input is wrong.
    """
    resolved = defaults()  # valid by construction (tests/test_config.py)
    resolved.update(check_keys(values, where))
    _check_relations(resolved, where)
    return resolved


def check_keys(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Each of `values` known, of its type, finite and in range (relations between keys are not checked)."""
    out = {}
    for name, value in values.items():
        if name not in SCHEMA:
            raise PrivrecError(_unknown_key_message(name, where))
        out[name] = _coerce(name, value, where)
        wrong = out_of_range(name, out[name])
        if wrong:
            raise PrivrecError(f"{where}config key '{name}' = {out[name]!r}: {wrong}")
    return out


def out_of_range(name: str, value: Any) -> str | None:
    """What is wrong with `value` (already of the key's type) for key `name`, in words; None when it is fine."""
    key = SCHEMA[name]
    if key.type is float and not key.allow_nonfinite and not math.isfinite(value):
        return "must be a finite number"
    if key.check is not None and not key.check(value):
        return key.rule
    return None


def strict_problem(name: str, value: Any) -> str | None:
    """`out_of_range`, for a value that did not come through this schema (a library caller's argument):
    its type must already be the key's (no string or float-to-int coercion)."""
    want = SCHEMA[name].type
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, (int, np.integer)) and not isinstance(value, bool), float: numeric}[want]
    return out_of_range(name, value) if ok else f"must be a {want.__name__}"


def heads_problem(hidden_size: int, num_heads: int) -> str | None:
    """Attention heads split the width evenly."""
    return None if hidden_size % num_heads == 0 else \
        f"hidden-size = {hidden_size} must be divisible by num-heads = {num_heads}"


def unnoised_problem(dp: bool, noise_multiplier: float) -> str | None:
    """DP with noise 0: Opacus would clip but add no noise, and unnoised updates would leave under a "DP" label.

    The one privacy check every entry checks, the run config and a direct `train_local` call alike.
    """
    if dp and noise_multiplier == 0:
        return ("'noise-multiplier' = 0 with 'dp' = true adds no noise; set noise-multiplier > 0, or dp = false "
                "for a non-private run")
    return None


def per_row_problem(cfg: Mapping[str, Any]) -> str | None:
    """Why `aggregation = per-row` cannot run with `cfg` (the rest of a sentence), or None when it can."""
    # Which rows a device changed names the items in its windows; under DP every row is noised anyway.
    for key in ("dp", "user-dp"):
        if cfg[key]:
            return (f"reveals which items each device holds: it needs '{key}' = false (a non-private run), "
                    "or aggregation = fedavg")
    if cfg["devices-per-node"] > 1:
        return (f"needs one reply per device, which devices-per-node = {cfg['devices-per-node']} merges on the "
                "node: set devices-per-node = 1, or use aggregation = fedavg (or auto)")
    if cfg["secure-aggregation"]:
        # The server sees only the cohort's sum, so there is no device update to take rows from.
        return ("needs each device's update, which secure-aggregation = true hides from the server: "
                "use aggregation = fedavg (or auto)")
    if cfg["item-representation"] == "text":
        return ("averages rows of the item embedding, which item-representation = text has none of: "
                "use id or text+id, or fedavg")
    return None


def aggregation_in_effect(cfg: Mapping[str, Any]) -> str:
    """"fedavg" or "per-row": what `aggregation` means for this run (`auto`: per-row wherever it is allowed).

    Per-row averaging closes most of the non-private federation's gap to centralized training (README,
    issue 12); the private and secure modes cannot use it, so `auto` falls back to FedAvg there.
    """
    if cfg["aggregation"] == "auto":
        return "fedavg" if per_row_problem(cfg) else "per-row"
    return cfg["aggregation"]


def _check_relations(cfg: Mapping[str, Any], where: str) -> None:
    if heads_problem(cfg["hidden-size"], cfg["num-heads"]):
        raise PrivrecError(f"{where}config key 'hidden-size' = {cfg['hidden-size']} must be divisible by "
                           f"'num-heads' = {cfg['num-heads']}")
    if cfg["window"] - 1 > cfg["max-len"]:
        raise PrivrecError(f"{where}config key 'window' = {cfg['window']}: a window feeds window-1 = "
                           f"{cfg['window'] - 1} items to the model, more than 'max-len' = {cfg['max-len']}")
    unnoised = unnoised_problem(cfg["dp"], cfg["noise-multiplier"])
    if unnoised:
        raise PrivrecError(f"{where}config key {unnoised}")
    if cfg["proximal-mu"] > 0 and cfg["strategy"] != "fedprox":
        # Only FedProx sends the proximal weight to the devices: under another strategy it would do nothing.
        raise PrivrecError(f"{where}config key 'proximal-mu' = {cfg['proximal-mu']} has no effect with "
                           f"'strategy' = {cfg['strategy']}: set strategy = fedprox, or proximal-mu = 0")
    if cfg["aggregation"] == "per-row":
        problem = per_row_problem(cfg)
        if problem:
            raise PrivrecError(f"{where}config key 'aggregation' = per-row {problem}")
    if cfg["model"] in SCORER_MODELS:
        _check_content_scorer(cfg, where)
    if cfg["transition-release"]:
        _check_transition_release(cfg, where)
    if cfg["devices-per-round"] == 0 and cfg["fraction-train"] == 0:
        raise PrivrecError(f"{where}config keys 'devices-per-round' and 'fraction-train' are both 0: "
                           "no device would train")
    if cfg["secure-aggregation"] and cfg["devices-per-round"] > 0:
        check_secure_aggregation(cfg, cfg["devices-per-round"], where)
    if cfg["devices-per-node"] > 1:
        for key, clash in (("secure-aggregation", cfg["secure-aggregation"]),
                           ("aggregation", cfg["aggregation"] == "per-row"), ("catalogue", bool(cfg["catalogue"])),
                           ("model", cfg["model"] in SCORER_MODELS)):
            # one reply per device (masks, changed rows), a real SuperNode per device, or device code that
            # client/node.py does not host (the content scorer's)
            if clash:
                raise PrivrecError(f"{where}config key 'devices-per-node' = {cfg['devices-per-node']} cannot be "
                                   f"combined with '{key}' = {cfg[key]!r}: set devices-per-node = 1")


def _check_transition_release(cfg: Mapping[str, Any], where: str) -> None:
    """`transition-release = true` is a channel-scorer release, made in clear to the server (no SecAgg path)."""
    if cfg["model"] != "channel-scorer":
        raise PrivrecError(f"{where}config key 'transition-release' = true needs model = channel-scorer (model = "
                           f"{cfg['model']}); set transition-release = false")
    if cfg["secure-aggregation"]:
        # its K x K contribution would go through the SecAgg+ quantizer untested: refused rather than claimed
        raise PrivrecError(f"{where}config key 'transition-release' = true cannot be combined with "
                           "'secure-aggregation' = true (the transition release has no secure-aggregation path "
                           "yet); set transition-release = false")


def _check_content_scorer(cfg: Mapping[str, Any], where: str) -> None:
    """What model = content-/channel-scorer needs: its guarantee is user-level DP-FedAvg, and nothing else of it
    exists."""
    model = cfg["model"]
    needs = {"dp": (False, "it runs no on-device DP-SGD (its guarantee is user-level: user-dp)"),
             "user-dp": (True, "its rounds are released only under user-level DP-FedAvg"),
             "model-average": (0.0, "its accountant covers the global models only")}
    if model == "content-scorer":  # the channel scorer takes a consenting cohort's SASRec as one more channel
        needs["public-share"] = (0.0, "it has no consenting cohort (model = channel-scorer has one, as a channel)")
    for key, (wanted, why) in needs.items():
        if cfg[key] != wanted:
            shown = str(wanted).lower() if isinstance(wanted, bool) else wanted
            raise PrivrecError(f"{where}config key '{key}' = {cfg[key]!r} with model = {model}: {why}; "
                               f"set {key} = {shown}, or model = sasrec")
    if cfg["accountant"] == "gdp":
        raise PrivrecError(f"{where}config key 'accountant' = gdp with model = {model}: Opacus' gdp cannot "
                           "compose the analytics releases with the rounds; use rdp or prv")


# The content-scorer pipeline (the default until the channel scorer, kept as a recipe): the DP popularity
# release then user-level DP-FedAvg of the content scorer, total user-level epsilon 1.97 at delta 1e-5 (Opacus
# RDP). Chosen by the developers from ML-100K validation figures (q 0.25/0.5/1, 10-20 rounds, server-lr 0.1-0.3,
# two noise seeds); that choice is not in the run's epsilon (README says so).
CONTENT_SCORER_PIPELINE: dict[str, Any] = {
    "model": "content-scorer", "dp": False, "user-dp": True, "strategy": "fedadam", "server-lr": 0.2,
    "num-rounds": 10, "devices-per-round": 0, "fraction-train": 0.25, "user-noise-multiplier": 2.5,
    "user-clipping-norm": 1.0, "eval-every": 0, "popularity-noise-multiplier": 4.0, "scorer-targets": 10,
}
# `privrec simulate` with no `model` given runs the channel-scorer pipeline (issue 13): DP popularity (z 4.6),
# DP windowed co-occurrence among the 100 items it ranks highest (z 2.76), then 5 rounds of user-level DP-FedAvg
# (FedSGD, Poisson q = 0.25, clip 1, z 3.22, FedAdam lr 0.5) of the 9-weight channel scorer: total user-level
# epsilon 1.998 at delta 1e-5 (Opacus RDP, q = 236/943), within 10 minutes on 2 cores. The research replay's
# recipe (simulations/private_pipeline.py: 100 steps) shrunk to what a Flower run affords; the split 5 : 3 : 3.5
# and lr were chosen on ML-100K validation figures of that replay, the 5 rounds (noise x 0.92) by
# simulations/budget_allocation.py (16 candidates at epsilon 2, validation only; README "Budget allocation"):
# neither choice is in the epsilon.
DEFAULT_PIPELINE: dict[str, Any] = {
    "model": "channel-scorer", "dp": False, "user-dp": True, "strategy": "fedadam", "server-lr": 0.5,
    "num-rounds": 5, "devices-per-round": 0, "fraction-train": 0.25, "user-noise-multiplier": 3.22,
    "user-clipping-norm": 1.0, "eval-every": 0, "popularity-noise-multiplier": 4.6, "cooc-noise-multiplier": 2.76,
    "cooc-items": 100, "cooc-window": 10, "scorer-targets": 5,
    "central-eval": False,  # the federated evaluation gives the figures; the server-side check costs ~1 min twice
}


# The non-private SASRec federation's settings (issue 12, README "Closing gap (c)", fifth pass): each device takes
# one plain SGD epoch (lr 0.5) and reports its step, and the server runs Adam (FedAdam, lr 0.001, tau 1e-6 so that
# Adam's scaling is not capped by tau at these update sizes) on the per-row mean: centralized Adam's step on a
# 64-user batch. Chosen on ML-100K validation over 3 seeds of 200 rounds; test NDCG@10 0.0796 +- 0.0048, 0.97 of
# centralized SASRec. `resolve_run` gives them to a run where `non_private_sasrec` holds, for each key that neither
# the config file nor an override sets; every private or secure mode keeps the schema's defaults (this recipe was
# measured without DP only). A `flwr run` takes its run config as given (Flower lists every key in it).
NON_PRIVATE_SASREC: dict[str, Any] = {"local-optimizer": "sgd", "local-lr": 0.5, "strategy": "fedadam",
                                      "server-lr": 0.001, "server-tau": 1e-6}
# ... and the released model is the running average with decay 0.9, from the measured 200 rounds on: in a short run
# the average still holds much of round 0's random model (0.9^10 = 35% of it after 10 rounds), and at round 100
# the global model scored better on validation than the average.
NON_PRIVATE_SASREC_AVERAGE: dict[str, Any] = {"model-average": 0.9}
NON_PRIVATE_SASREC_AVERAGE_ROUNDS = 200


def non_private_sasrec(cfg: Mapping[str, Any]) -> bool:
    """A SASRec run that aggregates per row (so dp, user-dp and secure-aggregation are false)."""
    return cfg["model"] == "sasrec" and aggregation_in_effect(cfg) == "per-row"


def non_private_sasrec_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The tuned settings a run resolved to `cfg` takes (for the keys it left unset); {} for any other run."""
    if not non_private_sasrec(cfg):
        return {}
    if cfg["num-rounds"] >= NON_PRIVATE_SASREC_AVERAGE_ROUNDS:
        return {**NON_PRIVATE_SASREC, **NON_PRIVATE_SASREC_AVERAGE}
    return dict(NON_PRIVATE_SASREC)


def check_secure_aggregation(cfg: Mapping[str, Any], cohort: int, where: str = "") -> None:
    """Refuse secure-aggregation settings that cannot protect anyone in a cohort of `cohort` devices."""
    from shared.secagg import (  # Flower's crypto: only when asked
        CLIP_MARGIN_STDS,
        SecAggParams,
        check_clip_range,
        check_no_wrap,
        release_params,
    )

    params = SecAggParams(threshold=cfg["secagg-threshold"], clip_range=cfg["secagg-clip-range"],
                          quantization_bits=cfg["secagg-quantization-bits"], min_cohort=cfg["secagg-min-cohort"])
    if params.threshold > cohort:
        raise PrivrecError(f"{where}config key 'secagg-threshold' = {params.threshold} is larger than the cohort "
                           f"of {cohort} devices per round: no sum could ever be unmasked")
    if params.min_cohort > cohort:
        raise PrivrecError(f"{where}config key 'secagg-min-cohort' = {params.min_cohort} is larger than the cohort "
                           f"of {cohort} devices per round: no sum could ever be unmasked")
    try:
        check_no_wrap(params, cohort)
        if cfg["user-dp"]:
            check_clip_range(params, cfg["user-clipping-norm"], cfg["user-noise-multiplier"])
        if cfg["model"] in SCORER_MODELS:  # the analytics releases go through the same quantizer (sensitivity 1)
            releases = ["popularity-noise-multiplier"] + (["cooc-noise-multiplier"]
                                                          if cfg["model"] == "channel-scorer" else [])
            for key in releases:
                check_clip_range(release_params(cfg), 1.0, cfg[key],
                                 f"1 (a user's contribution) plus {CLIP_MARGIN_STDS:g} std devs of a device's share "
                                 f"of the '{key}' noise")
    except PrivrecError as exc:
        raise PrivrecError(f"{where}{exc}") from None


def clamp_to_population(cfg: dict[str, Any], num_devices: int) -> str | None:
    """Lower `devices-per-round` to the population when it asks for more; returns the note to show.

    The effective value is what the run records (config.json, checkpoints), so the record says what ran.
    """
    asked = cfg["devices-per-round"]
    if asked <= num_devices:
        return None
    cfg["devices-per-round"] = num_devices
    return (f"devices-per-round = {asked} is more than the {num_devices} devices: every round asks all "
            f"{num_devices} (recorded as devices-per-round = {num_devices})")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML config file (`key = value`, the same keys as the schema)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrivrecError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivrecError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PrivrecError(f"config file {path}: not valid TOML ({exc})") from None
    for name, value in data.items():
        if isinstance(value, dict):
            raise PrivrecError(f"{path}: section [{name}] is not allowed; write flat `key = value` lines")
    return data


def resolve(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema's defaults, then the config file, then explicit overrides (e.g. CLI flags), validated.

    For tools that are no federated run (`privrec baseline`, `privrec audit`): their defaults are the schema's.
    """
    return _layered(config_file, overrides, preset=None)[0]


def resolve_run(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config of a federated run, the one way every entry point that starts or writes one resolves it
    (`privrec simulate`, `privrec deploy local`, `privrec deploy run-config`).

    The schema's defaults, then the product's default pipeline (`DEFAULT_PIPELINE`) unless the file or the
    overrides choose a `model` themselves, then the file, then the overrides. A chosen model keeps the schema's
    defaults under it: `model = sasrec` gets SASRec's keys, none of the pipeline's, and a non-private SASRec run
    then takes `NON_PRIVATE_SASREC`'s tuned settings for the keys that neither the file nor the overrides set.
    """
    cfg, explicit = _layered(config_file, overrides, preset=DEFAULT_PIPELINE)
    tuned = {k: v for k, v in non_private_sasrec_settings(cfg).items() if k not in explicit}
    return validate({**cfg, **tuned}) if tuned else cfg


def _layered(config_file: str | Path | None, overrides: Mapping[str, Any] | None,
             preset: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The validated config, and the keys the file and the overrides set themselves."""
    explicit: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_toml(config_file)
        if preset is None or "model" in file_values:
            validate(file_values, where=f"{config_file}: ")  # report file mistakes against the file
        else:
            validate({**preset, **file_values}, where=f"{config_file}: ")
        explicit.update(file_values)
    explicit.update({k: v for k, v in (overrides or {}).items() if v is not None})
    merged = dict(preset) if preset is not None and "model" not in explicit else {}
    merged.update(explicit)
    return validate(merged), explicit


@dataclass(frozen=True)
class DataSection:
    dataset: str
    data_store: str
    users_per_device: int
    population_dir: str
    cold_item_share: float


@dataclass(frozen=True)
class PipelineSection:
    """What is trained (`model`) and the content scorer's levers (shared/scorer.py, shared/privacy/pipeline.py)."""
    model: str
    popularity_noise_multiplier: float
    profile_items: int
    profile_decay: float
    scorer_targets: int
    cooc_noise_multiplier: float
    cooc_items: int
    cooc_window: int
    transition_release: bool
    transition_noise_multiplier: float
    transition_items: int
    target_epsilon: float


@dataclass(frozen=True)
class ModelSection:
    max_len: int
    hidden_size: int
    num_heads: int
    num_blocks: int
    dropout: float
    item_representation: str


@dataclass(frozen=True)
class FederationSection:
    strategy: str
    num_rounds: int
    devices_per_round: int
    fraction_train: float
    server_lr: float
    server_tau: float
    proximal_mu: float
    aggregation: str
    row_momentum: float
    model_average: float
    eval_every: int
    fraction_evaluate: float
    central_eval: bool
    seed: int
    deterministic_devices: bool
    public_share: float
    public_epochs: int
    devices_per_node: int
    round_timeout: float


@dataclass(frozen=True)
class DeviceTraining:
    """On-device training and its DP-SGD; `delta` and `accountant` are the run's, for both DP levels."""
    epochs: int
    lr: float
    batch_size: int
    sample_rate: float
    window: int
    optimizer: str
    trainable: str
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    max_epsilon: float
    delta: float
    accountant: str
    grad_sample_mode: str


@dataclass(frozen=True)
class UserDPSection:
    """DP-FedAvg on the server (`user-dp`, `user-*`): the unit is one device's whole contribution."""
    enabled: bool
    noise_multiplier: float  # noise std on the sum, in units of clipping_norm
    clipping_norm: float  # L2 bound on one device's model update


@dataclass(frozen=True)
class SecureAggregationSection:
    """SecAgg+ (`secure-aggregation`, `secagg-*`): the server unmasks only sums of at least min_cohort devices."""
    enabled: bool
    threshold: int
    clip_range: float
    quantization_bits: int
    min_cohort: int
    release_min_cohort: int  # 0 = min_cohort


@dataclass(frozen=True)
class OutputsSection:
    """Where a run writes (`run-dir/run-name`) and whether it continues from its checkpoint."""
    run_dir: str
    run_name: str
    resume: bool


@dataclass(frozen=True)
class DeploymentSection:
    """Real SuperNodes: the public catalogue the ServerApp reads and how many devices take part."""
    catalogue: str
    deploy_devices: int


SECTION_TYPES = {"data": DataSection, "pipeline": PipelineSection, "model": ModelSection,
                 "federation": FederationSection,
                 "device": DeviceTraining, "user_dp": UserDPSection,
                 "secure_aggregation": SecureAggregationSection, "outputs": OutputsSection,
                 "deployment": DeploymentSection}


@dataclass(frozen=True)
class RunConfig:
    """A validated run config in typed sections, built once per process from the flat keys.

    `values` is the flat config the sections were built from (what a run records in config.json).
    """
    data: DataSection
    pipeline: PipelineSection
    model: ModelSection
    federation: FederationSection
    device: DeviceTraining
    user_dp: UserDPSection
    secure_aggregation: SecureAggregationSection
    outputs: OutputsSection
    deployment: DeploymentSection
    values: Mapping[str, Any]

    @classmethod
    def from_values(cls, values: Mapping[str, Any], where: str = "") -> RunConfig:
        """Validated (defaults fill what `values` leaves out) and split into sections."""
        flat = validate(values, where)
        sections = {name: SECTION_TYPES[name](**{field_name(k): flat[k] for k in keys})
                    for name, keys in SECTIONS.items()}
        return cls(**sections, values=MappingProxyType(flat))

    @classmethod
    def of(cls, cfg: RunConfig | Mapping[str, Any]) -> RunConfig:
        """`cfg` itself, or the RunConfig of a flat config mapping (for callers that hold one)."""
        return cfg if isinstance(cfg, RunConfig) else cls.from_values(cfg)

    def with_values(self, **changes: Any) -> RunConfig:
        """A copy with some flat keys changed (`with_values(**{"devices-per-round": 3})`), validated again."""
        return RunConfig.from_values({**self.values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


def from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig of Flower's `context.run_config` (pyproject defaults + `--run-config` overrides).

    Flower hands the same run config to the ServerApp and to every ClientApp, in simulation and in
    deployment: each side parses it here, once, and messages carry only per-round values.
    """
    return RunConfig.from_values(dict(run_config), where="run config: ")
