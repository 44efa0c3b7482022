"""One accountant for everything a `model = content-scorer` or `channel-scorer` run releases about a user.

Privacy unit: one user's whole history (one user per device; with more, a device's users together), under
adding or removing that user. The run releases, in this order:

1. the item-popularity histogram: the sum of every device's item-set vector (each user's distinct training
   items weighted 1/sqrt(n), L2 norm 1) plus N(0, z_pop^2) per item -- a Gaussian mechanism, sensitivity 1,
   no sampling;
1b. channel-scorer only: the windowed co-occurrence among the `cooc-items` items the released histogram ranks
   highest (post-processing): the sum of every user's pair vector (L2 norm 1) plus N(0, z_cooc^2) per pair --
   a Gaussian mechanism, sensitivity 1, no sampling;
1c. channel-scorer with `transition-release = true` only: the directed (previous -> next) transition counts among
   the `transition-items` items the released histogram ranks highest: the sum of every user's count matrix
   (L2-normalised, norm 1) plus N(0, z_transitions^2) per cell -- a Gaussian mechanism, sensitivity 1, no sampling;
2. every DP-FedAvg round: devices Poisson-sampled at rate q, each device's update (minus its gradient) clipped
   to C on the server, N(0, (z C)^2) on the sum, divided by the fixed q N -- the sampled Gaussian mechanism
   (q, z), once per round. The server optimizer (FedAdam) and evaluation are post-processing.

With `secure-aggregation = true` all three run under SecAgg+ (`shared/secagg.py`): each device clips (the rounds)
or bounds by construction (the analytics, each user's part of L2 norm <= 1) its contribution, adds its share of the
noise, N(0, sigma^2 / m_min) with sigma the central noise std and m_min = `secagg-min-cohort` (rounds) or
`secagg-release-min-cohort` (the analytics releases, which every device joins; 0 = the same), quantizes and masks
it; the server unmasks only sums of at least max(secagg-threshold, m_min) devices, whose noise variance is then at
least sigma^2, and refuses fewer (nothing released). The same accountant history then holds against the
honest-but-curious server too, while at least m_min devices in every unmasked sum follow the protocol; the
stochastic rounding is not modelled.

Hyperparameters are fixed before the run (the defaults); the run makes no choice on its private data, so
nothing else is released. The defaults themselves were chosen by the developers from measurements on ML-100K
(validation items; README): that choice is not in the epsilon, which is said wherever the figure is. Opacus'
accountant (the run's `accountant`: rdp or prv) composes the two as one history; `tests/test_scorer_pipeline.py`
checks the figure against dp-accounting (another code base).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from shared.consent import no_guarantee
from shared.errors import PrivrecError
from shared.privacy.accounting import epsilon_from_state

COMPOSABLE = ("rdp", "prv")  # Opacus' gdp accountant refuses a history whose noise or rate changes


def pipeline_history(popularity_noise: float, noise_multiplier: float, sample_rate: float,
                     rounds: int, cooc_noise: float | None = None,
                     transition_noise: float | None = None) -> list[list[float]]:
    """Accountant rows [noise multiplier, sample rate, steps]: the popularity release, the co-occurrence release
    (when `cooc_noise` is given: channel-scorer), the transition release (when `transition_noise` is given:
    channel-scorer with transition-release), then `rounds` rounds."""
    history = [[float(popularity_noise), 1.0, 1]]
    if cooc_noise is not None:
        history.append([float(cooc_noise), 1.0, 1])
    if transition_noise is not None:
        history.append([float(transition_noise), 1.0, 1])
    if rounds > 0:
        history.append([float(noise_multiplier), float(sample_rate), int(rounds)])
    return history


def pipeline_epsilon(popularity_noise: float, noise_multiplier: float, sample_rate: float, rounds: int,
                     delta: float, accountant: str, cooc_noise: float | None = None,
                     transition_noise: float | None = None) -> float:
    """User-level epsilon at `delta` of the popularity release (and the co-occurrence / transition releases, when
    their noise is given) composed with `rounds` DP-FedAvg rounds."""
    if accountant not in COMPOSABLE:
        raise PrivrecError(f"config key 'accountant' = {accountant}: the scorer pipelines compose different "
                           f"mechanisms, which Opacus' gdp accountant cannot; use one of {', '.join(COMPOSABLE)}")
    state = {"history": pipeline_history(popularity_noise, noise_multiplier, sample_rate, rounds, cooc_noise,
                                         transition_noise),
             "mechanism": accountant}
    return float(epsilon_from_state(state, delta, accountant))


def planned_sample_rate(cfg: Mapping[str, Any], num_devices: int) -> float:
    """Poisson rate q = expected cohort / population, as the ServerApp computes it
    (`server.strategy.user_sample_rate`; tools cannot import server/, a test keeps the two equal)."""
    wanted = cfg["devices-per-round"] if cfg["devices-per-round"] > 0 \
        else int(round(cfg["fraction-train"] * num_devices))
    return max(1, min(wanted, num_devices)) / num_devices


def cooc_noise(cfg: Mapping[str, Any]) -> float | None:
    """The co-occurrence release's noise multiplier when the config's model makes that release, else None."""
    return float(cfg["cooc-noise-multiplier"]) if cfg["model"] == "channel-scorer" else None


def transition_noise(cfg: Mapping[str, Any]) -> float | None:
    """The transition release's noise multiplier when the config makes that release (channel-scorer with
    `transition-release = true`), else None."""
    return float(cfg["transition-noise-multiplier"]) \
        if cfg["model"] == "channel-scorer" and cfg.get("transition-release") else None


def planned_epsilon(cfg: Mapping[str, Any], sample_rate: float) -> float:
    """The epsilon a scorer-pipeline config reaches after all its rounds (before anything runs)."""
    return pipeline_epsilon(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                            cfg["num-rounds"], cfg["delta"], cfg["accountant"], cooc_noise(cfg),
                            transition_noise(cfg))


def _releases(cfg: Mapping[str, Any]) -> str:
    z_cooc, z_t = cooc_noise(cfg), transition_noise(cfg)
    return f"popularity release z = {cfg['popularity-noise-multiplier']:g}" + (
        "" if z_cooc is None else f" + co-occurrence release z = {z_cooc:g}") + (
        "" if z_t is None else f" + transition release z = {z_t:g}")


def check_pipeline_budget(cfg: Mapping[str, Any], sample_rate: float, where: str = "") -> float:
    """The planned epsilon; PrivrecError naming the key when it exceeds `target-epsilon` (0 = no cap)."""
    epsilon = planned_epsilon(cfg, sample_rate)
    cap = cfg["target-epsilon"]
    if cap > 0 and epsilon > cap:
        raise PrivrecError(
            f"{where}config key 'target-epsilon' = {cap:g}: this run would reach user-level epsilon {epsilon:.3f} "
            f"({cfg['accountant']}, delta {cfg['delta']:g}: {_releases(cfg)} + {cfg['num-rounds']} rounds at "
            f"q = {sample_rate:.3g}, z = {cfg['user-noise-multiplier']:g}); raise the noise multipliers, or lower "
            "num-rounds")
    return epsilon


def noise_keys(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The config keys of the noise multipliers of every release the scorer-pipeline config makes."""
    return (("popularity-noise-multiplier",)
            + (("cooc-noise-multiplier",) if cooc_noise(cfg) is not None else ())
            + (("transition-noise-multiplier",) if transition_noise(cfg) is not None else ())
            + (("user-noise-multiplier",) if cfg["num-rounds"] > 0 else ()))


