"""The run-config schema: defaults agree with pyproject.toml, and bad values are named."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from shared import config
from shared.errors import PrivrecError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_schema():
    flower_defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flower_defaults == config.defaults()


@pytest.mark.parametrize("key, value, fragment", [
    ("noise-multiplier", -0.5, "'noise-multiplier' = -0.5"),
    ("devices-per-round", -1, "'devices-per-round'"),
    ("window", 0, "'window' = 0"),
    ("window", 1, "'window' = 1"),
    ("delta", 1.0, "'delta' = 1.0"),
    ("delta", 0.0, "'delta'"),
    ("accountant", "moments", "'accountant'"),
    ("num-rounds", 0, "'num-rounds'"),
    ("max-grad-norm", 0.0, "'max-grad-norm'"),
    ("strategy", "fedsgd", "'strategy'"),
])
def test_out_of_range_values_name_the_key_and_value(key, value, fragment):
    with pytest.raises(PrivrecError) as err:
        config.validate({key: value})
    assert fragment in str(err.value)


def test_unknown_key_suggests_the_close_one():
    suggestion = r"unknown config key 'noise-multipler' \(did you mean 'noise-multiplier'\?\)"
    with pytest.raises(PrivrecError, match=suggestion):
        config.validate({"noise-multipler": 1.0})


def test_wrong_type_is_named():
    with pytest.raises(PrivrecError, match="'num-rounds': 'ten' is not a valid int"):
        config.validate({"num-rounds": "ten"})


def test_zero_devices_per_round_needs_a_fraction():
    with pytest.raises(PrivrecError, match="no device would train"):
        config.validate({"devices-per-round": 0, "fraction-train": 0.0})
    assert config.validate({"devices-per-round": 0, "fraction-train": 0.1})["fraction-train"] == 0.1


def test_window_must_fit_the_model():
    with pytest.raises(PrivrecError, match="'window' = 60"):
        config.validate({"window": 60, "max-len": 50})


def test_config_file_layers_under_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('num-rounds = 7\nnoise-multiplier = 2.0\n')
    cfg = config.resolve(path, {"noise-multiplier": "0.5"})
    assert cfg["num-rounds"] == 7 and cfg["noise-multiplier"] == 0.5


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("num-rounds = -3\n")
    with pytest.raises(PrivrecError, match="bad.toml: config key 'num-rounds' = -3"):
        config.resolve(path)
    path.write_text("num-rounds = = 3\n")
    with pytest.raises(PrivrecError, match="bad.toml: not valid TOML"):
        config.resolve(path)
    with pytest.raises(PrivrecError, match="does not exist"):
        config.resolve(tmp_path / "missing.toml")


FLOAT_KEYS = [name for name, key in config.SCHEMA.items() if key.type is float]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "inf", "nan"])
def test_every_float_key_must_be_finite(key, value):
    # `inf > 0` passed the range checks: every device then failed after reserving privacy spend.
    with pytest.raises(PrivrecError, match=f"'{key}' = .*must be a finite number"):
        config.validate({key: value})


def test_non_finite_values_in_a_toml_file_name_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("local-lr = inf\n")
    with pytest.raises(PrivrecError, match=r"run.toml: config key 'local-lr' = inf: must be a finite number"):
        config.resolve(path)


def test_dp_without_noise_is_refused():
    with pytest.raises(PrivrecError, match="'noise-multiplier' = 0 with 'dp' = true adds no noise") as err:
        config.validate({"dp": True, "noise-multiplier": 0.0})
    assert "\n" not in str(err.value)
    assert config.validate({"dp": False, "noise-multiplier": 0.0})["dp"] is False  # a non-private run says so


@pytest.mark.parametrize("key", ["user-noise-multiplier", "user-clipping-norm"])
def test_user_level_dp_without_noise_or_clip_is_refused(key):
    with pytest.raises(PrivrecError, match=f"'{key}' = 0.0: must be > 0"):
        config.validate({"user-dp": True, key: 0.0})


# ----------------------------------------------------------------------------- typed sections (issue 11)
def test_every_key_is_one_field_of_one_typed_section():
    run = config.RunConfig.from_values({"local-lr": 0.01, "user-noise-multiplier": 2.0})
    fields = [(section, config.field_name(key)) for section, keys in config.SECTIONS.items() for key in keys]
    assert len(fields) == len(set(fields)) == len(config.SCHEMA)
    assert run.device.lr == 0.01 and run.user_dp.noise_multiplier == 2.0 and run.values["local-lr"] == 0.01
    for section, keys in config.SECTIONS.items():
        for key in keys:
            assert getattr(getattr(run, section), config.field_name(key)) == run.values[key]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.device.lr = 1.0  # typed sections are read-only: a change goes through with_values (validated)
    with pytest.raises(PrivrecError, match="'local-lr' = -1.0"):
        run.with_values(**{"local-lr": -1.0})


def test_enumerations_and_defaults_live_only_in_the_schema():
    from shared.model import FROZEN_BY_SCOPE, ModelConfig
    from shared.privacy import accounting
    from shared.training import LocalTrainConfig

    assert accounting.ACCOUNTANTS is config.ACCOUNTANTS
    assert tuple(FROZEN_BY_SCOPE) == config.TRAINABLE_SCOPES
    run = config.RunConfig.from_values({})
    local = LocalTrainConfig()
    assert all(getattr(local, f) == getattr(run.device, f) for f in vars(run.device) if hasattr(local, f))
    model = ModelConfig(num_items=3)
    assert all(getattr(model, f) == getattr(run.model, f) for f in vars(run.model))


def test_a_run_without_a_model_of_its_own_is_the_default_pipeline_under_explicit_keys(tmp_path):
    # shared.config.resolve_run: what `privrec simulate`, `deploy local` and `deploy run-config` all resolve
    cfg = config.resolve_run(None, {"num-rounds": "3"})
    assert cfg["num-rounds"] == 3  # an explicit key wins over the pipeline's
    assert {k: cfg[k] for k in config.DEFAULT_PIPELINE if k != "num-rounds"} == \
        {k: v for k, v in config.DEFAULT_PIPELINE.items() if k != "num-rounds"}
    path = tmp_path / "run.toml"
    path.write_text("server-lr = 0.3\n")
    from_file = config.resolve_run(path)
    assert from_file["model"] == "channel-scorer" and from_file["server-lr"] == 0.3


def test_a_run_that_chooses_its_model_keeps_the_schemas_defaults(tmp_path):
    sasrec = config.validate({"model": "sasrec"})  # the schema's defaults are SASRec's (on-device DP-SGD)
    assert config.resolve_run(None, {"model": "sasrec"}) == sasrec
    path = tmp_path / "run.toml"
    path.write_text('model = "sasrec"\n')
    assert config.resolve_run(path) == sasrec
    assert config.resolve_run(path, {"num-rounds": 4}) == {**sasrec, "num-rounds": 4}
    assert config.resolve(None, {}) == config.defaults()  # baseline and audit: no pipeline preset
