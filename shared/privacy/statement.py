"""Plain-language statement of what a run's epsilon means: delta, accountant, mechanism, unit, sampling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ACCOUNTANT_NAMES = {
    "rdp": "Renyi DP accountant (Opacus RDPAccountant)",
    "prv": "PRV accountant (Opacus PRVAccountant)",
    "gdp": "Gaussian DP accountant (Opacus GaussianAccountant; CLT approximation, not a guarantee)",
}


def privacy_statement(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the reported epsilon guarantees, for the summary and the CLI."""
    if not cfg["dp"]:
        return {"mechanism": "none", "guarantee": "no differential privacy: dp = false"}
    window = cfg["window"]
    randomness = ("research-grade (torch's generator; Opacus secure_mode is unavailable), drawn from fresh OS "
                  "entropy on each device")
    if cfg.get("deterministic-devices"):
        randomness = ("DERIVED FROM THE RUN SEED (deterministic-devices = true): anyone who knows the seed can "
                      "regenerate and subtract the noise, so this run demonstrates accounting only and "
                      "protects nothing")
    return {
        "mechanism": "DP-SGD on each device (Opacus): per-example gradient clipping to "
                     f"max-grad-norm = {cfg['max-grad-norm']}, Gaussian noise multiplier = {cfg['noise-multiplier']}",
        "accountant": ACCOUNTANT_NAMES[cfg["accountant"]],
        "delta": cfg["delta"],
        "privacy-unit": f"one training example = one non-overlapping window of up to {window} consecutive "
                        "interactions of one user's training history; every interaction lies in exactly one "
                        "window, so the guarantee covers any single interaction (not a whole user history)",
        "sampling": "Poisson sampling of a device's windows at rate q = min(1, batch-size / windows on the "
                    "device), as implemented by Opacus; no amplification is claimed from the server's "
                    "choice of devices per round",
        "composition": "cumulative over every round each device trained in (accountant history kept in the "
                       "device's privacy ledger)",
        "adversary": "anyone who sees the device's model updates: the server, and anyone who sees models "
                     "released from them",
        "randomness": randomness,
        "not-covered": "which devices took part and when; the scalars devices report in the clear (training "
                       "loss, number of windows used as the FedAvg weight, evaluation hits), which are not "
                       "noised",
    }


def one_line(summary_privacy: Mapping[str, Any]) -> str:
    if summary_privacy.get("mechanism") == "none":
        return "no differential privacy (dp = false)"
    eps_max = summary_privacy.get("all-epsilon-max")
    eps_med = summary_privacy.get("all-epsilon-median")
    if eps_max is None:
        return "no device trained"
    return (f"epsilon max {eps_max:.2f}, median {eps_med:.2f} over {summary_privacy['devices-with-spend']} devices, "
            f"at delta {summary_privacy['delta']:g} ({summary_privacy['accountant'].split(' (')[0]}); "
            "unit: one window of a user's history (any single interaction), DP-SGD on device")
