"""model = content-scorer (issue 13): the scorer's gradient, the one composed accountant, the refusals, and the
whole pipeline (popularity release + user-level DP-FedAvg) through the real ServerApp and ClientApp in process."""

from __future__ import annotations

import dataclasses
import json

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from shared import config
from shared.errors import PrivrecError
from shared.privacy.pipeline import check_pipeline_budget, pipeline_epsilon
from shared.privacy.user_level import clip_update
from shared.scorer import ContentScorer, fedsgd_update, public_catalogue, user_gradient

NUM_DEVICES, NUM_ITEMS = 8, 40


def _catalogue(num_items: int = NUM_ITEMS, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = ["<pad>"] + [str(i) for i in range(1, num_items + 1)]
    return public_catalogue(rng.normal(size=(num_items + 1, dim)), ids,
                            [None] + [f"Film {i} ({1950 + i})" for i in range(1, num_items + 1)])


def test_user_gradient_is_the_mean_loss_gradient_over_the_last_targets_and_the_update_is_minus_it():
    catalogue = _catalogue()
    model = ContentScorer(NUM_ITEMS, 6)
    model.popularity.copy_(torch.linspace(0, 1, NUM_ITEMS + 1))
    train = [np.arange(3, 20)]
    grads = user_gradient(model, catalogue, train, targets=4, profile_items=5, decay=0.8)
    # By hand: the four examples (history up to each of the last four items), mean cross-entropy.
    from shared.scorer import device_features

    histories = [train[0][:pos] for pos in range(13, 17)]
    scores = model(catalogue.text, *device_features(catalogue, histories, 5, 0.8))
    loss = torch.nn.functional.cross_entropy(scores[:, 1:], torch.tensor([16, 17, 18, 19]) - 1)
    expected = torch.autograd.grad(loss, [model.text_weight, model.scales])
    assert torch.allclose(grads["text_weight"], expected[0]) and torch.allclose(grads["scales"], expected[1])
    assert set(grads) == {"text_weight", "scales"}  # the released popularity is not trained
    state = fedsgd_update(model, grads)
    assert set(state) == set(grads)  # the released popularity is the server's: not sent back
    update = {k: (state[k] - model.state_dict()[k]).numpy() for k in grads}
    assert np.allclose(update["scales"], -grads["scales"].numpy())
    clipped, norm = clip_update(update, 0.01)  # the server's clip bounds what one user moves
    assert norm > 0.01 and np.sqrt(sum((v ** 2).sum() for v in clipped.values())) == pytest.approx(0.01)
    # A history too short to hold a target contributes a zero gradient (it still answers).
    assert all(float(g.abs().sum()) == 0 for g in user_gradient(model, catalogue, [np.array([5])], 4, 5, 0.8).values())


@pytest.mark.parametrize("pop_z,z,q,rounds", [(4.0, 8.2, 1.0, 10), (3.0, 5.0, 0.3, 25), (2.0, 9.0, 1.0, 0)])
def test_the_composed_epsilon_agrees_with_dp_accounting(pop_z, z, q, rounds):
    events = [dpa.GaussianDpEvent(pop_z)]
    if rounds:
        events.append(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds))
    other = rdp_privacy_accountant.RdpAccountant()  # another code base's RDP (its own orders and conversion)
    other.compose(dpa.ComposedDpEvent(events))
    ours = pipeline_epsilon(pop_z, z, q, rounds, 1e-5, "rdp")
    assert ours == pytest.approx(other.get_epsilon(1e-5), rel=0.03)
    # Composition counts: the rounds add to the release alone, more rounds spend more.
    assert ours > pipeline_epsilon(pop_z, z, q, 0, 1e-5, "rdp") or rounds == 0
    assert pipeline_epsilon(pop_z, z, q, rounds + 5, 1e-5, "rdp") > ours


def _scorer_cfg(**overrides):
    return config.validate({**config.CONTENT_SCORER_PIPELINE, **overrides})


