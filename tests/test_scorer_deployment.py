"""The product's default pipeline (`model = channel-scorer`) over real Flower processes: a TLS SuperLink with node
authentication and three registered SuperNodes (the `cluster` of tests/test_deployment.py), each device with its
own copy of the public catalogue from which it builds the MiniLM text features its scorer needs.

The real sequence runs, with its real noise: the DP popularity release, the DP co-occurrence release, then rounds
of user-level DP-FedSGD of the 9-weight scorer; once with the server adding the noise, once under SecAgg+ (each
device clips, adds its share of the noise and masks). Only the sizes are small (1-2 rounds, 30 items, q = 1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from client.audit import ALLOWED_METRICS, read_audit
from shared import config
from shared.privacy.accounting import epsilon_from_state
from shared.privacy.pipeline import pipeline_epsilon
from shared.secagg import VECTOR_KEY
from tests.test_deployment import NUM_ITEMS, REGISTERED, _finish, _ledger, _rows, _wait_for, cluster  # noqa: F401
from tools.deploy.local import LocalDeployment, deployment_config

pytestmark = pytest.mark.slow

DELTA = 1e-5
POP_Z, COOC_Z, ROUND_Z = (config.DEFAULT_PIPELINE[k] for k in ("popularity-noise-multiplier", "cooc-noise-multiplier",
                                                              "user-noise-multiplier"))
PAIRS = NUM_ITEMS * (NUM_ITEMS - 1) // 2  # the co-occurrence release covers every pair of the 30 items
# What a round's reply carries: the 9 trained weights (content + 8 channel scales), nothing else: the public
# released buffers it was sent are the server's own and do not travel back.
SCORER_SHAPES = {"content": [1], "scales": [8]}
# Under SecAgg+: a round's sum needs >= 2 of the 3 devices, a release's all 3 (every device joins it); the clip
# range holds 1 plus 6 std devs of a device's largest noise share (popularity: 4.6 / sqrt(3)).
SECURE = {"secure-aggregation": True, "secagg-threshold": 2, "secagg-min-cohort": 2, "secagg-release-min-cohort": 3,
          "secagg-clip-range": 20.0, "secagg-quantization-bits": 20}


@pytest.fixture(scope="module", autouse=True)
def _server_cache(tmp_path_factory):
    """An empty text-feature cache for the SuperLink and its ServerApp (set before `cluster` starts them), and for
    `privrec recommend` in this process: the catalogue is encoded inside the run, nothing is made beforehand."""
    old = os.environ.get("PRIVREC_CACHE_DIR")
    os.environ["PRIVREC_CACHE_DIR"] = str(tmp_path_factory.mktemp("server-cache"))
    yield Path(os.environ["PRIVREC_CACHE_DIR"])
    if old is None:
        del os.environ["PRIVREC_CACHE_DIR"]
    else:
        os.environ["PRIVREC_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def devices(cluster, tmp_path_factory) -> dict[int, Path]:  # noqa: F811
    """`cluster`'s SuperNodes restarted, each with an empty text-feature cache of its own (as on separate phones):
    every device encodes its copy of the catalogue with the installed MiniLM in its own ClientApp process.
    Returns each device's cache folder."""
    caches, logs = {}, {}
    for index in range(REGISTERED):
        caches[index] = tmp_path_factory.mktemp(f"device-{index}-cache")
        log = cluster.processes.started[f"node-{index}"].log_path
        logs[log] = len(log.read_text(errors="replace"))
        cluster.processes.stop(f"node-{index}")
        cluster.start_node(index, extra_env={"PRIVREC_CACHE_DIR": str(caches[index])})
    _wait_for(lambda: all("SuperNode ID" in log.read_text(errors="replace")[since:] for log, since in logs.items()),
              300, "the restarted SuperNodes to connect", cluster)  # a limit only: slow on a loaded machine
    return caches


