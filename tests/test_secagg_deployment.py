"""Secure aggregation over real Flower processes (SuperLink + SuperNodes, TLS, node authentication)."""

from __future__ import annotations

import json

import pytest

from client.audit import read_audit
from tests.test_deployment import REGISTERED, _finish, _rows, _run_config, _wait_for, cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_secure_aggregation_rounds_over_real_supernodes(cluster, tmp_path):  # noqa: F811
    cfg = _run_config(cluster, tmp_path, "secagg", **{"secure-aggregation": True, "secagg-threshold": 2,
                                                       "secagg-min-cohort": 2})
    cluster.submit(cfg, name="secagg")
    run_path = tmp_path / "runs" / "secagg"
    _finish(cluster, "secagg", run_path)
    rows = _rows(run_path)
    assert [r["devices-trained"] for r in rows[1:]] == [REGISTERED, REGISTERED]
    assert [r["secure-aggregation"] for r in rows[1:]] == [{"devices": REGISTERED, "dropped": 0}] * 2
    for index in range(REGISTERED):
        audit = [e for e in read_audit(cluster.device(index).audit_log) if e.get("secagg-stage")]
        assert [e["secagg-stage"] for e in audit] == ["setup", "share", "upload", "unmask"] * 2
        for entry in audit:  # only masks leave the device: no float array in any stage
            dtypes = {a["dtype"] for record in entry["arrays"].values() for a in record.values()}
            assert dtypes == ({"uint32"} if entry["secagg-stage"] == "upload" else set())
    assert json.loads((run_path / "status.json").read_text())["state"] == "completed"


def test_a_supernode_killed_after_masking_leaves_the_survivors_sum(cluster, tmp_path):  # noqa: F811
    """SIGKILL a SuperNode as soon as its masked vector has left: the round still unmasks the sum.

    Whether its vector reached the server first (summed, its self mask rebuilt from the others' shares)
    or not (dropped, its pairwise masks rebuilt from its key shares) depends on timing; both must work.
    """
    import time

    victim = 0
    audit_log = cluster.device(victim).audit_log
    uploads_before = sum(e.get("secagg-stage") == "upload" for e in read_audit(audit_log)) \
        if audit_log.exists() else 0
    cfg = _run_config(cluster, tmp_path, "secagg-kill", **{
        "secure-aggregation": True, "secagg-threshold": 2, "secagg-min-cohort": 2, "num-rounds": 1,
        "round-timeout": 40.0, "fraction-evaluate": 0.67})  # evaluation asks 2: one dead node is not "more than half"
    cluster.submit(cfg, name="secagg-kill")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if audit_log.exists() and sum(e.get("secagg-stage") == "upload" for e in read_audit(audit_log)) \
                > uploads_before:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the victim never sent its masked vector")
    cluster.processes.kill(f"node-{victim}")
    run_path = tmp_path / "runs" / "secagg-kill"
    _finish(cluster, "secagg-kill", run_path)
    record = _rows(run_path)[1]["secure-aggregation"]
    assert record["devices"] + record["dropped"] == REGISTERED and record["devices"] >= 2