@pytest.mark.parametrize("key,value,words", [
    ("dp", True, "config key 'dp' = True with model = content-scorer"),
    ("user-dp", False, "config key 'user-dp' = False with model = content-scorer"),
    ("accountant", "gdp", "config key 'accountant' = gdp"),
    ("user-noise-multiplier", 0.0, "config key 'user-noise-multiplier' = 0.0: must be > 0"),
    ("user-clipping-norm", -1.0, "config key 'user-clipping-norm' = -1.0: must be > 0"),
    ("popularity-noise-multiplier", 0.0, "config key 'popularity-noise-multiplier' = 0.0: must be > 0"),
])
def test_a_config_that_would_release_unnoised_or_outside_the_mode_is_refused_naming_the_key(key, value, words):
    with pytest.raises(PrivrecError) as err:
        _scorer_cfg(**{key: value})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_config_over_its_target_epsilon_is_refused_before_anything_runs():
    cfg = _scorer_cfg()
    assert check_pipeline_budget(cfg, 0.25) <= cfg["target-epsilon"] == 2.0  # the default pipeline fits its budget
    with pytest.raises(PrivrecError, match=r"^config key 'target-epsilon' = 2: this run would reach user-level "
                                           r"epsilon \d+\.\d+"):
        check_pipeline_budget(_scorer_cfg(**{"num-rounds": 40}), 0.25)
    assert check_pipeline_budget(_scorer_cfg(**{"num-rounds": 40, "target-epsilon": 0.0}), 0.25) > 2.0  # 0 = no cap


# ------------------------------------------------------------------ the pipeline, in process
@pytest.fixture
def digit_store(tmp_path, monkeypatch, minilm):
    """The +1 walk with numeric catalogue ids (its raw-id proximity is the signal a trained scorer can find)."""
    from shared.data.store import write_store
    from shared.text.features import read_catalogue, text_features
    from tests.synthetic import walk_split

    split = walk_split(num_users=NUM_DEVICES, num_items=NUM_ITEMS, seed=1)
    split = dataclasses.replace(split, item_ids=["<pad>"] + [str(i) for i in range(1, NUM_ITEMS + 1)])
    store = write_store(split, tmp_path / "store", users_per_device=1, meta_extra={"dataset": "digit-walk"})
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    text_features(read_catalogue(store), tmp_path / "cache", encoder=minilm, progress=False)
    return store


def _run(tmp_path, store, name, **overrides):
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from simulations.inprocess import InProcessGrid

    cfg = _scorer_cfg(**{"data-store": str(store), "run-dir": str(tmp_path / "runs"), "run-name": name,
                         "population-dir": str(tmp_path / f"population-{name}"), **overrides})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    FederatedRun(cfg, run_dir, grid).execute()
    read = lambda f: json.loads((run_dir.path / f).read_text())  # noqa: E731
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    return cfg, run_dir.path, grid, rows, read("summary.json"), read("privacy.json")


