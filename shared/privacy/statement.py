"""Plain-language statement of what a run's epsilon means: delta, accountant, mechanism, unit, neighbouring
relation, sampling, adversary.

GDP (`accountant = "gdp"`) is a central-limit approximation, not a bound: its figure is stated as an
approximation ("about"), never as "protected with epsilon <=".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shared.consent import no_guarantee

ACCOUNTANT_NAMES = {
    "rdp": "Renyi DP accountant (Opacus RDPAccountant)",
    "prv": "PRV accountant (Opacus PRVAccountant)",
    "gdp": "Gaussian DP accountant (Opacus GaussianAccountant; CLT approximation, not a guarantee)",
}

WINDOW_RELATION = "add/remove one window (one training example of a device)"
DEVICE_RELATION = "add/remove one device's whole contribution to a round"


def is_guarantee(accountant: str) -> bool:
    """Whether the accountant's epsilon is an upper bound (RDP, PRV) or only an approximation (GDP)."""
    return accountant != "gdp"


def _epsilon_phrase(accountant: str, epsilon: float) -> str:
    if is_guarantee(accountant):
        return f"is protected with epsilon <= {epsilon:.3g}"
    return (f"has an approximate epsilon of about {epsilon:.3g} (GDP accountant: a central-limit "
            "approximation, NOT a guarantee; use rdp or prv for a bound)")


def window_unit(window: int) -> str:
    return (f"one training example = one non-overlapping window of up to {window} consecutive interactions "
            "of one user's training history (not a whole user history)")


def interaction_scope(window: int) -> str:
    """What the window-level guarantee says about a single interaction (windows are cut newest-first)."""
    return ("windows are cut from the newest interaction backwards, so inserting or deleting one interaction "
            "shifts every older window and is NOT covered; replacing one interaction's item changes exactly "
            "one window and is covered by group privacy at 2 x epsilon and delta x (1 + e^epsilon)")


