"""Every intervention arm end to end on a tiny grid: runs, tables, verdicts, figures, report,
resumption, and the errors a user meets first."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from probe.cli.main import cli
from probe.errors import ProbeError
from probe.study import get_preset, run_study
from probe.study.interventions import ARMS
from probe.study.runner import study_tables

# One pytest-xdist worker runs this module, so its tiny intervention study is made once.
pytestmark = pytest.mark.xdist_group("interventions")

TINY = dict(
    depths=(8, 14),
    seeds=(0, 1),
    train_limit=400,
    recipe_overrides={"epochs": 2, "batch_size": 64},
    model_options={"width": 4},
    capture_limit=32,
    toy_seeds=16,
    lrs=(0.1, 0.01),
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("interventions")
    return run_study(get_preset("interventions", **TINY), out)


def test_every_arm_has_runs_a_verdict_and_a_report_section(study):
    assert [v.arm for v in study.arm_verdicts] == list(ARMS)
    conds = pd.read_csv(study.out / "tables" / "conditions.csv")
    assert set(conds["arm"]) == set(ARMS) - {"toy"}
    assert (conds.groupby(["arm", "key"])["seed"].nunique() == 2).all()
    for v in study.arm_verdicts:
        assert v.rule and v.evidence
    page = study.report.read_text()
    for arm in ARMS:
        assert f"id='arm-{arm}'" in page
    assert "Tested by intervention" in page and "## Interventions" in study.summary.read_text()
    saved = json.loads((study.out / "tables" / "intervention_verdicts.json").read_text())
    assert [v["arm"] for v in saved] == list(ARMS)
    # every table the study wrote is one it keeps (the others an earlier study left are deleted)
    cfg = get_preset("interventions", **TINY)
    assert {p.name for p in (study.out / "tables").iterdir()} == study_tables(cfg)


def test_the_constructed_run_starts_exactly_at_the_shallow_nets_error(study):
    c = pd.read_csv(study.out / "tables" / "conditions.csv")
    built = c[c["key"] == "plain14-constructed"]
    assert (built["start_train_error"] == built["source_train_error"]).all()
    assert (built["construct_eval_max_abs_diff"] < 1e-4).all()
    cl = pd.read_csv(study.out / "tables" / "closeness.csv")
    start = cl[
        (cl["key"] == "plain14-constructed") & (cl["epoch"] == 0) & (cl["blocks"] == "extra")
    ]
    assert len(start) == 2 and (start["closeness"] < 1e-3).all()  # the extra blocks are identities


def test_curves_have_every_epoch_and_the_arm_figures_exist(study):
    curves = pd.read_csv(study.out / "tables" / "curves.csv")
    assert (curves.groupby(["key", "seed"])["epoch"].nunique() == 3).all()  # 0, 1, 2
    for name in (
        "arm_constructed_training_error",
        "arm_constructed_closeness",
        "arm_skipinit_training_error",
        "arm_shortcut_scale_training_error",
        "arm_shortcut_scale_gradients",
        "arm_lr_training_error",
        "arm_matched_loss",
        "arm_toy_solved",
        "arm_toy_loss",
    ):
        assert (study.out / "figures" / f"{name}.png").stat().st_size > 1000, name


def test_a_rerun_reuses_every_run_the_toy_and_every_figure(study):
    figures = sorted((study.out / "figures").iterdir())
    stamps = [f.stat().st_mtime_ns for f in figures]
    again = run_study(get_preset("interventions", **TINY), study.out)
    assert again.timings["interventions"] < study.timings["interventions"]
    assert [v.verdict for v in again.arm_verdicts] == [v.verdict for v in study.arm_verdicts]
    # the same numbers: not one figure drawn again (analyses.figure_reuse)
    assert sorted((study.out / "figures").iterdir()) == figures
    assert [f.stat().st_mtime_ns for f in figures] == stamps


def test_unknown_arm_is_a_clear_error_and_a_clean_cli_exit():
    with pytest.raises(ProbeError, match="Unknown study arm 'skipinti'.*skipinit"):
        get_preset("default", arms="skipinti")
    res = CliRunner().invoke(cli, ["study", "--arm", "lr,bogus"])
    assert res.exit_code != 0 and "Unknown study arm 'bogus'" in res.output
    assert "Traceback" not in res.output


def test_constructions_refuse_pre_activation_families_before_training(tmp_path):
    cfg = get_preset("default", families="preplain,preresnet", arms="constructed", depths="8,14")
    with pytest.raises(ProbeError, match="post-activation"):
        run_study(cfg, tmp_path / "s")
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())


def test_constructed_arm_needs_two_depths(tmp_path):
    with pytest.raises(ProbeError, match="two depths"):
        run_study(get_preset("default", arms="constructed", depths="20"), tmp_path / "s")


def test_the_toys_tables_are_reused_whole_and_redone_when_changed(tmp_path, monkeypatch):
    from probe.study.interventions import runner

    cfg = get_preset("interventions", **{**TINY, "toy_seeds": 2})
    made = runner.toy(cfg, tmp_path, lambda event, info: None)
    ran = []
    real = runner.run_toy
    monkeypatch.setattr(runner, "run_toy", lambda tc: ran.append(tc) or real(tc))
    again = runner.toy(cfg, tmp_path, lambda event, info: None)
    assert not ran  # every table whole: reused
    pd.testing.assert_frame_equal(again["steps"], made["steps"], check_dtype=False)
    steps = tmp_path / "toy_steps.csv"
    steps.write_bytes(b"".join(steps.read_bytes().splitlines(keepends=True)[:-1]))  # a row lost
    redone = runner.toy(cfg, tmp_path, lambda event, info: None)
    assert len(ran) == 1 and len(redone["steps"]) == len(made["steps"])
    (tmp_path / "toy.json").write_bytes(b"\x00garbage\xff")  # a stamp that is not even text
    runner.toy(cfg, tmp_path, lambda event, info: None)
    assert len(ran) == 2