SIGNIFICANT_DIGITS = 4  # scaled multipliers are rounded up to these (readable in statements; more noise, never less)


def _round_up(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    exponent = math.floor(math.log10(value)) - digits + 1
    return round(math.ceil(value / 10.0 ** exponent) * 10.0 ** exponent, max(0, -exponent))


def scale_to_epsilon(cfg: Mapping[str, Any], sample_rate: float, target: float) -> tuple[dict[str, float], float]:
    """(noise multipliers, the epsilon they reach): the config's multipliers of every release (`noise_keys`) times
    one common factor, the smallest (bisection, relative width 1e-6) whose whole-run user-level epsilon under the
    config's accountant is <= `target`, each then rounded up to 4 significant digits. Their ratio is kept: how the
    config splits its budget between the releases and the rounds stays the same.

    Epsilon falls as any multiplier grows, so rounding up keeps it <= target. PrivrecError when no factor in
    [2^-40, 2^40] brackets the target (a target too small or too large for this accountant)."""
    if not target > 0:
        raise PrivrecError(f"--epsilon {target:g}: the user-level epsilon to reach must be > 0")
    keys = noise_keys(cfg)

    def scaled(factor: float) -> dict[str, float]:
        return {k: float(cfg[k]) * factor for k in keys}

    def epsilon(multipliers: Mapping[str, float]) -> float:
        value = planned_epsilon({**cfg, **multipliers}, sample_rate)
        return value if math.isfinite(value) else math.inf

    low, high = 1.0, 1.0  # epsilon(low) > target >= epsilon(high)
    for _ in range(40):
        if epsilon(scaled(high)) <= target:
            break
        high *= 2.0
    else:
        raise PrivrecError(f"--epsilon {target:g}: not reachable with noise multipliers up to 2^40 x the configured")
    low = high
    for _ in range(80):
        if epsilon(scaled(low)) > target:
            break
        low /= 2.0
    else:
        raise PrivrecError(f"--epsilon {target:g}: every noise multiplier down to 2^-40 x the configured already "
                           "reaches it; lower num-rounds or the target")
    while high / low > 1 + 1e-6:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if epsilon(scaled(middle)) <= target else (middle, high)
    multipliers = {k: max(_round_up(z), z) for k, z in scaled(high).items()}  # max: round()'s last-bit error
    return multipliers, epsilon(multipliers)


def secure(cfg: Mapping[str, Any]) -> bool:
    """Whether the run's releases and rounds go through secure aggregation (all of them, or none)."""
    return bool(cfg.get("secure-aggregation"))


def release_min_cohort(cfg: Mapping[str, Any]) -> int:
    """m_min of the analytics releases under secure aggregation (`secagg-release-min-cohort`, 0 = the rounds')."""
    return int(cfg.get("secagg-release-min-cohort") or cfg["secagg-min-cohort"])


def _release_adversary(cfg: Mapping[str, Any], seen: str, m_min: int) -> str:
    """Who a part of the pipeline is protected against, `seen` being what it releases, `m_min` its minimum cohort."""
    if secure(cfg):
        return (f"whoever sees {seen}, AND the honest-but-curious server (secure aggregation: it sees only masked "
                f"vectors and sums of at least max(secagg-threshold, m_min) = {max(cfg['secagg-threshold'], m_min)} "
                f"devices), while at least m_min = {m_min} devices in every unmasked sum follow the protocol and "
                "keep their noise share secret")
    return f"whoever sees {seen}; NOT the server, which sees each device's vector (no secure aggregation)"


def _noise(cfg: Mapping[str, Any], z: float) -> str:
    """How an analytics release's Gaussian noise of multiplier `z` (sensitivity 1) is drawn."""
    if secure(cfg):
        m_min = release_min_cohort(cfg)
        return (f"noise multiplier {z:g}, drawn as one share N(0, {z:g}^2 / {m_min}) per device (m_min = {m_min}), "
                f"quantized and masked; the server unmasks only a sum of at least "
                f"{max(cfg['secagg-threshold'], m_min)} devices (else nothing is released) and adds nothing")
    return f"noise multiplier {z:g}, added by the server"


def statement(cfg: Mapping[str, Any], sample_rate: float, population: int, rounds: int) -> dict[str, Any]:
    """The full guarantee of a scorer-pipeline run after `rounds` rounds (privacy.json, summary.json)."""
    z_cooc, z_t = cooc_noise(cfg), transition_noise(cfg)
    channel = z_cooc is not None
    seen = "popularity histogram, the released co-occurrence" + (", the released transitions" if z_t is not None
                                                                  else "")
    cooc = (f"2) windowed co-occurrence among the {cfg['cooc-items']} items the released histogram ranks highest "
            f"(post-processing): Gaussian, sensitivity 1 (each user's weighted pairs at distance <= "
            f"{cfg['cooc-window']}, L2-normalised), {_noise(cfg, z_cooc)}, no sampling, one release; "
            ) if channel else ""
    if z_t is not None:
        cooc += (f"3) directed (previous -> next) transitions among the {cfg['transition-items']} items the released "
                 f"histogram ranks highest (post-processing): Gaussian, sensitivity 1 (each user's consecutive-pair "
                 f"counts, L2-normalised), {_noise(cfg, z_t)}, no sampling, one release; ")
    cooc += f"{2 + channel + (z_t is not None)}) "
    clip, z = f"{cfg['user-clipping-norm']:g}", cfg["user-noise-multiplier"]
    if secure(cfg):
        rounds_noise = (f"clipped on the device to L2 norm {clip}, plus the device's Gaussian share N(0, ({z:g} x "
                        f"{clip})^2 / {cfg['secagg-min-cohort']}), quantized to {cfg['secagg-quantization-bits']} bits "
                        f"and masked (SecAgg+); the server unmasks only the sum of at least "
                        f"{max(cfg['secagg-threshold'], cfg['secagg-min-cohort'])} devices (noise variance at least "
                        f"({z:g} x {clip})^2; a round with fewer is refused and releases nothing)")
    else:
        rounds_noise = f"clipped on the server to L2 norm {clip}, N(0, ({z:g} x {clip})^2) on the sum"
    m_release = release_min_cohort(cfg)
    parts = {"popularity release": _release_adversary(cfg, "the released popularity histogram", m_release)}
    if channel:
        parts["co-occurrence release"] = _release_adversary(cfg, "the released co-occurrence", m_release)
    if z_t is not None:
        parts["transition release"] = _release_adversary(cfg, "the released transitions", m_release)
    parts["DP-FedAvg rounds"] = _release_adversary(cfg, "the released models", cfg["secagg-min-cohort"])
    gradient = ("its gradient of the mean loss over its last {n} training items, its history masked and its own "
                "co-occurrence" + (" and transition" if z_t is not None else "") +
                " contribution removed from its features" if channel else
                "its gradient of the mean loss over its last {n} training items").format(n=cfg["scorer-targets"])
    return {
        "model": cfg["model"],
        "epsilon": pipeline_epsilon(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                                    rounds, cfg["delta"], cfg["accountant"], z_cooc, z_t),
        "planned-epsilon": planned_epsilon(cfg, sample_rate),
        "target-epsilon": cfg["target-epsilon"],
        "delta": cfg["delta"],
        "unit": "one user's whole history (with one user per device: the device's whole contribution)",
        "relation": "add/remove one user",
        "accountant": f"Opacus {cfg['accountant']}, one history composing every release "
                      "(checked against dp-accounting in tests)",
        "history": pipeline_history(cfg["popularity-noise-multiplier"], cfg["user-noise-multiplier"], sample_rate,
                                    rounds, z_cooc, z_t),
        "mechanism": (f"1) popularity histogram: Gaussian, sensitivity 1 (each user's item set / sqrt(n)), "
                      f"{_noise(cfg, cfg['popularity-noise-multiplier'])}, no sampling, one release; {cooc}"
                      f"{rounds} round(s) of DP-FedAvg (FedSGD) of the {cfg['model']}: each device's update = minus "
                      f"{gradient}, {rounds_noise}, divided by the expected cohort; {cfg['strategy']} as "
                      "post-processing"),
        "sampling": f"analytics releases: every device, no sampling; rounds: Poisson sampling of devices at rate "
                    f"q = {sample_rate:.4g} per round over {population} devices",
        "on-device-dp": "off (dp = false): no window-level DP-SGD; the guarantee is the user-level one above",
        "adversary": ("whoever sees the released " + (seen if channel else "popularity histogram") +
                      " and the released models (other devices, users of the model), AND the honest-but-curious "
                      "server: every part runs under secure aggregation, and holds against the server while at least "
                      f"m_min devices in every unmasked sum follow the protocol and keep their noise share secret "
                      f"(m_min = secagg-min-cohort = {cfg['secagg-min-cohort']} for a round, {m_release} for an "
                      "analytics release; devices colluding with the server can remove their own shares)")
                     if secure(cfg) else
                     ("whoever sees the released " + (seen if channel else "popularity histogram") +
                      " and the released models (other devices, users of the model); NOT the server, which sees "
                      "each device's contribution vectors and unclipped update (secure-aggregation = false)"),
        "adversary-by-part": parts,
        "secure-aggregation": secure(cfg),
        **({"secagg-min-cohort": cfg["secagg-min-cohort"], "secagg-release-min-cohort": m_release}
           if secure(cfg) else {}),
        **({"quantization": f"each device rounds stochastically to {cfg['secagg-quantization-bits']} bits over "
                            f"[-{cfg['secagg-clip-range']:g}, {cfg['secagg-clip-range']:g}]; the accountant treats "
                            "each quantized sum as the continuous Gaussian sum (the rounding is not modelled)"}
           if secure(cfg) else {}),
        "hyperparameters": "fixed before the run; the run makes no choice on its private data. The defaults were "
                           "chosen by the developers from ML-100K measurements (validation items): that choice "
                           "is not counted in epsilon",
        "population": population,
        **({"transition-release": True} if z_t is not None else {}),
        **({"consenting-cohort": consenting_cohort(cfg, population)} if cfg.get("public-share", 0) > 0 else {}),
    }


def consenting_cohort(cfg: Mapping[str, Any], population: int) -> str:
    """Who the figure does NOT protect when a consenting cohort pretrained the SASRec channel (public-share > 0)."""
    return (no_guarantee(cfg, population, "the scorer's SASRec channel") + ". The epsilon above holds for every "
            "other user, whose data the SASRec channel never saw")


def _what(record: Mapping[str, Any]) -> tuple[str, str]:
    """(the releases in words, what the adversary sees) of a statement, by whether it has the co-occurrence."""
    if record.get("model") != "channel-scorer":
        return ("DP popularity release", "released histogram and models")
    transitions = " + DP transition release" if record.get("transition-release") else ""
    return (f"DP popularity release + DP co-occurrence release{transitions}", "released histograms and models")


def sentence(record: Mapping[str, Any], rounds: int) -> dict[str, Any]:
    """privacy.json's statement of a scorer-pipeline run (the shape of `shared.privacy.statement.sentences`)."""
    releases, seen = _what(record)
    text = (f"Whole pipeline ({releases} + {rounds} round(s) of user-level DP-FedAvg of the scorer): each "
            f"user's entire history is protected with epsilon <= {record['epsilon']:.3g} at delta "
            f"{record['delta']:g} for adding or removing one user ({record['accountant']}; {record['sampling']}) "
            f"against whoever sees the {seen}, " + (
                f"and against the honest-but-curious server (every release and round under secure aggregation), "
                f"while at least {record['secagg-min-cohort']} devices in every round's unmasked sum and "
                f"{record['secagg-release-min-cohort']} in every analytics release's "
                "follow the protocol (quantization not modelled by the accountant)" if record.get("secure-aggregation")
                else "but not against the server (secure-aggregation = false)") + ". No on-device DP-SGD (dp = false)."
            + (f" {record['consenting-cohort']}." if record.get("consenting-cohort") else ""))
    return {"mechanism": f"user-level pipeline ({releases.replace('DP ', '')} + DP-FedAvg)", "sentence": text,
            "epsilon": record["epsilon"], "delta": record["delta"], "accountant": record["accountant"],
            "is-a-bound": True, "unit": record["unit"], "relation": record["relation"],
            "adversary": record["adversary"], "sampling": record["sampling"]}


def one_line(record: Mapping[str, Any]) -> str:
    releases, seen = _what(record)
    return (f"user-level epsilon {record['epsilon']:.2f} at delta {record['delta']:g} (Opacus "
            f"{record['accountant'].split(',')[0].removeprefix('Opacus ')}); unit: one user's whole history, "
            f"add/remove one user; covers the {releases.replace('DP ', '').replace(' + ', ' and ')} and every "
            f"round; against whoever sees the {seen}, " + (
                "and the server (secure aggregation, while at least "
                f"{record['secagg-min-cohort']} devices per round's sum and {record['secagg-release-min-cohort']} "
                "per release's follow the protocol)" if record.get("secure-aggregation")
                else "not the server (no secure aggregation)") + "; no on-device DP-SGD"
            + ("; NOT for the consenting cohort (see privacy.json)" if record.get("consenting-cohort") else ""))
