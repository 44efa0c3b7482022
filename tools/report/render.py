"""report.json (the data, format documented in docs/report-format.md), and report.md / report.html
rendered from it, so the three can never disagree."""

from __future__ import annotations

import base64
import html
import json
import statistics
import time
from typing import Any

from tools.report import independent
from tools.report.independent import Expected, Figure
from tools.report.load import CONFIG_KEYS, Run, finite_or_none
from tools.report.plots import Plot
from tools.report.recompute import ABS_TOL, REL_TOL, SECOND, CrossCheck, DeviceCheck, Epsilon

REPORT_FORMAT = 1
ROUND_KEYS = ("round", "devices-trained", "declined", "capped-devices", "epsilon-max", "epsilon-median",
              "round-epsilon-max", "round-epsilon-median", "user-level-epsilon", "ndcg@10", "ndcg@10-ci",
              "hr@10", "hr@10-ci")


def _eps_map(recomputed: dict[str, Epsilon] | dict[str, Figure]) -> dict[str, Any]:
    return {name: e.to_json() for name, e in recomputed.items()}


def _expected_json(expected: Expected | None) -> dict[str, Any] | None:
    if expected is None:
        return None
    return {"noise-multiplier": expected.noise_multiplier, "sample-rate": expected.sample_rate,
            "steps-per-round": expected.steps_per_round, "basis": expected.basis}


def _device_json(d: DeviceCheck) -> dict[str, Any]:
    dev = d.device
    ledger = None
    if dev.ledger is not None:
        lg = dev.ledger
        ledger = {"epsilon": finite_or_none(lg.epsilon),
                  "recomputed": d.ledger_recomputed.to_json() if d.ledger_recomputed else None,
                  "steps": sum(n for _, _, n in lg.history),
                  "declined-round": (lg.declined or {}).get("round") if isinstance(lg.declined, dict) else None,
                  "user-level-releases": len(lg.releases),
                  "user-level-epsilon": d.ledger_user_level.value if d.ledger_user_level else None,
                  "error": lg.error}
    # rounds whose aggregate held its update, as the server counted them (on-device DP rounds in older runs)
    trained = len(dev.update_rounds) if dev.update_rounds is not None else len(dev.rounds)
    return {"device": dev.device, "accountant": dev.accountant, "rounds-trained": trained,
            "update-rounds": dev.update_rounds,
            "rounds": [[r, finite_or_none(e)] for r, e in dev.rounds],
            "steps": sum(n for _, _, n in dev.history),
            "epsilon-reported": finite_or_none(dev.epsilon), "recomputed": _eps_map(d.recomputed),
            "independent": _eps_map(d.independent), "expected-history": _expected_json(d.expected),
            "declined-round": dev.declined_round, "ledger": ledger, "flags": [f.to_json() for f in d.flags]}


def _statement_sentence(s: dict[str, Any]) -> str:
    if s.get("sentence"):
        return str(s["sentence"])
    return (f"{s.get('mechanism')}: ({s.get('epsilon')}, {s.get('delta')})-differential privacy for "
            f"{s.get('unit')}, against {s.get('adversary')}.")