def privacy_statement(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the reported epsilon guarantees, for the summary and the CLI (and, with a consenting cohort, whom it
    does not cover)."""
    terms = _statement_terms(cfg)
    share = float(cfg.get("public-share") or 0.0)
    if share > 0:
        terms["consenting-cohort"] = (f"public-share = {share:g}: the consenting users have no guarantee for the "
                                      "training histories they shared (the server pretrained the initial model on "
                                      "them without noise)")
    return terms


def _statement_terms(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if not cfg["dp"]:
        return {"mechanism": "none", "guarantee": "no differential privacy: dp = false; every device records the "
                                                  "non-private rounds in its ledger, and its epsilon is unbounded "
                                                  "from then on (it declines later DP rounds)"}
    randomness = ("research-grade (torch's generator; Opacus secure_mode is unavailable), drawn from fresh OS "
                  "entropy on each device")
    if cfg.get("deterministic-devices"):
        randomness = ("DERIVED FROM THE RUN SEED (deterministic-devices = true): anyone who knows the seed can "
                      "regenerate and subtract the noise, so this run demonstrates accounting only and "
                      "protects nothing")
    if "sample-rate" not in cfg:
        return {**_on_device_terms(cfg, randomness), **LEGACY_SAMPLING}
    return _on_device_terms(cfg, randomness)


# Runs from before `sample-rate` existed: q, the step count and the FedAvg weight followed each device's
# window count and were sent to the server, so adding or removing a window was visible.
LEGACY_SAMPLING = {
    "neighbouring-relation": "replace-one window only (this run's devices sent their window counts); the "
                             "epsilon figures were computed for add/remove and UNDER-STATE replace-one, whose "
                             "sensitivity is up to twice as large",
    "sampling": "Poisson sampling of a device's windows at q = 1 / ceil(windows / batch-size), for "
                "local-epochs x ceil(windows / batch-size) steps per round (a run from before sample-rate "
                "existed: rate and steps depended on, and revealed, the device's window count)",
    "accountant-is-a-bound": False,
}


def _on_device_terms(cfg: Mapping[str, Any], randomness: str) -> dict[str, Any]:
    window = cfg["window"]
    return {
        "mechanism": "DP-SGD on each device (Opacus): per-example gradient clipping to "
                     f"max-grad-norm = {cfg['max-grad-norm']}, Gaussian noise multiplier = {cfg['noise-multiplier']}",
        "accountant": ACCOUNTANT_NAMES[cfg["accountant"]],
        "delta": cfg["delta"],
        "privacy-unit": window_unit(window),
        "neighbouring-relation": WINDOW_RELATION,
        "single-interaction": interaction_scope(window),
        "sampling": f"Poisson sampling of a device's windows at the fixed rate q = sample-rate = "
                    f"{cfg.get('sample-rate', 1.0):g} per step, local-epochs x ceil(1 / q) = {_round_steps(cfg)} "
                    "steps per round, and the noisy gradient sum divided by the fixed batch-size, all "
                    "independent of the device's window count; no amplification is claimed from the "
                    "server's choice of devices per round",
        "composition": "cumulative over every round each device trained in (accountant history kept in the "
                       "device's privacy ledger)",
        "adversary": "anyone who sees the device's model updates and what else it sends with them (FedAvg "
                     "weight 1, the configured steps and sample rate, its accountant history, its epsilon: "
                     "the same for every device, whatever its data): the server, and anyone who sees models "
                     "released from them",
        "randomness": randomness,
        "accountant-is-a-bound": is_guarantee(cfg["accountant"]),
        "not-covered": "which devices took part and when; inserting or deleting single interactions (see "
                       "single-interaction); the evaluation sums devices report in the clear (HR@10, NDCG@10 "
                       "of their own held-out items), which are not noised",
    }


def _round_steps(cfg: Mapping[str, Any]) -> int:
    return int(cfg["local-epochs"]) * max(1, math.ceil(1.0 / float(cfg.get("sample-rate", 1.0)) - 1e-9))


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
        "neighbouring-relation": DEVICE_RELATION,
        "accountant-is-a-bound": is_guarantee(cfg["accountant"]),
        "sampling": f"Poisson sampling of devices: each eligible device joins a round independently with "
                    f"probability q = {sample_rate:.6g} (expected cohort / {population} devices), drawn from OS "
                    "entropy so the cohort is not predictable from the run seed; every round is accounted, "
                    "also a round that drew nobody",
        "composition": "every round of the run (one sampled Gaussian release per round)",
        "adversary": "anyone who sees the global models the server releases (other devices, users of the model); "
                     "NOT the server itself, which sees individual updates before noise",
        "randomness": "NumPy's PCG64 generator seeded from OS entropy (research-grade, not a CSPRNG)",
        **(secure_aggregation_terms(cfg) if cfg.get("secure-aggregation") else {}),
    }


def secure_aggregation_terms(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """User-level DP with secure aggregation: the noise comes from the devices, and the server sees only sums."""
    m_min = cfg["secagg-min-cohort"]
    return {
        "mechanism": "user-level DP-FedAvg with distributed noise under secure aggregation (SecAgg+): each device "
                     f"clips its update to L2 norm user-clipping-norm = {cfg['user-clipping-norm']}, adds Gaussian "
                     f"noise of variance (z C)^2 / m_min (z = {cfg['user-noise-multiplier']}, m_min = "
                     f"secagg-min-cohort = {m_min}) and masks it; the server unmasks only the sum of at least "
                     f"max(secagg-threshold, m_min) = {max(cfg['secagg-threshold'], m_min)} devices, whose noise "
                     "variance is then at least the central (z C)^2, and divides it by the expected cohort",
        "adversary": "anyone who sees the released global models, AND the honest-but-curious server, as long as at "
                     f"least m_min = {m_min} of the devices in every unmasked sum follow the protocol and keep "
                     "their noise secret (devices colluding with the server can remove their own shares)",
        "quantization": f"each device rounds stochastically to {cfg['secagg-quantization-bits']} bits over "
                        f"[-{cfg['secagg-clip-range']}, {cfg['secagg-clip-range']}]; the accountant treats the "
                        "quantized sum as the continuous Gaussian sum (the rounding is not modelled); modular "
                        "wrap-around is impossible (cohort x (2^bits - 1) < 2^32, checked before the run and "
                        "in every round)",
        "randomness": "devices: NumPy's PCG64 from OS entropy for noise and stochastic rounding (research-grade, "
                      "not a CSPRNG); masks: AES-256-CTR keystreams from X25519 key agreements and 16-byte "
                      "OS-random seeds; Shamir shares over GF(2^128 + 51) with coefficients from Python's secrets",
    }


def sentences(cfg: Mapping[str, Any], device_epsilon: float | None, user_epsilon: float | None,
              devices: int, population: int | None = None) -> list[dict[str, Any]]:
    """One plain sentence per active mechanism, with the figures it needs to stand on its own."""
    out = []
    if cfg["dp"]:
        text = ("No device has trained yet." if device_epsilon is None else
                f"On-device DP-SGD: for every device, any single window of up to {cfg['window']} consecutive "
                f"interactions of its history {_epsilon_phrase(cfg['accountant'], device_epsilon)} at delta "
                f"{cfg['delta']:g} for adding or removing one window (largest spend among {devices} devices; "
                f"{cfg['accountant'].upper()} accountant, Poisson sampling of windows at q = {cfg['sample-rate']:g}, "
                "cumulative over all rounds) against the server and anyone who sees the models. For a single "
                "interaction this covers replacing its item (at twice the epsilon), not inserting or deleting it.")
        out.append({"mechanism": "on-device DP-SGD", "sentence": text, "epsilon": device_epsilon,
                    "delta": cfg["delta"], "accountant": cfg["accountant"],
                    "is-a-bound": is_guarantee(cfg["accountant"]),
                    "unit": f"one window of up to {cfg['window']} interactions",
                    "relation": WINDOW_RELATION,
                    "adversary": "the server and anyone who sees released models",
                    "sampling": "Poisson sampling of the device's windows at q = sample-rate = "
                                f"{cfg['sample-rate']:g}"})
    if cfg.get("user-dp"):
        text = ("No round has been aggregated yet." if user_epsilon is None else
                f"User-level DP-FedAvg: each device's whole contribution (with one user per device, a user's "
                f"entire history) {_epsilon_phrase(cfg['accountant'], user_epsilon)} at delta {cfg['delta']:g} "
                f"for adding or removing one device ({cfg['accountant'].upper()} accountant, Poisson sampling "
                f"of devices over a population of {population}, all rounds composed) against anyone who sees "
                "the released global models, but not against the server." if not cfg.get("secure-aggregation") else
                f"User-level DP-FedAvg with distributed noise under secure aggregation: each device's whole "
                f"contribution (with one user per device, a user's entire history) "
                f"{_epsilon_phrase(cfg['accountant'], user_epsilon)} at delta {cfg['delta']:g} for adding or "
                f"removing one device ({cfg['accountant'].upper()} accountant, Poisson sampling of devices over a "
                f"population of {population}, all rounds composed) against anyone who sees the released global "
                f"models and against the server, while at least secagg-min-cohort = {cfg['secagg-min-cohort']} "
                "devices in every unmasked sum follow the protocol (quantization to "
                f"{cfg['secagg-quantization-bits']} bits not modelled by the accountant).")
        out.append({"mechanism": "user-level DP-FedAvg", "sentence": text, "epsilon": user_epsilon,
                    "delta": cfg["delta"], "accountant": cfg["accountant"],
                    "is-a-bound": is_guarantee(cfg["accountant"]), "unit": USER_LEVEL_UNIT,
                    "relation": DEVICE_RELATION,
                    "adversary": "anyone who sees released global models (not the server)"
                    if not cfg.get("secure-aggregation") else
                    f"anyone who sees released global models, and the server while at least "
                    f"{cfg['secagg-min-cohort']} devices per unmasked sum follow the protocol",
                    "sampling": "Poisson sampling of devices"})
    if float(cfg.get("public-share") or 0.0) > 0:  # a consenting cohort pretrained the model: whom no figure covers
        for entry in out:
            entry["sentence"] += f" {no_guarantee(cfg, population, 'the initial model')}."
    if not out:
        out.append({"mechanism": "none", "sentence": "No differential privacy: neither dp nor user-dp is on.",
                    "epsilon": None, "delta": None, "accountant": None, "is-a-bound": None, "unit": None,
                    "relation": None, "adversary": None, "sampling": None})
    return out


def _is_bound(privacy: Mapping[str, Any]) -> bool:
    return privacy.get("accountant-is-a-bound", "not a guarantee" not in str(privacy.get("accountant", "")))


def one_line(summary_privacy: Mapping[str, Any]) -> str:
    parts = []
    user = summary_privacy.get("user-level")
    if user and user.get("pipeline"):  # model = content-scorer: one figure for everything the run released
        from shared.privacy.pipeline import one_line as pipeline_line

        return pipeline_line(user)
    if summary_privacy.get("mechanism") != "none":
        eps_max = summary_privacy.get("all-epsilon-max")
        eps_med = summary_privacy.get("all-epsilon-median")
        if eps_max is None:
            parts.append("on-device DP: no device trained")
        else:
            capped = summary_privacy.get("capped-devices", 0)
            approx = "" if _is_bound(summary_privacy) else "approximate (GDP, not a guarantee) "
            parts.append(f"{approx}epsilon max {eps_max:.2f}, median {eps_med:.2f} over "
                         f"{summary_privacy['devices-with-spend']} devices"
                         f"{f' ({capped} reached their cap)' if capped else ''}, at delta "
                         f"{summary_privacy['delta']:g} ({summary_privacy['accountant'].split(' (')[0]}); "
                         "unit: one window of a user's history, add/remove one window (a single interaction: "
                         "replacing it, not inserting or deleting it), DP-SGD on device")
    if user:
        eps = user.get("epsilon")
        approx = "" if _is_bound(user) else "approximate (GDP, not a guarantee) "
        parts.append("user-level DP-FedAvg: " + ("no round aggregated" if eps is None else
                     f"{approx}epsilon {eps:.2f} at delta {user['delta']:g}; unit: a device's whole contribution, "
                     "add/remove one device, against anyone who sees released models (not the server)"))
    if parts and summary_privacy.get("consenting-cohort"):
        parts.append(f"NOT for the consenting cohort ({summary_privacy['consenting-cohort'].split(':')[0]})")
    return "; ".join(parts) if parts else "no differential privacy (dp = false, user-dp = false)"
