import pytest

from shared.aggregation import ITEM_ROW_KEYS
from simulations.fedopt import ARMS, parse_arm, server_keys


def test_server_on_rows_steps_the_arrays_the_arm_averages_per_row():
    assert server_keys(ARMS["rows"]) is None  # the server optimizer acts on every array
    assert server_keys(ARMS["rows-lr2"]) == ("item_emb.weight",)
    _, arm = parse_arm("rows-lr2:rows=emb+head")
    assert server_keys(arm) == ITEM_ROW_KEYS
    _, arm = parse_arm("rows:server-on=everything")
    with pytest.raises(ValueError, match="server_on"):
        server_keys(arm)


def test_named_arms_change_rows_as_their_names_say():
    assert ARMS["rows-cohort256"].cohort == 256 and ARMS["rows-cohort256"].rows == "emb"
    assert ARMS["rows-epochs1"].local_epochs == 1 and ARMS["rows-epochs1"].rows == "emb"
    assert ARMS["rows-lr2"].server_lr == 2.0 and ARMS["rows-avgm-rows"].server == "avgm"
    base = ARMS["rows-epochs1-lr01"]
    for name, server_keys_expected in [("rows-epochs1-lr01-lr2", ("item_emb.weight",)),
                                       ("rows-epochs1-lr01-avgm-rows", ("item_emb.weight",)),
                                       ("rows-epochs1-lr01-slr2", None)]:
        arm = ARMS[name]
        assert (arm.local_epochs, arm.local_lr, arm.rows) == (base.local_epochs, base.local_lr, base.rows)
        assert server_keys(arm) == server_keys_expected


def test_run_file_of_an_arm_with_a_decimal_value_keeps_its_seed(tmp_path):
    from simulations.fedopt import run_name

    stem = tmp_path / f"fedopt-x-{run_name('rows-epochs1-lr01:lr_decay=0.2')}-seed0"
    assert stem.with_suffix(".json").name == "fedopt-x-rows-epochs1-lr01_lr_decay=0_2-seed0.json"


def test_parallel_runs_started_in_the_same_second_keep_their_own_tables(tmp_path):
    from simulations.fedopt import run_name, table_stem

    stamp = tmp_path / "fedopt-20261128-235513"
    spec = "rows-epochs1-lr01-avgm-rows:lr_decay=0.5"
    stems = {table_stem(stamp, [a], [s]) for a in (spec, "rows") for s in (0, 1)}
    assert len(stems) == 4
    per_seed = stamp.with_name(f"{stamp.name}-{run_name(spec)}-seed0")  # run()'s file of the same arm and seed
    assert per_seed not in stems and all(stem.with_suffix(".json").name.endswith("-table.json") for stem in stems)