def report_json(run: Run, check: CrossCheck | None, plots: list[Plot]) -> dict[str, Any]:
    cfg = run.config
    status = run.status or {}
    privacy: dict[str, Any] = {"available": run.privacy is not None, "reason": run.privacy_missing_reason,
                               "source": run.privacy.source if run.privacy else None,
                               "delta": cfg.get("delta"), "accountant": cfg.get("accountant"), "ledgers": None,
                               "statements": [], "devices": [], "flagged-devices": [], "user-level": None,
                               "metrics-checks": [], "flagged": False}
    if run.privacy is not None and check is not None:
        p = run.privacy
        if p.source == "ledgers":
            ledgers = "devices/device-<id>/privacy-ledger.json, the only record (privacy.json missing)"
        elif p.ledgers_present and p.ledger_layout == "local deployment":
            ledgers = "local deployment: devices/device-<id>/state/device-<id>/privacy-ledger.json"
        elif p.ledgers_present:
            ledgers = "simulation: devices/device-<id>/privacy-ledger.json"
        else:
            ledgers = "absent (deployment: ledgers stay on the devices); recomputed from privacy.json"
        privacy.update(delta=p.delta, accountant=p.accountant, ledgers=ledgers)
        privacy["statements"] = [
            {**{k: s["statement"].get(k) for k in ("mechanism", "epsilon", "delta", "unit", "adversary",
                                                   "accountant", "sampling")},
             "sentence": _statement_sentence(s["statement"]),
             "check": {k: s[k] for k in ("basis", "recomputed", "ok", "detail")}}
            for s in check.statements]
        privacy["devices"] = [_device_json(d) for d in check.devices]
        privacy["metrics-checks"] = check.metrics
        privacy["flagged-devices"] = [d.device.device for d in check.devices if d.flags]
        if check.user_level is not None:
            u = check.user_level
            privacy["user-level"] = {
                "accountant": u.user_level.accountant, "population": u.user_level.population,
                "expected-cohort": u.user_level.expected_cohort,
                "rounds": [[r, finite_or_none(e)] for r, e in u.user_level.rounds],
                "epsilon-reported": finite_or_none(u.reported), "recomputed": _eps_map(u.recomputed),
                "independent": _eps_map(u.independent), "expected-history": _expected_json(u.expected),
                "flags": [f.to_json() for f in u.flags]}
        privacy["flagged"] = bool(privacy["flagged-devices"] or (check.user_level and check.user_level.flags)
                                  or not all(s["ok"] for s in check.statements)
                                  or not all(c["ok"] for c in check.metrics))
    notes = [privacy["reason"] + "."] if privacy["available"] and privacy["reason"] else []
    if status.get("state") != "completed":
        notes.append(f"The run is not complete (state: {status.get('state', 'unknown')}); figures cover the "
                     f"rounds recorded so far ({len(run.rounds)} rows in metrics.jsonl).")
    if privacy["accountant"] == "gdp":
        notes.append("The run used the GDP accountant, a CLT approximation rather than a guarantee; compare with "
                     "the RDP and PRV columns.")
    return {
        "format": REPORT_FORMAT,
        "generated-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": {"id": run.path.resolve().name, "path": str(run.path.resolve()), "state": status.get("state"),
                "state-detail": status.get("error") or status.get("reason"), "completed": run.summary is not None},
        "config": {k: cfg.get(k) for k in CONFIG_KEYS},
        "tolerance": {"relative": REL_TOL, "absolute": ABS_TOL,
                      "independent": {"relative": independent.REL_TOL, "absolute": independent.ABS_TOL}},
        "privacy": privacy,
        "rounds": [{k: row.get(k) for k in ROUND_KEYS} for row in run.rounds],
        "evaluation": (run.summary or {}).get("federated-evaluation"),
        "plots": [{"file": p.file, "title": p.title} for p in plots],
        "notes": notes,
    }


def dumps(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=1, allow_nan=False) + "\n").encode()


# ------------------------------------------------------------------------------ tables
def _num(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, list) and len(value) == 2:
        return f"[{_num(value[0], spec)}, {_num(value[1], spec)}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if spec == "d" and not float(value).is_integer():
        spec = ".4g"
    return format(int(value) if spec == "d" else value, spec)


def _recomputed(entry: dict[str, Any]) -> str:
    return _num(entry["epsilon"]) if entry["epsilon"] is not None else f"n/a ({entry['error']})"


