"""Kill a training run at every rename it makes (strace system-call injection), rerun it until it
finishes, and require the result of an uninterrupted run: no point exists where a kill leaves a
run that cannot be resumed or that resumes to different numbers."""

import json
import sys

import pytest
from safetensors.torch import load_file

RENAMES = "rename,renameat,renameat2"
TRAIN = [
    sys.executable, "-m", "probe", "--threads", "1", "--deterministic", "train",
    "-m", "plain8", "--epochs", "2", "--set", "batch_size=512",
]  # fmt: skip


def _result(run):
    weights = load_file(str(run / "checkpoints" / "epoch-0002.safetensors"))
    history = json.loads((run / "history.json").read_text())
    return weights, [(r["epoch"], r.get("train_error")) for r in history]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~25 training runs under strace: 355 s here, past the default 300
def test_a_kill_at_any_rename_leaves_a_run_that_resumes_to_the_same_result(tmp_path, run_killed):
    def _train(out, inject_at=None):
        return run_killed(TRAIN + ["--out", str(out)], RENAMES, inject_at)

    ref = tmp_path / "ref"
    assert _train(ref).returncode == 0
    ref_weights, ref_history = _result(ref)
    killed = 0
    for n in range(1, 60):
        run = tmp_path / f"kill{n}"
        first = _train(run, inject_at=n)
        if first.returncode == 0:
            break  # the run makes fewer than n renames: every point has been tried
        killed += 1
        for _ in range(3):  # resume until it finishes
            again = _train(run)
            if again.returncode == 0:
                break
        assert again.returncode == 0, f"kill at rename {n}: resume failed\n{again.stderr[-2000:]}"
        weights, history = _result(run)
        assert history == ref_history, f"kill at rename {n}"
        assert weights.keys() == ref_weights.keys()
        assert all((weights[k] == ref_weights[k]).all() for k in weights), f"kill at rename {n}"
        assert not list(run.rglob("*.tmp-*")), f"kill at rename {n} left temporary files"
    assert killed >= 10, f"only {killed} injection points"
    print(f"{killed} injection points, all resumed to the uninterrupted result")
