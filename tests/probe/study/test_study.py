"""A tiny study end to end: report, verdicts, resumption, and the report in a real browser."""

import json
import re
import shutil
import subprocess

import pytest

from probe.errors import ProbeError
from probe.study import get_preset, run_study

# One pytest-xdist worker runs this module, so its tiny study is made once.
pytestmark = pytest.mark.xdist_group("study")

TINY = dict(
    depths=(8, 14),
    seeds=(0,),
    recipe_overrides={"epochs": 2, "batch_size": 256},
    model_options={"width": 4},
    capture_limit=64,
    capture_at=("0", "last"),
    probes=(
        "residual",
        "channel",
        "grad",
        "activations:dtype=fp16,max_samples=32",
        "jacobian:n_probes=4,max_samples=8,top_k=1,iters=5",
        "shattered:n_points=16,max_lag=4,max_samples=2",
    ),
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return run_study(get_preset("default", **TINY), out)


def test_study_writes_report_summary_and_tables(study):
    assert study.report.exists() and study.summary.exists()
    for name in ("measures.csv", "degradation.csv", "runs.csv", "verdicts.json"):
        assert (study.out / "tables" / name).exists()
    assert set(study.degradation["family"]) == {"plain", "resnet"}
    assert len(json.loads((study.out / "tables" / "verdicts.json").read_text())) == 7


def test_every_verdict_states_a_rule_and_a_valid_outcome(study):
    for v in study.verdicts:
        assert v.rule and v.evidence
        assert v.verdict in {"supported", "not supported", "inconclusive", "present", "absent"}


def test_report_embeds_every_figure(study):
    page = study.report.read_text()
    n_png = len(list((study.out / "figures").glob("*.png")))
    assert page.count("data:image/png;base64,") >= n_png > 10
    assert "Degradation table" in page and "Provenance" in page


def test_a_rerun_reuses_what_is_whole_and_redoes_what_is_damaged(study):
    """A study run again into its directory reuses every checkpoint and every whole capture, and
    redoes what a kill or a full disk left behind: a removed report, a truncated capture, and
    lesion tables left empty or cut after their header (a kill while one was written, before
    atomic writes), a damaged figure. One rerun checks them all: each rerun analyses and plots the whole study."""
    import probe

    ckpt = next((study.out / "runs").glob("*/checkpoints/*.safetensors"))
    broken = next((study.out / "captures").glob("*-bn.h5"))
    whole = next(c for c in sorted((study.out / "captures").glob("*.h5")) if c != broken)
    stamps = ckpt.stat().st_mtime_ns, whole.stat().st_mtime_ns
    tables = sorted((study.out / "tables").glob("lesions-*.csv"))[:2]
    assert len(tables) == 2
    good = [t.read_text() for t in tables]
    for table, damage in zip(tables, (b"", b"model,seed\n")):
        table.write_bytes(damage)
    broken.write_bytes(b"truncated")
    (study.out / "report.html").unlink()
    figure = sorted((study.out / "figures").glob("final_*.png"))[0]
    figure.write_bytes(figure.read_bytes()[:1000])

    again = run_study(get_preset("default", **TINY), study.out)
    assert (ckpt.stat().st_mtime_ns, whole.stat().st_mtime_ns) == stamps
    assert again.report.exists()
    assert again.timings["train"] < study.timings["train"]
    probe.open(broken).close()
    assert [t.read_text() for t in tables] == good
    from PIL import Image

    with Image.open(figure) as im:  # drawn again, whole
        im.load()
    assert not list(study.out.rglob("*.tmp-*"))  # and the rerun left no temporary files


def test_bad_study_field_is_explained():
    with pytest.raises(ProbeError, match="integers"):
        get_preset("default", depths="eight")


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium is not installed")
def test_report_loads_every_figure_in_headless_chromium(study, tmp_path):
    res = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            study.report.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    total = re.search(r'data-images-total="(\d+)"', res.stdout)
    loaded = re.search(r'data-images-loaded="(\d+)"', res.stdout)
    assert total and loaded, res.stderr[-2000:]
    assert int(total.group(1)) > 10 and loaded.group(1) == total.group(1)


def test_a_second_study_into_the_same_directory_stops_at_once(tmp_path):
    """One writer per study directory: a second study (or ranks left running by a killed job)
    would mix its tables with the first one's."""
    from probe.study.runner import study_lock

    out = tmp_path / "study"
    out.mkdir()
    with study_lock(out), pytest.raises(ProbeError, match="Another study is writing to"):
        run_study(get_preset("default"), out)
    assert list(out.iterdir()) == [out / ".lock"]  # nothing written