def _run(cluster: LocalDeployment, tmp_path: Path, name: str, rounds: int, **overrides) -> tuple[Path, dict]:  # noqa: F811
    """The product's default pipeline, shrunk to `rounds` rounds with every device in every round (q = 1) and the
    co-occurrence among all 30 items; no budget cap (q = 1 on 3 devices spends more than the default's 2.0).
    The config is the one `privrec deploy local` submits, written by `privrec deploy run-config` without naming a
    model (the same resolution and checks before anything starts). Returns the run directory and each device's
    audit entries of this run."""
    import tomllib

    from tools.cli import main

    keys = {"fraction-train": 1.0, "cooc-items": NUM_ITEMS, "target-epsilon": 0.0, **overrides}
    written = tmp_path / f"{name}.toml"
    assert main(["deploy", "run-config", "--devices-dir", str(cluster.devices_dir), "--devices", str(REGISTERED),
                 "--out", str(written), "--rounds", str(rounds), "--run-dir", str(tmp_path / "runs"), "--run-name",
                 name, *(arg for k, v in keys.items() for arg in ("--set", f"{k}={v}"))]) == 0
    cfg = tomllib.loads(written.read_text())
    # deploy local's default is the product's pipeline, as privrec simulate's (it used to be SASRec)
    assert {k: cfg[k] for k in config.DEFAULT_PIPELINE if k not in keys and k != "num-rounds"} == \
        {k: v for k, v in config.DEFAULT_PIPELINE.items() if k not in keys and k != "num-rounds"}
    assert cfg == deployment_config(config.validate({**config.DEFAULT_PIPELINE, **keys, "num-rounds": rounds,
                                                     "run-dir": str(tmp_path / "runs"), "run-name": name}),
                                    cluster.devices_dir, REGISTERED)
    before = {i: _audit(cluster, i) for i in range(REGISTERED)}
    cluster.submit(cfg, name=name)
    run_path = tmp_path / "runs" / name
    _finish(cluster, name, run_path)
    return run_path, {i: _audit(cluster, i)[len(before[i]):] for i in range(REGISTERED)}


def _audit(cluster: LocalDeployment, index: int) -> list[dict]:  # noqa: F811
    log = cluster.device(index).audit_log
    return read_audit(log) if log.exists() else []


def _check_records_and_ledgers(cluster: LocalDeployment, name: str, run_path: Path, rounds: int,  # noqa: F811
                               secure: bool) -> dict:
    """What a user checks after a run: its records name both releases and the rounds, its figures, and every
    device's ledger holds the user-level spend composed as the server's accountant says. Returns privacy.json."""
    expected = pipeline_epsilon(POP_Z, ROUND_Z, 1.0, rounds, DELTA, "rdp", cooc_noise=COOC_Z)
    popularity = json.loads((run_path / "popularity.json").read_text())
    cooc = json.loads((run_path / "cooccurrence.json").read_text())
    assert popularity["devices"] == REGISTERED and len(popularity["histogram"]) == NUM_ITEMS + 1
    assert bool(popularity.get("secure-aggregation")) == secure
    assert cooc["devices"] == REGISTERED and len(cooc["items"]) == NUM_ITEMS and len(cooc["pairs"]) == PAIRS
    rows = _rows(run_path)
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert [r["devices-trained"] for r in rows[1:]] == [REGISTERED] * rounds
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["federated-evaluation"]["users"] == REGISTERED
    assert 0 <= summary["federated-evaluation"]["test-ndcg@10"] <= 1
    privacy = json.loads((run_path / "privacy.json").read_text())
    assert privacy["user-level"]["pipeline"]["history"] == [[POP_Z, 1.0, 1], [COOC_Z, 1.0, 1], [ROUND_Z, 1.0, rounds]]
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert summary["privacy"]["user-level"]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert rows[-1]["user-level-epsilon"] == pytest.approx(expected, rel=1e-12)
    # A second code base's RDP accountant (its own orders and conversion) agrees with the recorded figure.
    other = rdp_privacy_accountant.RdpAccountant()
    other.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(POP_Z), dpa.GaussianDpEvent(COOC_Z),
                                       dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(ROUND_Z), rounds)]))
    assert privacy["epsilon"] == pytest.approx(other.get_epsilon(DELTA), rel=0.03)

    for index in range(REGISTERED):
        everything = _ledger(cluster, index)["releases"]  # a device's ledger composes every run it joined
        releases = [r for r in everything if str(r["release"]).rsplit("-", 1)[0] == name]  # "<run>-<part>"
        assert [r["kind"] for r in releases] == (["popularity-histogram", "cooccurrence-histogram"]
                                                 + ["channel-scorer-round"] * rounds)
        assert all(r["unit"] == "user" and r["delta"] == DELTA and r["accountant"] == "rdp" for r in releases)
        assert all(("masked under secure aggregation" in r["mechanism"]) == secure for r in releases)
        # This run's part is the server's history (q = 1: the device's own, unamplified, composition is the
        # server's figure) ...
        history = [[r["noise_multiplier"], r["sample_rate"], r["steps"]] for r in releases]
        assert history == [[POP_Z, 1.0, 1], [COOC_Z, 1.0, 1]] + [[ROUND_Z, 1.0, 1]] * rounds
        assert _composed(history) == pytest.approx(expected, rel=1e-9)
        # ... and the recorded spend is everything the device released so far, this run included: never less.
        spent = [r["user-level-epsilon"] for r in everything]
        assert spent == sorted(spent) and spent[-1] >= expected * (1 - 1e-9)
        assert spent[-1] == pytest.approx(_composed([[r["noise_multiplier"], r["sample_rate"], r["steps"]]
                                                     for r in everything]), rel=1e-9)
    return privacy


def _composed(history: list[list]) -> float:
    return epsilon_from_state({"history": history, "mechanism": "rdp"}, DELTA, "rdp")


