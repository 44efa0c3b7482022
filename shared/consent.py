"""Who consented (`public-share > 0`, simulation only): drawn from the run seed, so the server (which pretrains on
their histories) and every device (which then knows whether it is one of them) draw the same set."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.config import RunConfig


def consenting_devices(cfg: RunConfig | Mapping[str, Any], num_devices: int) -> np.ndarray:
    """The devices whose users consented, drawn from the run seed (sorted device ids)."""
    federation = RunConfig.of(cfg).federation
    return consenting_draw(federation.seed, federation.public_share, num_devices)


def consenting_draw(seed: int, public_share: float, num_devices: int) -> np.ndarray:
    """`consenting_devices` from its three inputs (for a device, which holds no flat config to validate)."""
    count = int(round(public_share * num_devices))
    rng = np.random.default_rng([seed, 0x5055424C])  # independent of every other use of the seed
    return np.sort(rng.choice(num_devices, size=count, replace=False))


def no_guarantee(cfg: Mapping[str, Any], population: int | None, pretrained: str) -> str:
    """The privacy statements' sentence on whom no figure covers when `public-share` > 0: the consenting users,
    whose histories pretrained `pretrained`."""
    share = float(cfg["public-share"])
    who = f"{int(round(share * population))} consenting users" if population else "The consenting users"
    return (f"{who} (public-share = {share:g}) have no guarantee: the server read their training histories in full "
            f"to pretrain {pretrained}, without noise")


__all__ = ["consenting_devices", "consenting_draw", "no_guarantee"]
