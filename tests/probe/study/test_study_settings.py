"""A study run again into its directory with other settings measures under those settings: a
capture or lesion table made with other ones (another sample limit, another probe, weights
trained anew) is made again, never presented under the new settings."""

import json

import pytest

import probe
from probe.study import get_preset, run_study
from probe.study.files import capture_key, settings_key, stamped_table, write_stamped_csv

SMALL = dict(
    depths=(8, 14),
    seeds=(0,),
    train_limit=300,
    recipe_overrides={"epochs": 1, "batch_size": 100},
    model_options={"width": 4},
    capture_at=("last",),
    probes=("residual",),
)


def _samples(out, name="plain14-s0-e0001.h5") -> int:
    with probe.open(out / "captures" / name) as cap:
        return cap.read(cap.layers[0], "y_norm").shape[0]


def test_other_limits_and_probes_are_captured_again(tmp_path):
    out = tmp_path / "s"
    settings = {**SMALL, "probes": ("residual", "channel")}
    run_study(get_preset("default", capture_limit=32, lesion_limit=20, **settings), out)
    assert _samples(out) == 32
    lesions = out / "tables" / "lesions-plain14-s0.key.json"
    first_key = json.loads(lesions.read_text())["key"]
    channel_figures = sorted((out / "figures").glob("*branch_variance*"))
    assert channel_figures

    # tables an earlier study with an arm or other depths left
    for name in ("closeness.csv", "lesions-plain20-s0.csv", "lesions-plain20-s0.key.json"):
        (out / "tables" / name).write_text("model,seed\nplain20,0\n")
    again = run_study(get_preset("default", capture_limit=48, lesion_limit=30, **SMALL), out)
    assert not list((out / "tables").glob("*plain20*"))
    assert not (out / "tables" / "closeness.csv").exists()
    assert _samples(out) == 48
    assert json.loads(lesions.read_text())["key"] != first_key
    with probe.open(out / "captures" / "plain14-s0-e0001.h5") as cap:
        assert "channel_mean" not in cap.quantities(cap.layers[0])  # the probe dropped since
    # the dropped probe's figures are gone, from the folder and from the report
    assert not any(f.exists() for f in channel_figures)
    assert "final_branch_variance.png" not in again.report.read_text()
    # the same settings again reuse all of it: test_study.py's and test_interventions.py's reruns


def test_a_key_covers_the_weights_and_every_setting(tmp_path):
    ck = tmp_path / "epoch-0001.json"
    weights = ck.with_suffix(".safetensors")
    weights.write_bytes(b"weights")
    cfg = get_preset("default", **SMALL)

    class Data:
        name = "digits"

    kw = {"limit": 32, "layers": "auto", "probes": [probe.ResidualNorms()]}
    key = capture_key(ck, cfg, Data(), kw)
    assert key == capture_key(ck, cfg, Data(), dict(kw))
    others = [
        {**kw, "limit": 64},
        {**kw, "layers": "**bn*"},
        {**kw, "probes": [probe.ResidualNorms(fused=True)]},
        {**kw, "probes": [probe.ChannelStats()]},
    ]
    assert len({key, *(capture_key(ck, cfg, Data(), o) for o in others)}) == 1 + len(others)
    weights.write_bytes(b"weights trained anew")
    assert capture_key(ck, cfg, Data(), kw) != key


@pytest.mark.parametrize(
    "damage",
    [
        lambda stamp: stamp.unlink(),
        lambda stamp: stamp.write_text("{not json"),
        lambda stamp: stamp.write_text('{"key": "of other settings"}'),
    ],
    ids=["no stamp", "damaged stamp", "other settings"],
)
def test_a_table_is_reused_only_under_its_stamp(tmp_path, damage):
    import pandas as pd

    ck = tmp_path / "epoch-0001.json"
    ck.with_suffix(".safetensors").write_bytes(b"weights")
    key = settings_key(ck, lesion_limit=20)
    path = tmp_path / "lesions-m-s0.csv"
    write_stamped_csv(path, pd.DataFrame({"model": ["m"], "value": [0.5]}), key)
    assert stamped_table(path, ("model",), key) is not None
    damage(tmp_path / "lesions-m-s0.key.json")
    assert stamped_table(path, ("model",), key) is None