def opening(report: dict[str, Any]) -> list[str]:
    """The sentences the report opens with: one per mechanism, or why there is none."""
    p = report["privacy"]
    # Seed-derived noise voids the on-device guarantee: say so before any sentence that states one.
    first = ["This run used deterministic device noise (deterministic-devices = true): anyone who knows the run seed "
             "can regenerate and remove it, so the on-device epsilon below is accounting only and protects "
             "nothing."] if report["config"].get("deterministic-devices") else []
    if not p["available"]:
        return first + [f"No privacy statement: {p['reason']}."]
    if not p["statements"]:
        return first + ["This run has no differential privacy (dp = false and user-dp = false): nothing it "
                        "released is protected by a formal guarantee."]
    return first + [s["sentence"] for s in p["statements"]]


def statement_terms(s: dict[str, Any], report: dict[str, Any]) -> str:
    """The exact terms under a sentence: epsilon with delta, accountant, mechanism, sampling, unit."""
    check = s["check"]
    verdict = "consistent with the recomputation" if check["ok"] else f"CHECK FAILED: {check['detail']}"
    return (f"{s['mechanism']}: epsilon = {_num(s['epsilon'])} at delta = {_num(s['delta'], 'g')}, "
            f"{s['accountant']} accountant; unit: {s['unit']}; sampling: {s['sampling']}; "
            f"adversary: {s['adversary']} ({verdict}).")


def round_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["round", "devices trained", "declined", "devices at cap (cum.)", "epsilon max (all so far)",
            "epsilon median (all so far)", "epsilon max (this round)", "user-level epsilon", "NDCG@10 [95% CI]",
            "HR@10"]
    rows = []
    for r in report["rounds"]:
        ndcg = "-" if r["ndcg@10"] is None else f"{r['ndcg@10']:.4f} {_num(r['ndcg@10-ci'])}"
        rows.append([str(r["round"]), _num(r["devices-trained"], "d"), _num(r["declined"], "d"),
                     _num(r["capped-devices"], "d"), _num(r["epsilon-max"]), _num(r["epsilon-median"]),
                     _num(r["round-epsilon-max"]), _num(r["user-level-epsilon"]), ndcg, _num(r["hr@10"])])
    return head, rows


def device_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    p = report["privacy"]
    extra = [a for a in (p["accountant"],) if a not in SECOND]
    ledgers = p["ledgers"] is not None and p["ledgers"].startswith(("simulation", "local deployment"))
    all_runs = ledgers and any(d["ledger"] and d["ledger"].get("user-level-epsilon") is not None
                               for d in p["devices"])
    head = (["device", "rounds trained", "on-device epsilon reported"]
            + [f"recomputed {a.upper()}" for a in (*SECOND, *extra)]
            + ["dp-accounting RDP", "dp-accounting PLD"]
            + (["ledger epsilon"] if ledgers else [])
            + (["ledger user-level epsilon, all runs"] if all_runs else []) + ["declined round", "flag"])
    rows = []
    for d in p["devices"]:
        row = [d["device"], str(d["rounds-trained"]), _num(d["epsilon-reported"])]
        row += [_recomputed(d["recomputed"][a]) for a in (*SECOND, *extra)]
        row += [_recomputed(d["independent"][a]) if a in d["independent"] else "-" for a in ("rdp", "pld")]
        if ledgers:
            row.append(_num(d["ledger"]["epsilon"]) if d["ledger"] and not d["ledger"]["error"] else "n/a")
        if all_runs:
            row.append(_num(d["ledger"]["user-level-epsilon"]) if d["ledger"] else "n/a")
        row += [_num(d["declined-round"], "d"), ", ".join(f["code"] for f in d["flags"]) or "ok"]
        rows.append(row)
    return head, rows


