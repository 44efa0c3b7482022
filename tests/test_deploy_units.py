"""Deployment pieces that need no Flower process: device folders, certificates, keys, flags, resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, RecordDict

import server.app
from client.app import app as client_app
from client.audit import ALLOWED_METRICS, read_audit
from server.app import main as server_main
from shared.data.devices import open_device, read_catalogue, split_devices
from shared.data.store import open_store
from shared.errors import PrivrecError
from simulations.inprocess import InProcessGrid, serve
from tests.synthetic import walk_store
from tests.test_cli import assert_user_error
from tools.cli import main
from tools.deploy.certs import make_certs, make_node_key
from tools.deploy.processes import (
    ProcessGroup,
    Security,
    Started,
    flower_descendants,
    superlink_command,
    supernode_command,
    wait_until_reachable,
)
from tools.launch import stop_process_group

SMALL = {"max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 1}


@pytest.fixture
def devices(tmp_path):
    store = open_store(walk_store(tmp_path / "store", users_per_device=2, num_users=5, num_items=30))
    return store, split_devices(store, tmp_path / "devices")


# ----------------------------------------------------------------------------- device folders


def test_each_device_folder_holds_only_its_own_histories(devices):
    store, out = devices
    assert sorted(p.name for p in out.iterdir()) == ["catalogue", "device-0", "device-1", "device-2"]
    for d in range(store.num_devices):
        folder = open_device(out / f"device-{d}")
        assert folder.device_id == str(d)
        assert list(folder.state_dir.iterdir()) == []  # the ledger goes here, nothing yet
        mine, expected = open_store(folder.data_dir).device(0), store.device(d)
        assert open_store(folder.data_dir).num_users == expected.num_users
        assert [t.tolist() for t in mine.train] == [t.tolist() for t in expected.train]
        assert mine.valid.tolist() == expected.valid.tolist() and mine.test.tolist() == expected.test.tolist()
        assert f'device-id="{d}"' in folder.node_config() and str(folder.data_dir.resolve()) in folder.node_config()
    # The server's catalogue: item ids and titles, counts; no histories.
    assert sorted(p.name for p in (out / "catalogue").iterdir()) == ["catalogue.json", "items.json"]
    catalogue = read_catalogue(out / "catalogue")
    assert (catalogue["num_items"], catalogue["num_devices"]) == (30, 3)


def test_split_never_overwrites_and_cli_names_the_folder(devices, tmp_path, capsys):
    store, out = devices
    with pytest.raises(PrivrecError, match="already exists"):
        split_devices(store, out)
    code = main(["data", "split", "--dataset", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "new")])
    assert_user_error(code, capsys.readouterr().err, "missing.csv")
    assert not (tmp_path / "new").exists()


def test_split_cli_writes_device_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    rows = [f"u{u},i{(3 * u + t) % 20},{t}" for u in range(4) for t in range(8)]
    (tmp_path / "walk.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    code = main(["data", "split", "--dataset", str(tmp_path / "walk.csv"), "--out", str(tmp_path / "dev")])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "dev").glob("device-*"))) == 4
    assert not list(tmp_path.glob(".dev*"))  # no staging leftovers


def test_node_folder_errors_are_named(tmp_path, devices):
    _, out = devices
    with pytest.raises(PrivrecError, match="device.json: missing"):
        open_device(out / "catalogue")
    (out / "device-1" / "data" / "test.npy").unlink()
    with pytest.raises(PrivrecError, match="test.npy"):
        open_device(out / "device-1")


# ----------------------------------------------------------------------------- certificates, keys, flags


def test_certificates_chain_and_cover_loopback(tmp_path):
    make_certs(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert stat.S_IMODE(os.stat(tmp_path / "tls" / "server.key").st_mode) == 0o600
    assert not (tmp_path / "tls" / "ca.key").exists()  # the test CA signs nothing else
    with pytest.raises(PrivrecError, match="never overwritten"):
        make_certs(tmp_path / "tls")


def test_node_keys_are_ec_openssh_and_distinct(tmp_path):
    key_a, pub_a = make_node_key(tmp_path / "a.key")
    key_b, pub_b = make_node_key(tmp_path / "b.key")
    private = serialization.load_ssh_private_key(key_a.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert isinstance(serialization.load_ssh_public_key(pub_a.read_bytes()), ec.EllipticCurvePublicKey)
    assert pub_a.read_bytes() != pub_b.read_bytes()
    assert make_node_key(key_a) == (key_a, pub_a) and key_a.read_bytes() == key_a.read_bytes()  # kept, not replaced


def test_tls_is_on_unless_insecure_is_asked_for(tmp_path, capsys):
    with pytest.raises(PrivrecError, match="TLS is on by default"):
        Security()
    with pytest.raises(PrivrecError, match="--auth needs TLS"):
        Security(insecure=True, auth=True)
    with pytest.raises(PrivrecError, match="ca.crt is missing"):
        Security(tls_dir=tmp_path)
    make_certs(tmp_path / "tls")
    secure = superlink_command(Security(tls_dir=tmp_path / "tls", auth=True), "127.0.0.1", 9092)
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    assert secure[secure.index("--ssl-certfile") + 1].endswith("server.crt")
    node = supernode_command("127.0.0.1:9092", 'data-dir="/d"', tmp_path / "tls" / "ca.crt", False,
                             tmp_path / "k", 9100)
    assert node[node.index("--root-certificates") + 1].endswith("ca.crt") and "--insecure" not in node
    code = main(["deploy", "superlink", "--port", "9"])
    assert_user_error(code, capsys.readouterr().err, "--tls-dir", "--insecure")


def test_unreachable_superlink_is_retried_with_backoff_and_clear_lines(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    lines: list[str] = []
    with pytest.raises(PrivrecError, match=f"127.0.0.1:{port} unreachable"):
        wait_until_reachable(f"127.0.0.1:{port}", log=lines.append, first_wait=0.05, give_up_after=0.5)
    assert len(lines) >= 2 and all(f"SuperLink 127.0.0.1:{port} unreachable" in line for line in lines)
    waits = [float(line.split("retrying in ")[1].split(" s")[0]) for line in lines]
    assert waits == sorted(waits) and waits[1] > waits[0]  # backs off


# ----------------------------------------------------------------------------- ServerApp: deployment, resume


def _deployment_grid(out, num_devices):
    grid = InProcessGrid(client_app, num_devices, keep_messages=True)
    for node_id, context in grid.contexts.items():
        folder = open_device(out / f"device-{node_id - 1}")
        context.node_config = {"data-dir": str(folder.data_dir), "state-dir": str(folder.state_dir),
                               "device-id": folder.device_id, "audit-log": str(folder.audit_log)}
    return grid


def test_deployment_server_reads_only_the_catalogue(devices, tmp_path, monkeypatch):
    _, out = devices

    def forbidden(*args, **kwargs):
        raise AssertionError("the ServerApp must not open a device store in a deployment")

    monkeypatch.setattr(server.app, "open_store", forbidden)
    monkeypatch.setattr(server.app, "prepare_store", forbidden)
    run_config = {**SMALL, "catalogue": str(out / "catalogue"), "central-eval": False, "num-rounds": 2,
                  "devices-per-round": 3, "eval-every": 1, "run-dir": str(tmp_path / "runs"), "run-name": "dep"}
    grid = _deployment_grid(out, 3)
    serve(server_main, grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    summary = json.loads((tmp_path / "runs" / "dep" / "summary.json").read_text())
    assert summary["federated-evaluation"]["users"] == 5 and summary["devices"] == 3
    for message in grid.delivered:  # no device paths travel in messages in a deployment
        sent = message.content.config_records["config"]
        assert "data-store" not in sent and "state-dir" not in sent
    for d in range(3):  # each device's ledger is in its own state folder
        ledger = json.loads((out / f"device-{d}" / "state" / f"device-{d}" / "privacy-ledger.json").read_text())
        assert [r["round"] for r in ledger["rounds"]] == [1, 2]
        entries = read_audit(out / f"device-{d}" / "state" / "audit.jsonl")
        assert [(e["type"], e["round"]) for e in entries] == [("train", 1), ("evaluate", 1), ("train", 2),
                                                               ("evaluate", 2)]
        assert_only_weights_and_scalars(entries, expected_shapes(run_config, 30))


def expected_shapes(run_config: dict, num_items: int) -> dict[str, list[int]]:
    from shared.config import validate
    from shared.model import ModelConfig, SASRec

    model = SASRec(ModelConfig.from_run_config(validate(run_config), num_items))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def assert_only_weights_and_scalars(entries: list[dict], shapes: dict[str, list[int]]) -> None:
    """What the audit saw leave a device: model arrays of the expected names and shapes, whitelisted scalars."""
    assert entries
    for entry in entries:
        assert not entry["error"]
        if entry["type"] == "train":
            # The only non-scalar payload: the accountant history, [noise multiplier, sample rate, steps] rows.
            assert set(entry["configs"]) == {"privacy"}
            assert set(entry["configs"]["privacy"]) == {"device", "history"}
            for sigma, q, steps in json.loads(entry["configs"]["privacy"]["history"]):
                assert sigma > 0 and 0 < q <= 1 and isinstance(steps, int)
            declined = any(r.get("declined") for r in entry["metrics"].values())
            if declined:  # a device at its cap sends no weights at all
                assert entry["arrays"] == {}
            else:
                assert {k: v["shape"] for k, v in entry["arrays"]["arrays"].items()} == shapes
                assert list(entry["arrays"]) == ["arrays"]
        else:
            assert entry["configs"] == {}
            assert entry["arrays"] == {}
        for record in entry["metrics"].values():
            assert set(record) <= ALLOWED_METRICS, set(record) - ALLOWED_METRICS
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_restarted_server_resumes_from_the_last_checkpoint(tmp_path, strategy):
    """The ServerApp dies in round 3; started again with the same run-name it runs rounds 3-4 only."""

    class DyingGrid(InProcessGrid):
        trains = 0

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                DyingGrid.trains += 1
                if DyingGrid.trains == 3:
                    raise ConnectionError("SuperLink went away")
            return super().send_and_receive(messages, timeout=timeout)

    store = walk_store(tmp_path / "store", num_users=4, num_items=30)
    run_config = {**SMALL, "data-store": str(store), "num-rounds": 4, "devices-per-round": 2, "eval-every": 0,
                  "strategy": strategy, "run-dir": str(tmp_path / "runs"), "run-name": "r"}
    path = tmp_path / "runs" / "r"

    def context():
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    with pytest.raises(ConnectionError):
        serve(server_main, DyingGrid(client_app, 4), context())
    saved = json.loads((path / "checkpoint" / "state.json").read_text())
    assert saved["round"] == 2
    model_after_2 = torch.load(path / "checkpoint" / "model.pt", weights_only=True)
    if strategy == "fedadam":
        assert set(torch.load(path / "checkpoint" / "strategy.pt", weights_only=True)) == {"m_t", "v_t"}

    grid = InProcessGrid(client_app, 4, keep_messages=True)
    sent_models = []
    original = grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        sent_models.extend(m.content.array_records["arrays"].to_torch_state_dict() for m in messages)
        return original(messages, timeout=timeout)

    grid.send_and_receive = spy
    serve(server_main, grid, context())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # not started over, no round twice
    # Devices record the true round in their ledgers: rounds 3 and 4 after 1 and 2, none twice.
    ledgers = [json.loads(p.read_text()) for p in (tmp_path / "store.population").glob("*/privacy-ledger.json")]
    trained = sorted(r["round"] for ledger in ledgers for r in ledger["rounds"])
    assert trained == [1, 1, 2, 2, 3, 3, 4, 4]
    for ledger in ledgers:
        rounds = [r["round"] for r in ledger["rounds"]]
        assert rounds == sorted(set(rounds))
    first = sent_models[0]  # round 3 starts from the checkpointed global model
    assert all(torch.equal(first[k], model_after_2[k]) for k in first)
    assert json.loads((path / "status.json").read_text())["state"] == "completed"
    summary = json.loads((path / "summary.json").read_text())
    assert summary["privacy"]["all-epsilon-max"] == pytest.approx(rows[-1]["epsilon-max"])


def test_incompatible_checkpoint_is_refused(tmp_path):
    store = walk_store(tmp_path / "store", num_users=3, num_items=30)
    base = {**SMALL, "data-store": str(store), "num-rounds": 1, "devices-per-round": 2, "eval-every": 0,
            "run-dir": str(tmp_path / "runs"), "run-name": "r"}
    serve(server_main, InProcessGrid(client_app, 3), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                      run_config=base))
    (tmp_path / "runs" / "r" / "summary.json").unlink()  # pretend it stopped before the end
    with pytest.raises(PrivrecError, match="'hidden-size' = 16"):
        wider = {**base, "hidden-size": 32, "num-rounds": 2}
        serve(server_main, InProcessGrid(client_app, 3), Context(run_id=1, node_id=0, node_config={},
                                                                 state=RecordDict(), run_config=wider))
    assert np.isfinite(json.loads((tmp_path / "runs" / "r" / "checkpoint" / "state.json").read_text())["round"])


# ----------------------------------------------------------------------------- CLI


def test_deploy_cli_input_errors_are_one_line(tmp_path, devices, capsys):
    _, out = devices
    cases = [
        (["deploy", "node", "--data", str(tmp_path / "nowhere"), "--superlink", "127.0.0.1:9"], "device.json"),
        (["deploy", "node", "--data", str(out / "device-0"), "--superlink", "nohost"], "HOST:PORT"),
        (["deploy", "node", "--data", str(out / "device-0"), "--superlink", "127.0.0.1:9", "--insecure",
          "--key", "k"], "--insecure"),
        (["deploy", "node", "--data", str(out / "device-0"), "--superlink", "127.0.0.1:9", "--key",
          str(tmp_path / "none.key")], "none.key"),
        (["deploy", "superlink", "--tls-dir", str(tmp_path)], "ca.crt"),
        (["deploy", "local", "--devices", "2", "--tls", "--insecure"], "--tls or --insecure"),
        (["deploy", "local", "--devices", "0"], "--devices 0"),
        (["deploy", "local", "--devices", "1", "--run-dir", str(tmp_path / "runs"), "--run-name", "done"],
         "already holds a completed run"),
    ]
    (tmp_path / "runs" / "done").mkdir(parents=True)
    (tmp_path / "runs" / "done" / "summary.json").write_text("{}")
    for argv, needle in cases:
        code = main(argv)
        assert_user_error(code, capsys.readouterr().err, needle)


def test_node_waiting_for_its_superlink_logs_retries_not_tracebacks(tmp_path, devices):
    """The real `privrec deploy node` process, pointed at a SuperLink that is not there (yet)."""
    import subprocess
    import sys
    import time

    _, out = devices
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "node.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "tools.cli", "deploy", "node", "--data",
                                    str(out / "device-0"), "--superlink", f"127.0.0.1:{port}", "--insecure"],
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count("retrying in") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)
    text = log.read_text()
    assert text.count(f"SuperLink 127.0.0.1:{port} unreachable") >= 2, text
    assert "WARNING: --insecure" in text and "Traceback" not in text


def test_the_latest_flower_run_id_is_read_from_an_appended_log(tmp_path):
    from tools.deploy.local import LocalDeployment

    deployment = LocalDeployment(tmp_path / "w", tmp_path, Security(insecure=True))
    (tmp_path / "w" / "logs").mkdir(parents=True)
    (tmp_path / "w" / "logs" / "run.log").write_text("Successfully started run 11\n...\nSuccessfully started run 42\n")
    assert deployment.run_id() == 42


# ----------------------------------------------------------------------------- one catalogue for every device


def test_device_folders_share_one_catalogue_file(devices):
    store, out = devices
    catalogue = out / "catalogue" / "items.json"
    for d in range(store.num_devices):
        items = out / f"device-{d}" / "data" / "items.json"
        assert os.path.samefile(items, catalogue)  # one file on disk, not a copy per device
        device_store = open_store(out / f"device-{d}" / "data")
        assert device_store.meta["items_sha256"] == read_catalogue(out / "catalogue")["items_sha256"]
        assert device_store.item_ids == store.item_ids and device_store.item_genres == store.item_genres
    assert os.stat(catalogue).st_nlink == store.num_devices + 1
    assert json.loads(catalogue.read_text())["item_ids"] == store.item_ids


@pytest.mark.parametrize("error", [errno.EXDEV, errno.EPERM, errno.EMLINK])
def test_catalogue_is_copied_where_links_are_impossible(tmp_path, monkeypatch, error):
    store = open_store(walk_store(tmp_path / "store", num_users=4, num_items=30))
    real_link, calls = os.link, []

    def link(src, dst):
        calls.append(Path(src))
        if len(calls) == 1 or error != errno.EMLINK:
            raise OSError(error, os.strerror(error))
        real_link(src, dst)

    monkeypatch.setattr("shared.data.devices.os.link", link)
    out = split_devices(store, tmp_path / "devices")
    for d in range(4):
        assert open_device(out / f"device-{d}").device_id == str(d)
    if error == errno.EMLINK:  # the catalogue is full of links: device 0 got a copy, the next ones link to it
        assert calls[1] != calls[0]
        assert os.path.samefile(out / "device-1" / "data" / "items.json", out / "device-0" / "data" / "items.json")
    else:
        assert not os.path.samefile(out / "device-1" / "data" / "items.json", out / "catalogue" / "items.json")


def test_a_device_with_a_changed_catalogue_is_refused(devices, tmp_path):
    _, out = devices
    items = out / "device-1" / "data" / "items.json"
    changed = json.loads(items.read_text())
    changed["item_titles"][1] = "Something else"
    items.unlink()  # replace only this device's link; the others keep the catalogue
    items.write_text(json.dumps(changed))
    with pytest.raises(PrivrecError, match="items.json: SHA-256 .* differs from items_sha256"):
        open_device(out / "device-1")
    assert open_device(out / "device-0").device_id == "0"


def test_deploy_node_still_takes_a_device_folder(devices, capsys, monkeypatch):
    import tools.deploy.processes as processes

    _, out = devices
    seen = {}
    monkeypatch.setattr(processes, "wait_until_reachable", lambda *a, **k: None)
    monkeypatch.setattr("tools.deploy.cli._exec", lambda command: seen.setdefault("command", command) and 0)
    assert main(["deploy", "node", "--data", str(out / "device-0"), "--superlink", "127.0.0.1:9", "--insecure"]) == 0
    assert f'data-dir="{(out / "device-0" / "data").resolve()}"' in " ".join(seen["command"])


def test_a_device_split_from_other_data_refuses_the_servers_catalogue(devices, tmp_path):
    """The server names the SHA-256 of its catalogue; a device holding another one fails, and says why."""
    _, out = devices
    data = out / "device-1" / "data"
    items = json.loads((data / "items.json").read_text())
    items["item_ids"][1], items["item_ids"][2] = items["item_ids"][2], items["item_ids"][1]  # other indices
    (data / "items.json").unlink()
    (data / "items.json").write_text(json.dumps(items))
    meta = json.loads((data / "meta.json").read_text())
    meta["items_sha256"] = hashlib.sha256((data / "items.json").read_bytes()).hexdigest()  # consistent in itself
    (data / "meta.json").write_text(json.dumps(meta))
    run_config = {**SMALL, "catalogue": str(out / "catalogue"), "central-eval": False, "num-rounds": 1,
                  "devices-per-round": 3, "eval-every": 1, "run-dir": str(tmp_path / "runs"), "run-name": "cat"}
    serve(server_main, _deployment_grid(out, 3), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                  run_config=run_config))
    row = [json.loads(line) for line in (tmp_path / "runs" / "cat" / "metrics.jsonl").read_text().splitlines()][-1]
    assert (row["failures"], row["devices-trained"], row["round-status"]) == (1, 2, "partial")
    assert "device-1/data/items.json" in row["first-error"] and "is not the server's catalogue" in row["first-error"]


def test_a_reaped_leaders_number_that_now_leads_another_session_is_never_signalled(tmp_path):
    """pid numbers wrap (pid_max is 32768 on many machines, and every Flower message starts a process): once a
    process we started in its own session is reaped, its number may lead a stranger's session. Stopping or
    killing ours again (a deployment's close() after a node was killed) must leave the stranger running."""
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    group = ProcessGroup(tmp_path / "logs", {"PATH": os.environ["PATH"]})

    def ours_reaped_with_the_strangers_number() -> subprocess.Popen:
        ours = subprocess.Popen(["true"], start_new_session=True)
        ours.wait()
        ours.pid = stranger.pid  # what the kernel may do once the number is free
        return ours

    try:
        stop_process_group(ours_reaped_with_the_strangers_number(), grace=1)
        for name, stop in (("a", group.stop), ("b", group.kill)):
            group.started[name] = Started(name, ours_reaped_with_the_strangers_number(), tmp_path / f"{name}.log")
            stop(name)
        assert stranger.poll() is None, "a stranger's session was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_killing_a_process_kills_the_flower_processes_it_detached(tmp_path):
    """Flower starts a SuperLink's SuperExec in a session of its own, and the ServerApp under that, each
    told its parent by `--parent-pid`. A host that goes down takes them too: `kill` must not leave them."""
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    group = ProcessGroup(tmp_path / "logs", {"PATH": os.environ["PATH"]})
    link = group.start("superlink", sleep)
    superexec = subprocess.Popen([*sleep, "--parent-pid", str(link.process.pid)], start_new_session=True)
    serverapp = subprocess.Popen([*sleep, "--parent-pid", str(superexec.pid)], start_new_session=True)
    stranger = subprocess.Popen([*sleep, "--parent-pid", str(serverapp.pid + 100000)], start_new_session=True)
    try:
        time.sleep(0.5)  # their command lines are readable once they have started
        assert sorted(flower_descendants(link.process.pid)) == sorted([superexec.pid, serverapp.pid])
        group.kill("superlink")
        assert superexec.wait(timeout=10) == -signal.SIGKILL and serverapp.wait(timeout=10) == -signal.SIGKILL
        assert stranger.poll() is None, "a process that is not under the SuperLink was signalled"
    finally:
        for process in (superexec, serverapp, stranger):
            process.kill()
            process.wait()


# ----------------------------------------------------------------------------- one set of defaults for every run


class _Stop(Exception):
    """Raised where a command would start its Flower processes: the config it resolved is all the test wants."""


@pytest.mark.parametrize("argv", [[], ["--rounds", "2", "--set", "server-lr=0.3"], ["--set", "model=sasrec"],
                                  ["--epsilon", "4"]],
                         ids=["defaults", "explicit-keys", "sasrec", "epsilon"])
def test_deploy_local_and_run_config_resolve_the_run_simulate_resolves(tmp_path, argv, monkeypatch, capsys):
    """`privrec deploy local` built its config without the default pipeline, so it trained SASRec where
    `privrec simulate` ran the channel scorer."""
    import signal

    import shared.text.features
    import tools.deploy.local
    import tools.launch
    from tools.deploy.local import deployment_config

    store_dir = walk_store(tmp_path / "store", num_users=8, num_items=30)
    devices_dir = split_devices(open_store(store_dir), tmp_path / "devices")
    common = [*argv, "--set", f"data-store={store_dir}", "--run-dir", str(tmp_path / "runs"), "--run-name", "r"]
    resolved = {}

    def capture(name):
        def stop(cfg, *args, **kwargs):
            resolved[name] = dict(cfg)
            raise _Stop
        return stop

    monkeypatch.setattr(tools.launch, "run_simulation", capture("simulate"))
    monkeypatch.setattr(tools.deploy.local, "run_local", capture("deploy local"))
    monkeypatch.setattr(shared.text.features, "features_for", lambda *a, **k: None)  # no encoding needed here
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # deploy local's SIGTERM/SIGHUP handlers
    for command in (["simulate"], ["deploy", "local", "--devices", "8", "--devices-dir", str(devices_dir),
                                   "--insecure"]):
        with pytest.raises(_Stop):
            main([*command, *common])
    simulate, local = resolved["simulate"], resolved["deploy local"]
    assert simulate["model"] == ("sasrec" if "model=sasrec" in argv else "channel-scorer")
    assert local == simulate
    out = tmp_path / "run.toml"
    assert main(["deploy", "run-config", "--devices", "8", "--devices-dir", str(devices_dir), "--out", str(out),
                 *common]) == 0
    import tomllib

    assert tomllib.loads(out.read_text()) == deployment_config(simulate, devices_dir, 8)  # what deploy local submits
    printed = capsys.readouterr().out
    assert f"run config ({simulate['model']}," in printed
    if "--epsilon" in argv:  # every entry point scales the same multipliers, over the same population
        from shared.config import resolve_run
        from shared.privacy.pipeline import planned_epsilon, planned_sample_rate

        defaults = resolve_run()
        assert simulate["target-epsilon"] == 4.0
        assert 3.99 < planned_epsilon(simulate, planned_sample_rate(simulate, 8)) <= 4.0
        assert simulate["user-noise-multiplier"] < defaults["user-noise-multiplier"]  # epsilon 4 needs less noise
        assert printed.count("privrec: --epsilon 4: noise multipliers scaled by one factor") == 3


def test_deploy_refuses_a_pipeline_over_its_budget_before_starting(tmp_path, devices, capsys):
    _, out = devices  # 3 devices: 5 rounds at q = 1/3 exceed the default target-epsilon 2
    for argv in (["deploy", "local", "--insecure", "--run-name", "r"], ["deploy", "run-config", "--out",
                                                                       str(tmp_path / "run.toml")]):
        code = main([*argv, "--devices", "3", "--devices-dir", str(out), "--run-dir", str(tmp_path / "runs")])
        assert_user_error(code, capsys.readouterr().err, "'target-epsilon' = 2", "q = 0.333")
    assert not (tmp_path / "runs" / "r" / "deploy").exists() and not (tmp_path / "run.toml").exists()