def _drop_last_row(path):
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # cut at a row boundary: it still parses


@pytest.mark.parametrize(
    "damage",
    [
        _drop_last_row,
        lambda path: path.write_bytes(path.read_bytes()[:-7]),  # a row cut short
        lambda path: path.write_bytes(path.read_bytes().replace(b"0.5", b"0.6")),  # a number
    ],
    ids=["row dropped", "row cut", "number changed"],
)
def test_a_stamped_table_changed_since_it_was_written_is_recomputed(tmp_path, damage, caplog):
    import logging

    import pandas as pd

    path = tmp_path / "lesions-m-s0.csv"
    table = pd.DataFrame({"model": ["m", "m", "m"], "value": [0.25, 0.5, 0.75]})
    write_stamped_csv(path, table, "key")
    pd.testing.assert_frame_equal(stamped_table(path, ("model",), "key"), table)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert stamped_table(path, ("model",), "key", warn=False) is None
        assert not caplog.records  # a planner's question, without a word
        assert stamped_table(path, ("model",), "key") is None
    assert [r.getMessage() for r in caplog.records] == [
        f"recomputing {path}: the stored table is empty or damaged"
    ]


def test_a_table_stamped_without_a_checksum_is_recomputed(tmp_path):
    import pandas as pd

    path = tmp_path / "lesions-m-s0.csv"
    write_stamped_csv(path, pd.DataFrame({"model": ["m"]}), "key")
    (tmp_path / "lesions-m-s0.key.json").write_text('{"key": "key"}')  # an older stamp
    assert stamped_table(path, ("model",), "key") is None


def test_a_planner_asks_quietly_and_the_redo_says_it_once(tmp_path, caplog):
    """The distributed planner asks whether each capture and table is done before a stage, then
    the unit that redoes it says why: one warning per file, not one from each."""
    import logging

    import pandas as pd
    import torch

    from probe.study.files import capture_done, valid_capture

    path = tmp_path / "c.h5"
    net = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batches = [torch.randn(4, 1, 8, 8)]
    probe.capture(
        net,
        batches,
        probes=[probe.ResidualNorms()],
        out=path,
        provenance={"study_capture_key": "old"},
    ).close()
    table = tmp_path / "lesions-m-s0.csv"
    ck = tmp_path / "epoch-0001.json"
    ck.with_suffix(".safetensors").write_bytes(b"weights")
    write_stamped_csv(table, pd.DataFrame({"model": ["m"]}), "old")
    cfg = get_preset("default", **SMALL)

    class Data:
        name = "digits"

    with caplog.at_level(logging.WARNING, logger="probe"):
        assert not capture_done(path, ck, cfg, Data(), limit=4)
        assert stamped_table(table, ("model",), "new", warn=False) is None
        assert not caplog.records
        assert not valid_capture(path, "new")
        assert stamped_table(table, ("model",), "new") is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"capturing {path} again",
        f"recomputing {table}",
    ]
    assert valid_capture(path, "old") and path.exists()  # asked, never deleted


@pytest.mark.parametrize("warn", [True, False], ids=["unit", "planner"])
def test_a_damaged_capture_is_deleted_and_said_once_whoever_asks(tmp_path, caplog, warn):
    import logging

    import torch

    from probe.study.files import valid_capture

    path = tmp_path / "c.h5"
    net = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    probe.capture(net, [torch.randn(4, 1, 8, 8)], probes=[probe.ResidualNorms()], out=path).close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="probe"):
        assert not valid_capture(path, "key", warn=warn)
        assert not valid_capture(path, "key", warn=warn)  # gone: nothing more to say
    assert not path.exists()
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"capturing {path} again: it is damaged (")
