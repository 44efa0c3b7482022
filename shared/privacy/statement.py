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


USER_LEVEL_UNIT = ("one device's entire contribution to a round (its whole model update, i.e. every "
                   "interaction of every user on the device; with one user per device: a user's whole history)")


def user_level_statement(cfg: Mapping[str, Any], sample_rate: float, population: int) -> dict[str, Any]:
    """What DP-FedAvg's population-level epsilon guarantees."""
    return {
        "mechanism": "user-level DP-FedAvg on the server: each device's update clipped to L2 norm "
                     f"user-clipping-norm = {cfg['user-clipping-norm']}, Gaussian noise of std "
                     f"user-noise-multiplier x norm = {cfg['user-noise-multiplier']} x {cfg['user-clipping-norm']} "
                     "added to the sum of updates, divided by the expected cohort (fixed denominator)",
        "accountant": ACCOUNTANT_NAMES[cfg["accountant"]],
        "delta": cfg["delta"],
        "privacy-unit": USER_LEVEL_UNIT,
        "sampling": f"Poisson sampling of devices: each eligible device joins a round independently with "
                    f"probability q = {sample_rate:.6g} (expected cohort / {population} devices), drawn from OS "
                    "entropy so the cohort is not predictable from the run seed; every round is accounted, "
                    "also a round that drew nobody",
        "composition": "every round of the run (one sampled Gaussian release per round)",
        "adversary": "anyone who sees the global models the server releases (other devices, users of the model); "
                     "NOT the server itself, which sees individual updates before noise",
        "randomness": "NumPy's PCG64 generator seeded from OS entropy (research-grade, not a CSPRNG)",
    }


def sentences(cfg: Mapping[str, Any], device_epsilon: float | None, user_epsilon: float | None,
              devices: int, population: int | None = None) -> list[dict[str, Any]]:
    """One plain sentence per active mechanism, with the figures it needs to stand on its own."""
    out = []
    if cfg["dp"]:
        text = ("No device has trained yet." if device_epsilon is None else
                f"On-device DP-SGD: for every device, any single window of up to {cfg['window']} consecutive "
                f"interactions of its history is protected with epsilon <= {device_epsilon:.3g} at delta "
                f"{cfg['delta']:g} (largest spend among {devices} devices; {cfg['accountant'].upper()} accountant, "
                "Poisson sampling of windows, cumulative over all rounds) against the server and anyone who "
                "sees the models.")
        out.append({"mechanism": "on-device DP-SGD", "sentence": text, "epsilon": device_epsilon,
                    "delta": cfg["delta"], "accountant": cfg["accountant"],
                    "unit": f"one window of up to {cfg['window']} interactions",
                    "adversary": "the server and anyone who sees released models",
                    "sampling": "Poisson sampling of the device's windows"})
    if cfg.get("user-dp"):
        text = ("No round has been aggregated yet." if user_epsilon is None else
                f"User-level DP-FedAvg: each device's whole contribution (with one user per device, a user's "
                f"entire history) is protected with epsilon <= {user_epsilon:.3g} at delta {cfg['delta']:g} "
                f"({cfg['accountant'].upper()} accountant, Poisson sampling of devices over a population of "
                f"{population}, all rounds composed) against anyone who sees the released global models, "
                "but not against the server.")
        out.append({"mechanism": "user-level DP-FedAvg", "sentence": text, "epsilon": user_epsilon,
                    "delta": cfg["delta"], "accountant": cfg["accountant"], "unit": USER_LEVEL_UNIT,
                    "adversary": "anyone who sees released global models (not the server)",
                    "sampling": "Poisson sampling of devices"})
    if not out:
        out.append({"mechanism": "none", "sentence": "No differential privacy: neither dp nor user-dp is on.",
                    "epsilon": None, "delta": None, "accountant": None, "unit": None, "adversary": None,
                    "sampling": None})
    return out


def one_line(summary_privacy: Mapping[str, Any]) -> str:
    parts = []
    user = summary_privacy.get("user-level")
    if summary_privacy.get("mechanism") != "none":
        eps_max = summary_privacy.get("all-epsilon-max")
        eps_med = summary_privacy.get("all-epsilon-median")
        if eps_max is None:
            parts.append("on-device DP: no device trained")
        else:
            capped = summary_privacy.get("capped-devices", 0)
            parts.append(f"epsilon max {eps_max:.2f}, median {eps_med:.2f} over "
                         f"{summary_privacy['devices-with-spend']} devices"
                         f"{f' ({capped} reached their cap)' if capped else ''}, at delta "
                         f"{summary_privacy['delta']:g} ({summary_privacy['accountant'].split(' (')[0]}); "
                         "unit: one window of a user's history (any single interaction), DP-SGD on device")
    if user:
        eps = user.get("epsilon")
        parts.append("user-level DP-FedAvg: " + ("no round aggregated" if eps is None else
                     f"epsilon {eps:.2f} at delta {user['delta']:g}; unit: a device's whole contribution, "
                     "against anyone who sees released models (not the server)"))
    return "; ".join(parts) if parts else "no differential privacy (dp = false, user-dp = false)"
