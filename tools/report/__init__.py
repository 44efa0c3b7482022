"""`privrec report RUN_DIR`: what a run's privacy guarantee is, checked, in md, html and json.

    load.py       read and validate the run directory (PrivrecError naming the file/line/key at fault)
    recompute.py  recompute every epsilon with RDP and PRV; flag disagreements with the records
    independent.py  the same with dp-accounting (RDP, PLD), and each history row against the config
    plots.py      PNG figures (matplotlib, Agg)
    render.py     report.json (docs/report-format.md), report.md, report.html (self-contained)
"""

from __future__ import annotations

from pathlib import Path

from shared.atomic import write_bytes_atomic
from shared.errors import PrivrecError

REPORT_FILES = ("report.md", "report.html", "report.json")


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the report of `run_dir` into `out_dir` (default: the run directory); returns report.json's data.

    Everything is rendered in memory first and each file is then replaced atomically, so a
    failure leaves the previous report (or none), never a half-written file.
    """
    from tools.report.load import load_run
    from tools.report.plots import make_plots
    from tools.report.recompute import cross_check
    from tools.report.render import dumps, report_json, to_html, to_markdown

    run = load_run(run_dir)
    out = Path(out_dir).expanduser() if out_dir is not None else run.path
    if out.exists() and not out.is_dir():
        raise PrivrecError(f"--out {out}: exists and is not a directory")
    check = cross_check(run.privacy, run.rounds, run.config,
                        run.config.get("run-name") or run.path.name) if run.privacy is not None else None
    plots = make_plots(run, check)
    report = report_json(run, check, plots)
    files = {plot.file: plot.png for plot in plots}
    files["report.md"] = to_markdown(report).encode()
    files["report.html"] = to_html(report, plots).encode()
    files["report.json"] = dumps(report)
    try:
        for name, data in files.items():
            write_bytes_atomic(out / name, data)
    except OSError as exc:
        raise PrivrecError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    return report
