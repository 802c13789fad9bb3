"""Kill a capture at its file writes, fsyncs and renames (strace system-call injection): a killed
capture never leaves a file at its output path, and a rerun writes the uninterrupted result and
removes the killed run's temporary file."""

import sys

import numpy as np
import pytest

import probe

CALLS = "pwrite64,write,fsync,rename,renameat,renameat2"
CAPTURE = [
    sys.executable, "-m", "probe", "--threads", "1", "capture", "--model", "zoo:resnet8",
    "--model-arg", "in_channels=1", "--model-arg", "width=4", "--data", "digits",
    "--limit", "400", "--batch-size", "50", "--probe", "residual", "--probe", "activations",
]  # fmt: skip


def _contents(path):
    with probe.open(path) as cap:
        return {
            (layer, q): cap.read(layer, q) for layer in cap.layers for q in cap.quantities(layer)
        } | {("", "sample_index"): cap.sample_index()}


@pytest.mark.slow
def test_a_killed_capture_leaves_nothing_and_a_rerun_is_the_uninterrupted_result(
    tmp_path, run_killed
):
    def _capture(out, inject_at=None):
        return run_killed(CAPTURE + ["--out", str(out)], CALLS, inject_at)

    ref = tmp_path / "ref.h5"
    assert _capture(ref).returncode == 0
    want = _contents(ref)
    killed = 0
    points = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987]
    for n in points:
        out = tmp_path / f"kill{n}.h5"
        first = _capture(out, inject_at=n)
        if first.returncode == 0:
            break  # fewer than n such calls: every point has been tried
        killed += 1
        assert not out.exists(), f"kill at call {n} left a file at the output path"
        again = _capture(out)
        assert again.returncode == 0, f"kill at call {n}: rerun failed\n{again.stderr[-2000:]}"
        got = _contents(out)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), f"kill at call {n}"
        assert not list(tmp_path.glob(f"kill{n}.h5.tmp-*")), f"kill at {n} left a temporary file"
    assert killed >= 8, f"only {killed} injection points"
    print(f"{killed} injection points: none left a file, every rerun equalled the reference")
