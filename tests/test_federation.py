"""The real ServerApp logic and the real ClientApp, in one process (no Ray): a few federated rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from client.app import app as client_app
from server.app import FederatedRun
from server.run_dir import RunDirectory
from shared import config
from shared.errors import PrivrecError
from simulations.inprocess import InProcessGrid, serve
from tests.synthetic import walk_store

NUM_DEVICES = 8
NUM_ITEMS = 60


def run_federation(tmp_path, **overrides):
    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=NUM_ITEMS)
    cfg = config.validate({
        "data-store": str(store), "num-rounds": 4, "devices-per-round": 6, "eval-every": 2,
        "max-len": 16, "window": 12, "hidden-size": 32, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
        "local-epochs": 4, "local-lr": 0.02, "batch-size": 2, "noise-multiplier": 0.3, "max-grad-norm": 1.0,
        "run-dir": str(tmp_path / "runs"), "run-name": "t", "deterministic-devices": True, **overrides})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    FederatedRun(cfg, run_dir, grid).execute()
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir.path / "summary.json").read_text())
    return cfg, run_dir.path, grid, rows, summary


def test_dp_federated_training_beats_the_untrained_model(tmp_path):
    cfg, path, grid, rows, summary = run_federation(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["devices-trained"] == 6 for r in rows[1:])
    initial = rows[0]["central"]["test-ndcg@10"]
    final_central = summary["central-evaluation"]["test-ndcg@10"]
    final_federated = summary["federated-evaluation"]["test-ndcg@10"]
    # Untrained: ~random over 20 items. Trained on the +1 walk: clearly better, both ways of measuring.
    assert final_central > initial + 0.15
    assert final_federated == pytest.approx(final_central, abs=1e-6)  # same model, same users, same code
    low, high = summary["federated-evaluation"]["test-ndcg@10-ci"]
    assert low <= final_federated <= high
    # Federated evaluation happens on rounds 2 and 4 only.
    assert [r["round"] for r in rows if r["ndcg@10"] is not None] == [2, 4]


def test_epsilon_is_cumulative_and_reported_as_max_and_median(tmp_path):
    cfg, path, grid, rows, summary = run_federation(tmp_path)
    population = tmp_path / "store.population"  # beside the store: the devices' ledgers outlive the run
    assert json.loads((path / "config.json").read_text())["population-dir"] == str(population.resolve())
    ledgers = {p.parent.name: json.loads(p.read_text()) for p in population.glob("*/privacy-ledger.json")}
    assert ledgers, "devices that trained must have written a ledger"
    for ledger in ledgers.values():
        eps = [r["epsilon"] for r in ledger["rounds"]]
        assert eps == sorted(eps) and len(set(eps)) == len(eps)  # strictly increasing per round joined
        # The ledger's history reproduces the last epsilon with one continuous accountant.
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in ledger["accountant_state"]["history"]]
        assert accountant.get_epsilon(cfg["delta"]) == pytest.approx(eps[-1], rel=1e-9)
    final_eps = np.array([ledger["rounds"][-1]["epsilon"] for ledger in ledgers.values()])
    assert summary["privacy"]["all-epsilon-max"] == pytest.approx(final_eps.max())
    assert summary["privacy"]["all-epsilon-median"] == pytest.approx(np.median(final_eps))
    assert summary["privacy"]["delta"] == cfg["delta"]
    assert "window" in summary["privacy"]["privacy-unit"]
    # The per-round cumulative max never decreases.
    maxima = [r["epsilon-max"] for r in rows[1:]]
    assert maxima == sorted(maxima)


def test_only_weights_and_scalars_leave_a_device(tmp_path):
    _, _, grid, _, _ = run_federation(tmp_path, **{"num-rounds": 2, "eval-every": 1})
    from shared.model import ModelConfig, SASRec
    model_cfg = ModelConfig(num_items=NUM_ITEMS, max_len=16, hidden_size=32, num_heads=2, num_blocks=1)
    expected = SASRec(model_cfg).state_dict()
    assert grid.replies
    for reply in grid.replies:
        content = reply.content
        # The only non-scalar payload: the accountant history, [noise multiplier, sample rate, steps] rows.
        if not content.array_records:  # an evaluation reply: metric sums only
            assert not content.config_records
            continue
        assert set(content.config_records) == {"privacy"}
        privacy = content.config_records["privacy"]
        assert set(privacy) == {"device", "history"}
        for sigma, q, steps in json.loads(privacy["history"]):
            assert sigma == 0.3 and 0 < q <= 1 and isinstance(steps, int)
        for record in content.array_records.values():
            assert {k: tuple(a.shape) for k, a in record.items()} == {k: tuple(v.shape) for k, v in expected.items()}
        for record in content.metric_records.values():
            for key, value in record.items():
                assert isinstance(value, (int, float)), key  # scalars only: no lists of items or per-example values


def test_without_dp_no_epsilon_is_claimed(tmp_path):
    _, path, _, rows, summary = run_federation(tmp_path, dp=False, **{"num-rounds": 2})
    assert summary["privacy"]["mechanism"] == "none"
    assert summary["privacy"]["all-epsilon-max"] is None
    # Non-private rounds are still on each device's record: its epsilon is unbounded from now on.
    population = tmp_path / "store.population"  # the devices' own ledgers, beside the store
    ledgers = [json.loads(f.read_text()) for f in population.glob("*/privacy-ledger.json")]
    assert ledgers and all(r["private"] is False and r["status"] == "released"
                           for ledger in ledgers for r in ledger["rounds"])


@pytest.mark.parametrize("strategy, extra", [("fedadam", {"server-lr": 0.01}), ("fedprox", {"proximal-mu": 0.1})])
def test_fedadam_and_fedprox_run_and_learn(tmp_path, strategy, extra):
    _, _, grid, rows, summary = run_federation(tmp_path, strategy=strategy, **extra)
    assert summary["central-evaluation"]["test-ndcg@10"] > rows[0]["central"]["test-ndcg@10"] + 0.1
    train = [m.content.config_records["config"] for m in grid.delivered if m.metadata.message_type == "train"]
    if strategy == "fedprox":  # the proximal weight reaches the devices through FedProx's round config only
        assert train and all(c["proximal-mu"] == 0.1 for c in train)
    else:
        assert train and not any("proximal-mu" in c for c in train)


def test_messages_carry_only_per_round_values(tmp_path):
    """The static config is every node's run config (Flower's context.run_config), never the message."""
    cfg, _, grid, _, _ = run_federation(tmp_path, **{"num-rounds": 2})
    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert train
    for message in train:
        record = message.content.config_records["config"]
        assert set(record) <= {"server-round", "run-id", "data-store", "state-dir", "item-text-key",
                               "catalogue-sha256", "proximal-mu"}
        assert not set(record) & {"noise-multiplier", "local-lr", "hidden-size", "accountant", "dp", "seed"}
    assert all(ctx.run_config == dict(cfg) for ctx in grid.contexts.values())


def test_proximal_mu_without_fedprox_is_refused():
    """Only FedProx sends a proximal weight: a non-zero one under another strategy would silently do nothing."""
    with pytest.raises(PrivrecError, match="'proximal-mu' = 0.1 has no effect with 'strategy' = fedavg"):
        config.validate({"strategy": "fedavg", "proximal-mu": 0.1})
    assert config.validate({"strategy": "fedprox", "proximal-mu": 0.1})["proximal-mu"] == 0.1


def test_a_device_applies_no_proximal_term_unless_the_round_sends_one(tmp_path, monkeypatch):
    """The device reads proximal-mu from FedProx's round config, never from the (static) run config."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    import client.device as device_module
    from shared.model import ModelConfig, SASRec
    from simulations.inprocess import instruction, node_context, set_identity

    seen, real = [], device_module.train_local

    def spy(model, windows, cfg, **kwargs):
        seen.append(cfg.proximal_mu)
        return real(model, windows, cfg, **kwargs)

    monkeypatch.setattr(device_module, "train_local", spy)
    set_identity()
    store = walk_store(tmp_path / "store", num_users=2, num_items=NUM_ITEMS)
    cfg = config.validate({"data-store": str(store), "max-len": 16, "window": 12, "hidden-size": 16,
                           "num-blocks": 1, "strategy": "fedprox", "proximal-mu": 0.5})
    state = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS)).state_dict()
    context = node_context(1, {"partition-id": 0, "num-partitions": 2}, cfg)
    for round_, extra in ((1, {}), (2, {"proximal-mu": 0.25})):
        record = ConfigRecord({"data-store": str(store), "state-dir": str(tmp_path / "ledgers"), "run-id": "r",
                               "server-round": round_, **extra})
        content = RecordDict({"arrays": ArrayRecord(state), "config": record})
        client_app(instruction(content, 1, "train", round_), context)
    assert seen == [0.0, 0.25]