def device_preface(report: dict[str, Any]) -> str | None:
    """Without on-device DP-SGD the per-device table holds empty window-level records (epsilon 0 by construction):
    say so above it, and where each user's spend is stated instead, so that no one reads the zeros as spend."""
    if report["config"].get("dp"):
        return None
    u = report["privacy"]["user-level"]
    consenting = int(round(float(report["config"].get("public-share") or 0.0) * u["population"])) if u else 0
    covered = (f"each of the {u['population'] - consenting} devices outside the consenting cohort (its {consenting} "
               "users' histories were read by the server: no guarantee for them)" if consenting else
               f"each of the {u['population']} devices") if u else ""
    where = (f"every user's spend is the user-level figure above, epsilon {_num(u['epsilon-reported'])} at delta "
             f"{_num(report['privacy']['delta'], 'g')}, for {covered}, whether or not a round sampled it" if u else
             "this run states no user-level guarantee either")
    all_runs = sorted(d["ledger"]["user-level-epsilon"] for d in report["privacy"]["devices"]
                      if d["ledger"] and d["ledger"].get("user-level-epsilon") is not None)
    ledgers = (f" Across every run on this store, the devices' own ledgers hold up to "
               f"{_num(all_runs[-1])} (median {_num(statistics.median(all_runs))}) for the devices in the table: "
               "their user-level releases of all runs composed, each without sampling amplification (column "
               "'ledger user-level epsilon, all runs'; one device: `privrec ledger`)." if all_runs else "")
    return ("No on-device DP-SGD in this run (dp = false): the table lists each device's on-device (window-level) "
            "record, empty and 0 by construction, and checks it like any other so that a tampered record is still "
            f"caught. It is not the device's privacy spend: {where}.{ledgers}")


def _flag_lines(report: dict[str, Any]) -> list[str]:
    p = report["privacy"]
    lines = [f"device {d['device']}: {f['code']}: {f['detail']}" for d in p["devices"] for f in d["flags"]]
    if p["user-level"]:
        lines += [f"user-level: {f['code']}: {f['detail']}" for f in p["user-level"]["flags"]]
    lines += [f"metrics.jsonl: {c['detail']}" for c in p["metrics-checks"] if not c["ok"]]
    return lines


def _user_level_line(report: dict[str, Any]) -> str | None:
    u = report["privacy"]["user-level"]
    if not u:
        return None
    recomputed = ", ".join([f"{name.upper()} {_recomputed(e)}" for name, e in u["recomputed"].items()]
                           + [f"dp-accounting {name.upper()} {_recomputed(e)}" for name, e in u["independent"].items()])
    return (f"User-level DP-FedAvg ({u['accountant']} accountant, population {u['population']}, expected cohort "
            f"{u['expected-cohort']}): epsilon after the last round {_num(u['epsilon-reported'])}; recomputed "
            f"from its history: {recomputed}; " + (", ".join(f["code"] for f in u["flags"]) or "ok") + ".")


def _crosscheck_summary(report: dict[str, Any]) -> str:
    p = report["privacy"]
    tol = report["tolerance"]
    ind = tol["independent"]
    return (f"{len(p['devices'])} devices; every epsilon recomputed from its recorded history with RDP and PRV "
            f"(Opacus accountants, delta {_num(p['delta'], 'g')}); the run's accountant is {p['accountant']}, and "
            f"its recomputation must match the reported figure within relative tolerance {tol['relative']:g} "
            f"(absolute {tol['absolute']:g}). Independently, with another code base (Google's dp-accounting, "
            f"RDP and PLD, add/remove one): the recorded figure must agree with dp-accounting's "
            f"{independent.COMPARED_WITH.get(p['accountant'], 'pld').upper()} within {ind['relative']:.0%} "
            f"(absolute {ind['absolute']:g}) and never be below it; every history row "
            "(noise multiplier, sample rate, steps) is checked against the run's config"
            + (" and the device's data." if any((d.get("expected-history") or {}).get("basis", "").startswith("device")
                                                for d in p["devices"]) else ".")
            + f" Ledgers: {p['ledgers']}. "
            f"Flagged: {len(p['flagged-devices'])} device(s)"
            + (f" ({', '.join(p['flagged-devices'])})." if p["flagged-devices"] else "."))


# ------------------------------------------------------------------------------ markdown
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(out)


