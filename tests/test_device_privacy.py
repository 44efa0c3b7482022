"""Issue 9, device side: what leaves a DP device is independent of its data size; every round, private
or not, goes through the ledger under a lock; capped devices refuse; deployments refuse seeded noise."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

import client.device as device_module
from client.app import app as client_app
from client.device import round_steps, train_round, training_windows
from shared import config
from shared.data.store import open_store
from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.privacy.ledger import load_ledger
from simulations.inprocess import instruction, node_context, set_identity
from tests.synthetic import walk_store

NUM_ITEMS = 30
SMALL = {"max-len": 16, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "local-epochs": 2, "local-lr": 0.01, "batch-size": 2, "sample-rate": 0.5, "noise-multiplier": 0.8,
         "deterministic-devices": True}


@pytest.fixture()
def setup(tmp_path):
    store = open_store(walk_store(tmp_path / "store", num_users=6, num_items=NUM_ITEMS))
    cfg = config.validate(SMALL)
    state = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS)).state_dict()
    return store, cfg, state, tmp_path


def _round(setup, device, round_=1, ledger=None, **overrides):
    store, cfg, state, tmp_path = setup
    path = ledger or tmp_path / f"ledger-{device}.json"
    return train_round(store.device(device), NUM_ITEMS, state, {**cfg, **overrides}, ledger_path=path,
                       device=str(device), run_id="r", server_round=round_)


def _no_infinity(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------- finding 1: data-size independence
def test_what_a_dp_device_sends_does_not_depend_on_its_window_count(setup):
    store, cfg, _, tmp_path = setup
    counts = {d: len(training_windows(store.device(d), cfg["window"])) for d in range(store.num_devices)}
    small, large = min(counts, key=counts.get), max(counts, key=counts.get)
    assert counts[small] < counts[large]  # the two devices really differ in size
    sent, histories = [], []
    for d in (small, large):
        for r in (1, 2):
            outcome = _round(setup, d, r)
        sent.append(outcome.metrics)
        histories.append(load_ledger(tmp_path / f"ledger-{d}.json", str(d)).accountant_state)
    assert sent[0] == sent[1]  # every scalar, the epsilon included
    assert set(sent[0]) == {"num-examples", "steps", "sample-rate", "epsilon"}
    assert sent[0]["num-examples"] == 1  # FedAvg weight: the same for every DP device
    assert sent[0]["steps"] == round_steps(cfg) == 2 * 2 and sent[0]["sample-rate"] == 0.5
    assert histories[0] == histories[1] == {"history": [[0.8, 0.5, 8]], "mechanism": "rdp"}
    entry = load_ledger(tmp_path / f"ledger-{small}.json", str(small)).rounds[-1]
    assert entry["relation"] == "add/remove one window" and "one window" in entry["unit"]


def test_plain_devices_still_weigh_by_their_windows(setup):
    store, cfg, _, _ = setup
    outcome = _round(setup, 0, dp=False)
    assert outcome.metrics["num-examples"] == len(training_windows(store.device(0), cfg["window"])) > 1
    assert "train-loss" in outcome.metrics and "epsilon" not in outcome.metrics


# ------------------------------------------------------------------------------------ finding 4: the lock
def test_two_concurrent_rounds_on_one_ledger_both_count(setup, monkeypatch):
    real = device_module.train_local

    def slow(*args, **kwargs):  # long enough that, unlocked, both rounds load the ledger before either writes
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(device_module, "train_local", slow)
    path = setup[3] / "shared-ledger.json"
    errors: list[BaseException] = []

    def run(round_):
        try:
            _round(setup, 0, round_, ledger=path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ledger = load_ledger(path, "0")
    assert sorted(r["round"] for r in ledger.rounds) == [1, 2]
    assert [r["status"] for r in ledger.rounds] == ["released", "released"]
    assert ledger.accountant_state["history"] == [[0.8, 0.5, 2 * round_steps(setup[1])]]


# ----------------------------------------------------------------------- finding 5: dp = false is recorded
def test_non_private_round_is_recorded_and_makes_epsilon_unbounded(setup):
    path = setup[3] / "ledger-0.json"
    _round(setup, 0, 1)
    plain = _round(setup, 0, 2, dp=False)
    assert not plain.declined
    ledger = load_ledger(path, "0")
    assert [(r["round"], r["private"], r["status"]) for r in ledger.rounds] == [
        (1, True, "released"), (2, False, "released")]
    assert ledger.unbounded and ledger.epsilon == math.inf
    _no_infinity(path.read_text())  # the file stores a flag, never an infinite number
    # No cap: a later DP round is still refused (no finite epsilon could be stated), nothing recorded.
    refused = _round(setup, 0, 3)
    assert refused.declined and refused.metrics["epsilon-unbounded"] == 1 and "epsilon" not in refused.metrics
    assert len(load_ledger(path, "0").rounds) == 2 and not load_ledger(path, "0").declined
    # With a cap: declined for good.
    capped = _round(setup, 0, 4, **{"max-epsilon": 100.0})
    assert capped.declined and load_ledger(path, "0").declined["cap"] == 100.0
    _no_infinity(path.read_text())


def test_capped_device_refuses_a_non_private_round(setup):
    path = setup[3] / "ledger-0.json"
    first = _round(setup, 0, 1).metrics["epsilon"]
    declined = _round(setup, 0, 2, **{"max-epsilon": first * 1.01})  # a second DP round would pass it
    assert declined.declined
    spent = load_ledger(path, "0").to_json()
    for overrides in ({"dp": False}, {"dp": False, "max-epsilon": 0.0}, {"max-epsilon": 0.0}):
        again = _round(setup, 0, 3, **overrides)
        assert again.declined and again.state_dict is None  # no weights leave, whatever the run asks
    assert load_ledger(path, "0").to_json() == spent  # and nothing was trained or recorded


def test_non_private_round_under_a_cap_is_refused_but_not_recorded_as_declined(setup):
    path = setup[3] / "ledger-0.json"
    refused = _round(setup, 0, 1, dp=False, **{"max-epsilon": 50.0})
    assert refused.declined and "would-be-epsilon" not in refused.metrics
    assert not load_ledger(path, "0").rounds and not load_ledger(path, "0").declined
    assert not _round(setup, 0, 2, **{"max-epsilon": 50.0}).declined  # its DP budget is intact


# ------------------------------------------------------------- findings 6 and 8: refused configurations
def test_device_refuses_dp_without_noise_before_touching_the_ledger(setup):
    store, cfg, state, tmp_path = setup
    path = tmp_path / "ledger-0.json"
    with pytest.raises(PrivrecError, match="'noise-multiplier' = 0 with 'dp' = true"):
        _round(setup, 0, 1, **{"noise-multiplier": 0.0})  # a flat config is validated on the way in
    run = config.RunConfig.from_values(cfg)
    unnoised = dataclasses.replace(run, device=dataclasses.replace(run.device, noise_multiplier=0.0))
    with pytest.raises(PrivrecError, match="noise_multiplier"):  # a RunConfig built past the schema
        train_round(store.device(0), NUM_ITEMS, state, unnoised, ledger_path=path, device="0", run_id="r",
                    server_round=1)
    assert not path.exists()


def _train_message(state, round_: int = 1):
    record = ConfigRecord({"server-round": round_, "run-id": "r"})  # the static config is the node's run config
    return instruction(RecordDict({"arrays": ArrayRecord(state), "config": record}), 1, "train", round_)


def test_deployed_device_refuses_deterministic_noise(setup, tmp_path):
    _, cfg, state, _ = setup
    set_identity()
    node = {"data-dir": str(tmp_path / "device"), "state-dir": str(tmp_path / "state"), "device-id": "0"}
    with pytest.raises(PrivrecError, match="'deterministic-devices' = true is refused on a real device"):
        client_app(_train_message(state), node_context(1, node, cfg))
    assert not (tmp_path / "state").exists()


# ----------------------------------------------------------------------- findings 1, 2, 8: the statements
@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_every_statement_names_its_relation_and_gdp_is_never_a_bound(accountant):
    from shared.privacy.statement import one_line, privacy_statement, sentences, user_level_statement

    cfg = config.validate({**SMALL, "accountant": accountant, "user-dp": True})
    terms = privacy_statement(cfg)
    assert terms["neighbouring-relation"].startswith("add/remove one window")
    assert "NOT covered" in terms["single-interaction"] and "replacing" in terms["single-interaction"]
    assert "q = sample-rate = 0.5" in terms["sampling"] and "4 steps per round" in terms["sampling"]
    assert "min(1" not in str(terms) and "any single interaction" not in str(terms)
    assert user_level_statement(cfg, 0.1, 10)["neighbouring-relation"].startswith("add/remove one device")
    said = sentences(cfg, 3.2, 1.5, devices=4, population=10)
    for s in said[:2]:
        assert s["relation"].startswith("add/remove") and "adding or removing one" in s["sentence"]
        assert ("protected with epsilon <=" in s["sentence"]) == (accountant != "gdp")
        assert s["is-a-bound"] == (accountant != "gdp")
    assert "not inserting or deleting" in said[0]["sentence"]
    assert not any("consenting" in s["sentence"] for s in said)
    consent = sentences({**cfg, "public-share": 0.2}, 3.2, 1.5, devices=4, population=10)
    assert all("2 consenting users (public-share = 0.2) have no guarantee" in s["sentence"] for s in consent)
    assert "consenting-cohort" not in terms
    consent_terms = privacy_statement({**cfg, "public-share": 0.2})
    assert consent_terms["consenting-cohort"].startswith("public-share = 0.2: the consenting users have no guarantee")
    consent_line = one_line({**consent_terms, "all-epsilon-max": 3.2, "all-epsilon-median": 2.0,
                             "devices-with-spend": 4})
    assert consent_line.endswith("; NOT for the consenting cohort (public-share = 0.2)")
    summary = {**terms, "all-epsilon-max": 3.2, "all-epsilon-median": 2.0, "devices-with-spend": 4,
               "user-level": {**user_level_statement(cfg, 0.1, 10), "epsilon": 1.5}}
    line = one_line(summary)
    assert ("approximate (GDP, not a guarantee)" in line) == (accountant == "gdp")
    assert "add/remove one window" in line and "add/remove one device" in line


def test_a_run_from_before_sample_rate_is_stated_as_replace_one_only():
    from shared.privacy.statement import privacy_statement

    old = {k: v for k, v in config.validate(SMALL).items() if k != "sample-rate"}
    terms = privacy_statement(old)
    assert terms["neighbouring-relation"].startswith("replace-one") and "UNDER-STATE" in terms["neighbouring-relation"]
    assert "ceil(windows / batch-size)" in terms["sampling"] and terms["accountant-is-a-bound"] is False


def test_train_replies_in_a_dp_federation_carry_nothing_data_dependent(tmp_path):
    from tests.test_federation import run_federation

    _, _, grid, rows, _ = run_federation(tmp_path, **{"num-rounds": 2, "devices-per-round": 6})
    trains = [m for m in grid.replies if "arrays" in m.content.array_records
              and "privacy" in m.content.config_records]
    assert len(trains) == 12
    by_round: dict[int, set] = {}
    for msg in trains:
        metrics = dict(next(iter(msg.content.metric_records.values())).items())
        history = str(msg.content.config_records["privacy"]["history"])
        by_round.setdefault(history, set()).add(json.dumps(metrics, sort_keys=True))
        assert set(metrics) == {"num-examples", "steps", "sample-rate", "epsilon"} and metrics["num-examples"] == 1
    # Per round, every device sent the same scalars and the same accountant history.
    assert len(by_round) == 2 and all(len(replies) == 1 for replies in by_round.values())
    assert all(r.get("train-loss") is None for r in rows[1:])  # the server has no loss to show