def test_lost_ledger_file_never_lowers_the_spend(tmp_path):
    """The node's in-memory ledger (context.state) restores a deleted ledger file before training."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from shared.model import ModelConfig, SASRec
    from simulations.inprocess import instruction, node_context, set_identity

    set_identity()
    store = walk_store(tmp_path / "store", num_users=2, num_items=NUM_ITEMS)
    cfg = config.validate({"data-store": str(store), "max-len": 16, "window": 12, "hidden-size": 16,
                           "num-blocks": 1, "local-epochs": 2})
    model = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS))
    context = node_context(1, {"partition-id": 0, "num-partitions": 2}, cfg)
    state_dir = tmp_path / "ledgers"

    def train(round_: int) -> float:
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
            {"data-store": str(store), "server-round": round_, "state-dir": str(state_dir), "run-id": "r"})})
        reply = client_app(instruction(content, 1, "train", round_), context)
        return float(reply.content.metric_records["metrics"]["epsilon"])

    first = train(1)
    ledger_file = state_dir / "device-0" / "privacy-ledger.json"
    ledger_file.unlink()
    second = train(2)
    ledger = json.loads(ledger_file.read_text())
    assert [r["round"] for r in ledger["rounds"]] == [1, 2]
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in ledger["accountant_state"]["history"]]
    assert second > first
    assert second == pytest.approx(accountant.get_epsilon(cfg["delta"]), rel=1e-9)


def test_interrupted_run_leaves_complete_files_and_no_summary(tmp_path):
    """A run that dies in round 3 keeps rounds 0-2 intact and is visibly incomplete."""
    import torch
    from flwr.app import Context, RecordDict

    from server.app import main as server_main

    class DyingGrid(InProcessGrid):
        calls = 0

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                DyingGrid.calls += 1
                if DyingGrid.calls == 3:  # rounds 1 and 2 train, then the link drops
                    raise ConnectionError("SuperLink went away")
            return super().send_and_receive(messages, timeout=timeout)

    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=NUM_ITEMS)
    run_config = {"data-store": str(store), "num-rounds": 4, "devices-per-round": 3, "eval-every": 0,
                  "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1,
                  "run-dir": str(tmp_path / "runs"), "run-name": "dies"}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConnectionError):
        serve(server_main, DyingGrid(client_app, NUM_DEVICES), context)
    path = tmp_path / "runs" / "dies"
    assert not (path / "summary.json").exists()
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "failed" and "SuperLink went away" in status["error"]
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert set(torch.load(path / "model.pt", weights_only=True))  # the round-2 checkpoint loads
    assert not list(path.glob(".*"))  # no temp files left behind


# ----------------------------------------------------------------------------- device failures
def _server_main(tmp_path, **overrides):
    from flwr.app import Context, RecordDict

    from server.app import main as server_main

    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=NUM_ITEMS)
    run_config = {"data-store": str(store), "num-rounds": 3, "devices-per-round": 4, "eval-every": 0,
                  "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1,
                  "run-dir": str(tmp_path / "runs"), "run-name": "f", **overrides}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), context)
    return tmp_path / "runs" / "f"


def _failing_train_round(monkeypatch, fails):
    import client.device as device_module

    real = device_module.train_round

    def train_round(*args, device, **kwargs):
        if fails(device):
            raise ValueError(f"device {device} cannot train: simulated fault")
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(device_module, "train_round", train_round)


def test_a_run_in_which_every_device_fails_is_failed(tmp_path, monkeypatch):
    """A valid config whose devices all fail: the run ends `failed`, never `completed` with an untrained model."""
    from server.app import RoundFailed

    _failing_train_round(monkeypatch, lambda device: True)
    with pytest.raises(RoundFailed, match=r"round 1: 4 of 4 devices failed .*first device error: "
                                          r"ValueError: device \d cannot train: simulated fault"):
        _server_main(tmp_path)
    path = tmp_path / "runs" / "f"
    assert not (path / "summary.json").exists() and not (path / "model.pt").exists()
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "failed" and "simulated fault" in status["error"]
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["failures"] == 4 and rows[1]["devices-asked"] == 4 and rows[1]["round-status"] == "failed"
    assert "simulated fault" in rows[1]["first-error"]
    assert (path / "privacy.json").exists()


def test_a_few_failing_devices_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    _failing_train_round(monkeypatch, lambda device: device == "0")
    path = _server_main(tmp_path, **{"devices-per-round": 8})
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((path / "status.json").read_text())["state"] == "completed"
    for row in rows[1:]:  # device 0 is in every cohort of 8 and fails each time
        assert (row["failures"], row["devices-trained"], row["round-status"]) == (1, 7, "partial")
        assert row["first-error"] == "ValueError: device 0 cannot train: simulated fault"
    assert json.loads((path / "summary.json").read_text())["device-failures"] == {"train": 3, "evaluate": 0}


def test_a_round_whose_evaluation_fails_on_most_devices_fails_the_run(tmp_path, monkeypatch):
    import client.device as device_module
    from server.app import RoundFailed

    def evaluate_round(*args, **kwargs):
        raise RuntimeError("cannot evaluate: simulated fault")

    monkeypatch.setattr(device_module, "evaluate_round", evaluate_round)
    with pytest.raises(RoundFailed, match="round 1 evaluation: 8 of 8 devices failed .*RuntimeError: cannot"):
        _server_main(tmp_path, **{"eval-every": 1})
    path = tmp_path / "runs" / "f"
    assert json.loads((path / "status.json").read_text())["state"] == "failed"
    row = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()][-1]
    assert (row["round"], row["eval-failures"], row["eval-asked"], row["round-status"]) == (1, 8, 8, "failed")
    assert row["devices-trained"] == 4 and row["failures"] == 0


RAY_REASON = (  # as Flower 1.41's Ray simulation words it (from a real run's flower.log, shortened)
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=24305, ip=192.0.2.2)\n  File \"client/device.py\", line 125, in train_round\n"
    "    reserve(ledger_path, ledger, planned,\n"
    "NotADirectoryError: [Errno 20] Not a directory: '/r/devices/device-0'\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=24305)\n"
    "  File \"flwr/simulation/ray_transport/ray_actor.py\", line 65, in run\n"
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: [Errno 20] Not a directory: '/r/devices/device-0''>")


@pytest.mark.parametrize("reason, text", [
    (RAY_REASON, "NotADirectoryError: [Errno 20] Not a directory: '/r/devices/device-0'"),
    ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
     "Message: server message: config key 'x' = 1: bad'>", "server message: config key 'x' = 1: bad"),
    ("<class 'shared.errors.PrivrecError'>:<'ledger unreadable'>", "PrivrecError: ledger unreadable"),
    (None, "no reason given"),
])
def test_device_error_text_is_one_readable_line(reason, text):
    from server.app import device_error_text

    assert device_error_text(reason) == text