def to_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    p = report["privacy"]
    parts = [f"# Privacy report: run {run['id']}", "", *[f"{s}\n" for s in opening(report)]]
    parts += [f"- {statement_terms(s, report)}" for s in p["statements"]]
    parts += ["", f"Run state: {run['state'] or 'unknown'}"
              + (f" ({run['state-detail']})" if run["state-detail"] else "") + f"; {len(report['rounds'])} rounds "
              "recorded (round 0 is before training).", ""]
    parts += [f"> {note}\n" for note in report["notes"]]
    if p["available"]:
        parts += ["## Cross-check", "", _crosscheck_summary(report), ""]
        parts += [line + "\n" for line in (_user_level_line(report),) if line]
        parts += [f"- {line}" for line in _flag_lines(report)] + [""]
    parts += ["## Per round", "", _md_table(*round_table(report)), ""]
    if p["available"]:
        parts += ["## Per device", ""] + [line + "\n" for line in (device_preface(report),) if line]
        parts += [_md_table(*device_table(report)), ""]
    else:
        parts += ["## Per device", "", f"Not available: {p['reason']}.", ""]
    if report["plots"]:
        parts += ["## Plots", ""] + [f"![{pl['title']}]({pl['file']})\n" for pl in report["plots"]]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------ html
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #222; line-height: 1.45; }
p.guarantee { font-size: 1.1em; border-left: 4px solid #4c72b0; padding-left: .8em; }
ul.terms, .note { color: #444; font-size: .92em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f0f3f8; }
td:first-child, th:first-child { text-align: left; }
tr.flagged td { background: #fde8e8; }
.bad { color: #b00020; font-weight: 600; }
figure { display: inline-block; margin: .5em; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _html_table(head: list[str], rows: list[list[str]], table_id: str, flag_col: int | None = None) -> str:
    esc = html.escape
    out = [f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        flagged = flag_col is not None and row[flag_col] != "ok"
        out.append(("<tr class=\"flagged\">" if flagged else "<tr>")
                   + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def to_html(report: dict[str, Any], plots: list[Plot]) -> str:
    esc = html.escape
    run = report["run"]
    p = report["privacy"]
    body = [f"<h1>Privacy report: run {esc(run['id'])}</h1>"]
    body += [f'<p class="guarantee">{esc(s)}</p>' for s in opening(report)]
    if p["statements"]:
        items = [(("<li>" if s["check"]["ok"] else '<li class="bad">') + esc(statement_terms(s, report)) + "</li>")
                 for s in p["statements"]]
        body.append('<ul class="terms">' + "".join(items) + "</ul>")
    body.append(f"<p>Run state: {esc(run['state'] or 'unknown')}"
                + (f" ({esc(str(run['state-detail']))})" if run["state-detail"] else "")
                + f"; {len(report['rounds'])} rounds recorded (round 0 is before training).</p>")
    body += [f'<p class="note">{esc(note)}</p>' for note in report["notes"]]
    if p["available"]:
        body += ["<h2>Cross-check</h2>", f"<p>{esc(_crosscheck_summary(report))}</p>"]
        body += [f'<p id="user-level">{esc(line)}</p>' for line in (_user_level_line(report),) if line]
        flags = _flag_lines(report)
        if flags:
            body.append('<ul class="bad">' + "".join(f"<li>{esc(line)}</li>" for line in flags) + "</ul>")
    body += ["<h2>Per round</h2>", _html_table(*round_table(report), table_id="rounds")]
    body.append("<h2>Per device</h2>")
    if p["available"]:
        body += [f'<p class="note" id="device-preface">{esc(line)}</p>' for line in (device_preface(report),) if line]
        head, rows = device_table(report)
        body.append(_html_table(head, rows, table_id="devices", flag_col=len(head) - 1))
    else:
        body.append(f"<p>Not available: {esc(p['reason'])}.</p>")
    if plots:
        body.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">'
                        f"<figcaption>{esc(plot.title)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Privacy report: {esc(run['id'])}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
