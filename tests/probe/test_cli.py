"""The CLI end to end on tiny settings, and its error paths (clean message, non-zero exit)."""

import h5py
import pytest
from click.testing import CliRunner

from probe.cli.main import cli

# One pytest-xdist worker runs this module, so its training run is made once.
pytestmark = pytest.mark.xdist_group("cli_run")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            "resnet8",
            "--epochs",
            "1",
            "--opt",
            "width=4",
            "--set",
            "batch_size=256",
            "--save-at",
            "0,last",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_train_reports_errors_and_checkpoints(run_dir):
    assert (run_dir / "checkpoints" / "epoch-0001.json").exists()
    assert (run_dir / "history.json").exists()


def test_capture_inspect_analyze(run_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c.h5"
    res = runner.invoke(
        cli,
        [
            "capture",
            str(run_dir),
            "--probe",
            "residual",
            "--probe",
            "grad",
            "--probe",
            "jacobian:n_probes=4,max_samples=8",
            "--limit",
            "64",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "captured 64 samples x 3 layers" in res.output
    res = runner.invoke(cli, ["inspect", str(out)])
    assert (
        res.exit_code == 0
        and "layers/stages.0.0  [block (residual)]" in res.output
        and "checkpoint_sha256" in res.output
        and "split_limit: 64" in res.output  # the loader was cut, so provenance must say so
    )
    bn = tmp_path / "bn.h5"
    assert (
        runner.invoke(
            cli,
            ["capture", str(run_dir), "--layers", "**bn*", "--probe", "channel", "--out", str(bn)],
        ).exit_code
        == 0
    )
    res = runner.invoke(cli, ["analyze", str(out), str(bn), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figs" / "identity_closeness.png").exists() and (
        tmp_path / "figs" / "lesions.png"
    ).exists()
    assert (tmp_path / "figs" / "fig7_response_std.png").exists()
    assert "skipped cka_matrix" in res.output

    # run again on the same captures: every figure is reused, none drawn again (the measures
    # table beside them is written anew)
    def figures():
        return {f: f.stat().st_mtime_ns for f in (tmp_path / "figs").glob("[!m]*")}

    drawn = figures()
    assert len(drawn) > 30 and not any(f.name == "measures.csv" for f in drawn)
    assert "earlier analysis" not in res.output
    earlier = tmp_path / "figs" / "cka_of_another_run.png"  # a figure these captures do not give
    earlier.write_bytes((tmp_path / "figs" / "lesions.png").read_bytes())
    res = runner.invoke(cli, ["analyze", str(out), str(bn), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert figures() == {**drawn, earlier: earlier.stat().st_mtime_ns}
    assert "1 figure of an earlier analysis" in res.output and "cka_of_another_run" in res.output


def test_inspect_rejects_incomplete_file(run_dir, tmp_path):
    out = tmp_path / "c.h5"
    assert (
        CliRunner()
        .invoke(cli, ["capture", str(run_dir), "--limit", "8", "--out", str(out)])
        .exit_code
        == 0
    )
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = False
    res = CliRunner().invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 1 and "incomplete" in res.output and "Traceback" not in res.output


def test_inspect_rejects_non_hdf5(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("not hdf5")
    res = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 1 and "not a readable HDF5 file" in res.output


def test_capture_with_bad_layer_pattern(run_dir, tmp_path):
    res = CliRunner().invoke(
        cli, ["capture", str(run_dir), "--layers", "stage.*", "--out", str(tmp_path / "c.h5")]
    )
    assert res.exit_code == 1 and "Did you mean 'stages.*'" in res.output
    assert not (tmp_path / "c.h5").exists()


def test_models_lists_names_by_depth_including_the_small_ones():
    res = CliRunner().invoke(cli, ["models", "plain1*"])
    assert res.output.split() == ["plain14", "plain110", "plain1202"]
    res = CliRunner().invoke(cli, ["models", "resnet*"])
    assert res.output.split()[:4] == ["resnet8", "resnet14", "resnet20", "resnet26"]


def test_models_with_a_pattern_that_matches_nothing_fails():
    res = CliRunner().invoke(cli, ["models", "vgg*"])
    assert res.exit_code == 1 and "No model matches 'vgg*'" in res.output
    assert "--model torchvision:NAME" in res.output  # where a torchvision user goes instead


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "probe", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "study" in res.stdout


def test_capture_help_lists_every_registered_probe():
    from probe.probes.registry import PROBES, make_probe

    make_probe("jacobian")  # loads the probes that register on import
    make_probe("param_grads")
    text = " ".join(CliRunner().invoke(cli, ["capture", "--help"]).output.split())
    assert all(name in text for name in PROBES), sorted(PROBES)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--model", "resnet21"], "6n+2"),
        (["train", "--model", "resnt20"], "Did you mean 'resnet20'"),
        (["train", "--recipe", "fats"], "Did you mean 'fast'"),
        (["train", "--data", "cifar11"], "Did you mean 'cifar10'"),
        (["train", "--opt", "shortcutt=B"], "Did you mean 'shortcut'"),
        (["study", "--preset", "he2017"], "Did you mean 'he2016'"),
        (["study", "--set", "depth=8"], "Did you mean 'depths'"),
        (["capture", "{run}", "--batch-size", "0"], "'--batch-size': 0 is not in the range"),
        (["capture", "{run}", "--batch-size", "-5"], "'--batch-size': -5 is not in the range"),
        (["capture", "{run}", "--limit", "-1"], "'--limit': -1 is not in the range"),
        (
            ["capture", "{run}", "--probe", "jacobian:n_probes=abc"],
            "JacobianNorms.n_probes = 'abc'",
        ),
        (["capture", "{run}", "--probe", "jacobian:n_probes=0"], "greater than 0"),
        (["capture", "{run}", "--probe", "shattered:direction=sideways"], "allowed: random, next"),
        (["train", "--set", "lr=abc"], "Recipe.lr = 'abc'"),
        (["train", "--set", "batch_size=-1"], "Recipe.batch_size = -1"),
        (["train", "--epochs", "-1"], "'--epochs': -1 is not in the range x>=0"),
        (["train", "--data", "{notes}"], "neither a folder nor a tar archive"),
        (["--threads", "0", "train"], "Invalid thread count '0'"),
        (["train", "--device", "="], "Invalid device '='"),
        (["train", "--device", "mps"], "'mps' is not available"),
        (["train", "--seed", str(2**70)], "'--seed'"),
        (["train", "--opt", "width=2.5"], "NetConfig.width = 2.5"),
        (["capture", "{bad_json}"], "holds a JSON list"),
    ],
)
def test_bad_input_gives_a_clean_error_and_nonzero_exit_before_any_work(
    run_dir, tmp_path, args, fragment
):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a dataset")
    out = tmp_path / "out.h5"
    bad_json = tmp_path / "ck.json"
    bad_json.write_text("[]")
    args = [a.format(run=run_dir, notes=notes, bad_json=bad_json) for a in args]
    if args[0] == "capture":
        args += ["--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0, res.output
    assert fragment in res.output and "Traceback" not in res.output, res.output
    assert not out.exists()


def test_sigterm_stops_a_capture_cleanly(tmp_path):
    """A batch scheduler's (or torchrun's) SIGTERM unwinds: one line, exit 1, no output file and
    no temporary file left."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "x.h5"
    cmd = [sys.executable, "-m", "probe", "--threads", "1", "capture", "--model", "zoo:resnet8",
           "--model-arg", "in_channels=1", "--model-arg", "width=4", "--data", "digits",
           "--split", "train", "--batch-size", "8", "--probe", "residual", "--probe",
           "activations", "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while job.poll() is None and not list(tmp_path.glob("x.h5.tmp-*")):
        assert time.monotonic() - t0 < 60, "the capture never started writing"
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1, err
    assert "stopped by SIGTERM (partial files were removed)" in err
    assert "Traceback" not in err
    # nothing of the capture's is left; the data root (conftest) keeps the digits split
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_sigterm_that_surfaces_as_another_error_is_still_reported_as_sigterm(tmp_path, monkeypatch):
    """The signal's exception is raised at whatever line runs; inside an h5py type-conversion
    callback it comes out as a TypeError. The user is told about the signal, not the side effect."""
    import os
    import signal
    import time

    import probe

    def _open_interrupted(path, **kw):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except BaseException as e:
            raise TypeError("Operation not defined for data type class") from e

    monkeypatch.setattr(probe, "open", _open_interrupted)
    (tmp_path / "x.h5").write_bytes(b"")
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "x.h5")])
    assert res.exit_code == 1
    assert "stopped by SIGTERM" in res.output and "TypeError" not in res.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.mark.parametrize("damage", ["", "[{", '{"epoch": 0}', '[{"epoch": 3}]'])
def test_analyze_leaves_out_the_curves_of_a_damaged_history_and_draws_the_rest(
    run_dir, tmp_path, damage, caplog
):
    import logging
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    runner = CliRunner()
    cap = tmp_path / "c.h5"
    res = runner.invoke(cli, ["capture", str(run), "--limit", "16", "--out", str(cap)])
    assert res.exit_code == 0, res.output
    figs = tmp_path / "figs"
    args = ["analyze", str(cap), "--no-lesions", "--out", str(figs)]
    (run / "history.json").write_text(damage)
    with caplog.at_level(logging.WARNING, logger="analyses"):
        res = runner.invoke(cli, args)
    assert res.exit_code == 0 and "unexpected" not in res.output, res.output
    (said,) = [r.getMessage() for r in caplog.records if r.name == "analyses.pipeline"]
    assert said.startswith(f"leaving out the training curves of {run}: ")
    assert "history.json is missing or damaged" in said
    assert "skipped training_curves" in res.output
    assert (figs / "identity_closeness.png").exists()
    assert not list(figs.glob("training_*"))
