"""One accountant for everything a `model = content-scorer` run releases about a user.

Privacy unit: one user's whole history (one user per device; with more, a device's users together), under
adding or removing that user. The run releases, in this order:

1. the item-popularity histogram: the sum of every device's item-set vector (each user's distinct training
   items weighted 1/sqrt(n), L2 norm 1) plus N(0, z_pop^2) per item -- a Gaussian mechanism, sensitivity 1,
   no sampling;
2. every DP-FedAvg round: devices Poisson-sampled at rate q, each device's update (minus its gradient) clipped
   to C on the server, N(0, (z C)^2) on the sum, divided by the fixed q N -- the sampled Gaussian mechanism
   (q, z), once per round. The server optimizer (FedAdam) and evaluation are post-processing.

Hyperparameters are fixed before the run (the defaults); the run makes no choice on its private data, so
nothing else is released. The defaults themselves were chosen by the developers from measurements on ML-100K
(validation items; README): that choice is not in the epsilon, which is said wherever the figure is. Opacus'
accountant (the run's `accountant`: rdp or prv) composes the two as one history; `tests/test_scorer_pipeline.py`
checks the figure against dp-accounting (another code base).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import PrivrecError
from shared.privacy.accounting import epsilon_from_state

COMPOSABLE = ("rdp", "prv")  # Opacus' gdp accountant refuses a history whose noise or rate changes


def pipeline_history(popularity_noise: float, noise_multiplier: float, sample_rate: float,
                     rounds: int) -> list[list[float]]:
    """Accountant rows [noise multiplier, sample rate, steps]: the popularity release, then `rounds` rounds."""
    history = [[float(popularity_noise), 1.0, 1]]
    if rounds > 0:
        history.append([float(noise_multiplier), float(sample_rate), int(rounds)])
    return history


def pipeline_epsilon(popularity_noise: float, noise_multiplier: float, sample_rate: float, rounds: int,
                     delta: float, accountant: str) -> float:
    """User-level epsilon at `delta` of the popularity release composed with `rounds` DP-FedAvg rounds."""
    if accountant not in COMPOSABLE:
        raise PrivrecError(f"config key 'accountant' = {accountant}: model = content-scorer composes two different "
                           f"mechanisms, which Opacus' gdp accountant cannot; use one of {', '.join(COMPOSABLE)}")
    state = {"history": pipeline_history(popularity_noise, noise_multiplier, sample_rate, rounds),
             "mechanism": accountant}
    return float(epsilon_from_state(state, delta, accountant))


def planned_sample_rate(cfg: Mapping[str, Any], num_devices: int) -> float:
    """Poisson rate q = expected cohort / population, as the ServerApp computes it
    (`server.strategy.user_sample_rate`; tools cannot import server/, a test keeps the two equal)."""
    wanted = cfg["devices-per-round"] if cfg["devices-per-round"] > 0 \
        else int(round(cfg["fraction-train"] * num_devices))
    return max(1, min(wanted, num_devices)) / num_devices


def planned_epsilon(cfg: Mapping[str, Any], sample_rate: float) -> float:
    """The epsilon a content-scorer config reaches after all its rounds (before anything runs)."""
    return pipeline_epsilon(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                            cfg["num-rounds"], cfg["delta"], cfg["accountant"])


def check_pipeline_budget(cfg: Mapping[str, Any], sample_rate: float, where: str = "") -> float:
    """The planned epsilon; PrivrecError naming the key when it exceeds `target-epsilon` (0 = no cap)."""
    epsilon = planned_epsilon(cfg, sample_rate)
    cap = cfg["target-epsilon"]
    if cap > 0 and epsilon > cap:
        raise PrivrecError(
            f"{where}config key 'target-epsilon' = {cap:g}: this run would reach user-level epsilon {epsilon:.3f} "
            f"({cfg['accountant']}, delta {cfg['delta']:g}: popularity release z = "
            f"{cfg['popularity-noise-multiplier']:g} + {cfg['num-rounds']} rounds at q = {sample_rate:.3g}, "
            f"z = {cfg['user-noise-multiplier']:g}); raise the noise multipliers, or lower num-rounds")
    return epsilon


def statement(cfg: Mapping[str, Any], sample_rate: float, population: int, rounds: int) -> dict[str, Any]:
    """The full guarantee of a content-scorer run after `rounds` rounds (privacy.json, summary.json)."""
    return {
        "epsilon": pipeline_epsilon(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                                    rounds, cfg["delta"], cfg["accountant"]),
        "planned-epsilon": planned_epsilon(cfg, sample_rate),
        "target-epsilon": cfg["target-epsilon"],
        "delta": cfg["delta"],
        "unit": "one user's whole history (with one user per device: the device's whole contribution)",
        "relation": "add/remove one user",
        "accountant": f"Opacus {cfg['accountant']}, one history composing every release "
                      "(checked against dp-accounting in tests)",
        "history": pipeline_history(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                                    rounds),
        "mechanism": (f"1) popularity histogram: Gaussian, sensitivity 1 (each user's item set / sqrt(n)), noise "
                      f"multiplier {cfg['popularity-noise-multiplier']:g}, no sampling, one release; 2) {rounds} "
                      f"round(s) of DP-FedAvg (FedSGD): each device's update = minus its gradient of the mean loss "
                      f"over its last {cfg['scorer-targets']} training items, clipped on the server to L2 norm "
                      f"{cfg['user-clipping-norm']:g}, N(0, ({cfg['user-noise-multiplier']:g} x "
                      f"{cfg['user-clipping-norm']:g})^2) on the sum, divided by the expected cohort; "
                      f"{cfg['strategy']} as post-processing"),
        "sampling": f"Poisson sampling of devices at rate q = {sample_rate:.4g} per round over {population} devices",
        "on-device-dp": "off (dp = false): no window-level DP-SGD; the guarantee is the user-level one above",
        "adversary": "whoever sees the released popularity histogram and the released models (other devices, "
                     "users of the model); NOT the server, which sees each device's item-set vector and "
                     "unclipped update (no secure aggregation in this mode)",
        "hyperparameters": "fixed before the run; the run makes no choice on its private data. The defaults were "
                           "chosen by the developers from ML-100K measurements (validation items): that choice "
                           "is not counted in epsilon",
        "population": population,
    }


def sentence(record: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """privacy.json's statement of a content-scorer run (the shape of `shared.privacy.statement.sentences`)."""
    text = (f"Whole pipeline (DP popularity release + {rounds} round(s) of user-level DP-FedAvg of the content "
            f"scorer): each user's entire history is protected with epsilon <= {record['epsilon']:.3g} at delta "
            f"{record['delta']:g} for adding or removing one user ({record['accountant']}; {record['sampling']}) "
            "against whoever sees the released histogram and models, but not against the server (no secure "
            "aggregation in this mode). No on-device DP-SGD (dp = false).")
    return {"mechanism": "user-level pipeline (popularity release + DP-FedAvg)", "sentence": text,
            "epsilon": record["epsilon"], "delta": record["delta"], "accountant": record["accountant"],
            "is-a-bound": True, "unit": record["unit"], "relation": record["relation"],
            "adversary": record["adversary"], "sampling": record["sampling"]}


def one_line(record: Mapping[str, Any]) -> str:
    return (f"user-level epsilon {record['epsilon']:.2f} at delta {record['delta']:g} (Opacus "
            f"{record['accountant'].split(',')[0].removeprefix('Opacus ')}); unit: one user's whole history, "
            "add/remove one user; covers the popularity release and every round; against whoever sees the "
            "released histogram and models, not the server (no secure aggregation); no on-device DP-SGD")