def test_the_pipeline_releases_popularity_then_rounds_and_records_the_composed_epsilon(tmp_path, digit_store,
                                                                                      capsys):
    cfg, path, grid, rows, summary, privacy = _run(tmp_path, digit_store, "default",
                                                   **{"num-rounds": 3, "fraction-train": 1.0,
                                                      "user-noise-multiplier": 8.2})
    kinds = [m.metadata.message_type for m in grid.delivered]
    assert kinds[:NUM_DEVICES] == ["query.popularity"] * NUM_DEVICES  # the release comes first, once
    assert kinds.count("query.popularity") == NUM_DEVICES and kinds.count("train") == 3 * NUM_DEVICES  # q = 1
    expected = pipeline_epsilon(4.0, 8.2, 1.0, 3, 1e-5, "rdp")
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert privacy["user-level"]["pipeline"]["history"] == [[4.0, 1.0, 1], [8.2, 1.0, 3]]
    assert summary["privacy"]["user-level"]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert [r["user-level-epsilon"] for r in rows] == sorted(r["user-level-epsilon"] for r in rows)  # cumulative
    assert rows[0]["user-level-epsilon"] == pytest.approx(pipeline_epsilon(4.0, 8.2, 1.0, 0, 1e-5, "rdp"))
    statement = privacy["statements"][0]["sentence"]
    assert "add/remove one user" in summary["privacy"]["user-level"]["relation"]
    assert "not against the server" in statement
    # What leaves a device: the scorer's trained weights only (not the released bias it was sent), never its history.
    reply = next(m for m in grid.replies if m.content.array_records)
    assert set(reply.content.array_records["arrays"].keys()) == {"text_weight", "scales"}
    ledger = json.loads(next((tmp_path / "population-default").glob("*/privacy-ledger.json")).read_text())
    assert [r["kind"] for r in ledger["releases"]] == ["popularity-histogram"] + ["content-scorer-round"] * 3
    assert summary["federated-evaluation"]["test-ndcg@10"] is not None
    # `privrec report` recomputes the user-level figure from the recorded history (two accountants): no flag.
    from tools.cli import main

    assert main(["report", str(path)]) == 0
    # No on-device DP-SGD: the per-device zeros are said not to be spend, and no histogram of them is drawn.
    report = json.loads((path / "report.json").read_text())
    assert "epsilon-histogram.png" not in {p["file"] for p in report["plots"]}
    devices = (path / "report.md").read_text().split("## Per device", 1)[1]
    assert "No on-device DP-SGD in this run (dp = false)" in devices
    assert f"epsilon {expected:.4f} at delta 1e-05, for each of the {NUM_DEVICES} devices" in devices
    assert 'id="device-preface"' in (path / "report.html").read_text()
    # Every device trained in the 3 rounds (q = 1): the server counted them, and each ledger lists them.
    assert {d["device"]: d["update-rounds"] for d in report["privacy"]["devices"]} == \
        {str(i): [1, 2, 3] for i in range(NUM_DEVICES)}
    assert {d["rounds-trained"] for d in report["privacy"]["devices"]} == {3}
    # the ledgers' all-runs figure: one run here, every round at q = 1, so exactly the run's figure
    assert [d["ledger"]["user-level-epsilon"] for d in report["privacy"]["devices"]] == \
        pytest.approx([expected] * NUM_DEVICES, rel=1e-9)
    assert "the devices' own ledgers hold up to" in devices
    assert not report["privacy"]["flagged"]
    # The device's own view (`privrec ledger`): at q = 1 every device took part in every round, so the ledger's
    # composition (no sampling amplification) is exactly the run's figure.
    capsys.readouterr()
    assert main(["ledger", str(tmp_path / "population-default" / "device-0"), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)["user-level"]
    assert own["epsilon"] == pytest.approx(expected, rel=1e-9) and own["releases"] == 4
    assert [r["run"] for r in own["runs"]] == ["default"]
    # A ledger that lost a round the server counted is the dangerous direction: flagged, exit status 3.
    ledger_file = tmp_path / "population-default" / "device-1" / "privacy-ledger.json"
    ledger = json.loads(ledger_file.read_text())
    ledger["releases"] = [r for r in ledger["releases"] if r["release"] != "default-round2"]
    ledger_file.write_text(json.dumps(ledger))
    assert main(["report", str(path)]) == 3
    flagged = json.loads((path / "report.json").read_text())["privacy"]
    assert flagged["flagged-devices"] == ["1"]
    flag = next(d for d in flagged["devices"] if d["device"] == "1")["flags"]
    assert [f["code"] for f in flag] == ["ledger-missing-round"] and "round(s) [2]" in flag[0]["detail"]


def test_a_trained_scorer_beats_the_untrained_one(tmp_path, digit_store):
    # Little noise, no budget: this checks that the federated gradient steps learn, not the privacy.
    cfg, path, grid, rows, summary, privacy = _run(
        tmp_path, digit_store, "learn", **{"num-rounds": 15, "user-noise-multiplier": 0.01, "target-epsilon": 0.0,
                                           "server-lr": 0.3, "fraction-train": 1.0})
    assert summary["central-evaluation"]["test-ndcg@10"] > summary["central-evaluation-initial"]["test-ndcg@10"] + 0.1
    assert summary["federated-evaluation"]["test-ndcg@10"] == pytest.approx(
        summary["central-evaluation"]["test-ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("overrides", [{"fraction-train": 0.25}, {"fraction-train": 1.0}, {"devices-per-round": 7},
                                       {"devices-per-round": 5000}])
def test_the_cli_budget_check_uses_the_servers_sampling_rate(overrides):
    from server.strategy import user_sample_rate
    from shared.privacy.pipeline import planned_sample_rate

    cfg = _scorer_cfg(**{"devices-per-round": 0, **overrides})
    for population in (1, 8, 943):
        assert planned_sample_rate(cfg, population) == user_sample_rate(cfg, population)


from tests.test_cli import inprocess_simulation, run_cli  # noqa: E402,F401 - the CLI's in-process stand-in


def test_privrec_simulate_without_options_runs_the_pipeline_and_prints_figures_baselines_and_epsilon(
        tmp_path, digit_store, capsys, inprocess_simulation):  # noqa: F811
    code, out, err = run_cli(capsys, "simulate", "--set", f"data-store={digit_store}", "--run-dir", tmp_path / "runs",
                             "--run-name", "cli", "--set", f"population-dir={tmp_path / 'pop'}")
    assert code == 0, err
    recorded = json.loads((tmp_path / "runs" / "cli" / "config.json").read_text())
    assert {k: recorded[k] for k in config.DEFAULT_PIPELINE} == config.DEFAULT_PIPELINE  # the private pipeline
    assert recorded["model"] == "channel-scorer"
    privacy = json.loads((tmp_path / "runs" / "cli" / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(pipeline_epsilon(4.6, 3.22, 2 / NUM_DEVICES, 5, 1e-5, "rdp",
                                                                cooc_noise=2.76))
    assert privacy["epsilon"] <= 2.0
    lines = out.splitlines()
    assert any(line.startswith("NDCG@10 ") and "HR@10" in line for line in lines)
    for kind in ("popularity", "content"):
        assert any(line.startswith(f"reference: baseline {kind} at the same user-level epsilon "
                                   f"{privacy['epsilon']:.2f}") for line in lines)
    assert f"privacy: user-level epsilon {privacy['epsilon']:.2f} at delta 1e-05" in out
    assert "unit: one user's whole history, add/remove one user" in out


def test_privrec_simulate_refuses_a_pipeline_over_its_budget_before_any_work(tmp_path, digit_store, capsys,
                                                                             inprocess_simulation):  # noqa: F811
    code, out, err = run_cli(capsys, "simulate", "--set", f"data-store={digit_store}", "--rounds", "100",
                             "--run-dir", tmp_path / "runs", "--run-name", "over")
    assert code == 2 and "config key 'target-epsilon' = 2: this run would reach" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs" / "over").exists()


def test_devices_at_their_cap_decline_and_their_ledgers_never_pass_it(tmp_path, digit_store):
    cfg, path, grid, rows, summary, privacy = _run(
        tmp_path, digit_store, "capped", **{"num-rounds": 6, "fraction-train": 1.0, "user-noise-multiplier": 8.2,
                                            "max-epsilon": 1.25})
    from shared.privacy.accounting import epsilon_from_state

    for ledger_file in (tmp_path / "population-capped").glob("*/privacy-ledger.json"):
        ledger = json.loads(ledger_file.read_text())
        history = [[r["noise_multiplier"], r["sample_rate"], r["steps"]] for r in ledger["releases"]]
        assert epsilon_from_state({"history": history, "mechanism": "rdp"}, 1e-5, "rdp") <= 1.25
        assert 1 < len(history) < 7  # the release and some rounds, not all six
    assert summary["stopped-early"]["reason"].startswith("every one of the 8 connected devices has reached")