def _recommend(run_path: Path, capsys) -> None:
    """`privrec recommend` on the run directory: the top 5 for a history, the history itself left out."""
    from tests.test_cli import run_cli

    capsys.readouterr()
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", "i3 i4 i5", "-k", "5")
    assert code == 0, err
    items = [line.split()[1] for line in out.strip().splitlines()]
    assert len(items) == 5 and len(set(items)) == 5 and not set(items) & {"i3", "i4", "i5"}
    assert set(items) <= {f"i{i}" for i in range(1, NUM_ITEMS + 1)}


def test_the_default_pipeline_over_real_supernodes(cluster, devices, _server_cache, tmp_path, capsys):  # noqa: F811
    rounds = 2
    run_path, audits = _run(cluster, tmp_path, "scorer", rounds)
    privacy = _check_records_and_ledgers(cluster, "scorer", run_path, rounds, secure=False)
    # The server and every device encoded the catalogue on their own, to the same features (the key the server
    # named in every message, which each device checked against its own).
    key = json.loads((run_path / "model.json").read_text())["item-text"]["key"]
    for cache in [_server_cache, *devices.values()]:
        assert [p.name for p in (cache / "text-features").iterdir()] == [f"{key}.npz"]
    assert "not against the server" in privacy["statements"][0]["sentence"]  # the server adds the noise here
    for audit in audits.values():
        assert [e["type"] for e in audit] == ["query.popularity", "query.cooccurrence"] + ["train"] * rounds \
            + ["evaluate"]
        assert not any(e["error"] for e in audit)
        # The releases: each device's contribution, clipped to L2 norm 1 (the server adds the noise).
        for entry, key, size in ((audit[0], "item-set", NUM_ITEMS + 1), (audit[1], "pairs", PAIRS)):
            vector = np.asarray(entry["metrics"]["metrics"][key])
            assert entry["arrays"] == {} and vector.shape == (size,) and np.linalg.norm(vector) <= 1 + 1e-9
        # The rounds: only the scorer's 9 trained weights, no other array.
        for entry in audit[2:2 + rounds]:
            assert {k: v["shape"] for k, v in entry["arrays"]["arrays"].items()} == SCORER_SHAPES
            assert set(entry["metrics"]["metrics"]) == {"num-examples", "steps"}
        assert set(audit[-1]["metrics"]["metrics"]) <= ALLOWED_METRICS and audit[-1]["arrays"] == {}
    _recommend(run_path, capsys)


def test_the_default_pipeline_under_secure_aggregation_over_real_supernodes(cluster, devices, tmp_path,  # noqa: F811
                                                                           capsys):
    rounds = 1
    run_path, audits = _run(cluster, tmp_path, "scorer-secagg", rounds, **SECURE)
    privacy = _check_records_and_ledgers(cluster, "scorer-secagg", run_path, rounds, secure=True)
    rows = _rows(run_path)
    assert [r["secure-aggregation"] for r in rows[1:]] == [{"devices": REGISTERED, "dropped": 0}] * rounds
    for audit in audits.values():
        stages = [e for e in audit if e.get("secagg-stage")]
        # Three secure sums, each in four stages: the popularity release, the co-occurrence release, the round(s).
        assert [e["secagg-stage"] for e in stages] == ["setup", "share", "upload", "unmask"] * (2 + rounds)
        uploads = [e for e in stages if e["secagg-stage"] == "upload"]
        assert [e["type"] for e in uploads] == ["query.popularity", "query.cooccurrence"] + ["train"] * rounds
        # What was summed: one masked vector each, of the item-set (31), the pairs (435), the 9 trained weights.
        assert [{k: (a["shape"], a["dtype"]) for r in e["arrays"].values() for k, a in r.items()} for e in uploads] \
            == [{VECTOR_KEY: ([n], "uint32")} for n in [NUM_ITEMS + 1, PAIRS] + [9] * rounds]
        for entry in stages:  # only masks leave the device: no float array, no vector in the metrics
            dtypes = {a["dtype"] for record in entry["arrays"].values() for a in record.values()}
            assert dtypes == ({"uint32"} if entry["secagg-stage"] == "upload" else set())
            assert not {"item-set", "pairs"} & {k for m in entry.get("metrics", {}).values() for k in m}
        assert [e["type"] for e in audit if not e.get("secagg-stage")] == ["evaluate"]
    record = privacy["user-level"]["pipeline"]
    assert record["secure-aggregation"]
    assert set(record["adversary-by-part"]) == {"popularity release", "co-occurrence release", "DP-FedAvg rounds"}
    assert all("AND the honest-but-curious server" in a for a in record["adversary-by-part"].values())
    sentence = privacy["statements"][0]["sentence"]
    assert "against the honest-but-curious server" in sentence and "not against the server" not in sentence
    assert "at least 2 devices in every round's unmasked sum and 3 in every analytics release's" in sentence
    _recommend(run_path, capsys)
