"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, no files until published)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from tools.report.load import Run
from tools.report.recompute import CrossCheck


@dataclass
class Plot:
    file: str
    title: str
    png: bytes


def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.4), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # rounds and device counts are whole numbers
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_ylabel() == "devices":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    buffer = io.BytesIO()
    fig.tight_layout()
    # No Software/date metadata: the same run gives byte-identical images.
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["round"], r.get(key)) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _epsilon_label(run: Run) -> str:
    return f"epsilon (delta {run.config.get('delta'):g}, {run.config.get('accountant')})"


def make_plots(run: Run, check: CrossCheck | None) -> list[Plot]:
    plots = []
    rows = run.rounds
    cfg = run.config
    # Without on-device DP-SGD (dp = false) every device's on-device epsilon is 0 by construction: no histogram of it.
    if check is not None and check.devices and cfg.get("dp"):
        values = [d.device.epsilon for d in check.devices if d.device.epsilon is not None]
        fig, (ax,) = _figure()
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4c72b0", edgecolor="white")
        if cfg.get("max-epsilon"):
            ax.axvline(cfg["max-epsilon"], color="#c44e52", linestyle="--", label=f"cap {cfg['max-epsilon']:g}")
            ax.legend()
        ax.set_xlabel("epsilon reported by the device (cumulative, " + _epsilon_label(run).split("(", 1)[1])
        ax.set_ylabel("devices")
        ax.set_title(f"Per-device epsilon at the end ({len(values)} devices)")
        plots.append(Plot("epsilon-histogram.png", "Distribution of per-device epsilon", _png(fig)))

    if any(r.get("epsilon-max") is not None for r in rows):
        fig, (ax,) = _figure()
        for key, label, style in (("epsilon-max", "max over devices so far", "-o"),
                                  ("epsilon-median", "median over devices so far", "-s"),
                                  ("round-epsilon-max", "max over this round's cohort", ":^")):
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, style, label=label, markersize=4)
        if cfg.get("max-epsilon"):
            ax.axhline(cfg["max-epsilon"], color="#c44e52", linestyle="--", label="cap")
        ax.set_xlabel("round")
        ax.set_ylabel(_epsilon_label(run))
        ax.set_title("On-device epsilon vs round")
        ax.legend(fontsize=8)
        plots.append(Plot("epsilon-rounds.png", "On-device epsilon (max, median) vs round", _png(fig)))

    if cfg.get("max-epsilon"):
        fig, (ax,) = _figure()
        x, y = _series(rows, "capped-devices")
        ax.plot(x, y, "-o", markersize=4, label="devices at their cap (cumulative)")
        xd, yd = _series(rows, "declined")
        ax.bar(xd, yd, alpha=0.4, color="#c44e52", label="declined this round")
        ax.set_xlabel("round")
        ax.set_ylabel("devices")
        ax.set_title(f"Devices that hit their cap (max-epsilon {cfg['max-epsilon']:g})")
        ax.legend(fontsize=8)
        plots.append(Plot("capped-rounds.png", "Devices that hit their cap vs round", _png(fig)))

    if cfg.get("user-dp") and any(r.get("user-level-epsilon") is not None for r in rows):
        fig, (ax,) = _figure()
        x, y = _series(rows, "user-level-epsilon")
        ax.plot(x, y, "-o", color="#55a868", markersize=4)
        ax.set_xlabel("round")
        ax.set_ylabel(_epsilon_label(run))
        ax.set_title("User-level epsilon (DP-FedAvg) vs round")
        plots.append(Plot("user-epsilon-rounds.png", "User-level epsilon vs round", _png(fig)))

    x, y = _series(rows, "ndcg@10")
    if x:
        fig, (left, right) = _figure(2)
        ci = [r.get("ndcg@10-ci") for r in rows if isinstance(r.get("ndcg@10"), (int, float))]
        if all(isinstance(c, list) and len(c) == 2 for c in ci):
            err = [[v - c[0] for v, c in zip(y, ci)], [c[1] - v for v, c in zip(y, ci)]]
            left.errorbar(x, y, yerr=err, fmt="-o", capsize=3, markersize=4, label="95% CI")
            left.legend(fontsize=8)
        else:
            left.plot(x, y, "-o", markersize=4)
        left.set_xlabel("round")
        left.set_ylabel("NDCG@10 (federated evaluation)")
        left.set_title("Accuracy")
        for key, label in (("epsilon-max", "on-device, max"), ("user-level-epsilon", "user-level")):
            ex, ey = _series(rows, key)
            if ex:
                right.plot(ex, ey, "-o", markersize=4, label=label)
        right.set_xlabel("round")
        right.set_ylabel(_epsilon_label(run))
        right.set_title("Privacy spent")
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize=8)
        right.set_xlim(left.get_xlim())
        plots.append(Plot("ndcg-epsilon.png", "NDCG@10 beside epsilon vs round", _png(fig)))
    return plots
