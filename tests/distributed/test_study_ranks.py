"""A study over two ranks (torchrun, gloo, CPU): its units -- runs, captures, lesion tables --
spread over the ranks, rank 0 reports; the tables and verdicts are those of one process, and an
interrupted study resumes under another number of ranks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from probe.study import get_preset, run_study
from probe.study.distributed import assign

TINY = {
    "depths": "8",
    "seeds": "0",
    "recipe_overrides": {"epochs": 1},
    "capture_at": "0,last",
    "capture_limit": 32,
    "lesion_limit": 32,
    "probes": "residual,grad",
}
TIMING = ("wall_s", "seconds", "eval_seconds")  # wall-clock columns differ from run to run


def _sets(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    return out


def _one_process(out: Path, overrides: dict) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the numbers depend on the thread count
    try:
        run_study(get_preset("default", **overrides), out)
    finally:
        torch.set_num_threads(threads)


def _same_tables(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "tables").iterdir())
    assert names == sorted(p.name for p in (b / "tables").iterdir())
    for name in names:
        if name.endswith(".csv"):
            x, y = pd.read_csv(a / "tables" / name), pd.read_csv(b / "tables" / name)
            drop = [c for c in x.columns if c in TIMING]
            pd.testing.assert_frame_equal(
                x.drop(columns=drop), y.drop(columns=drop), check_exact=True
            )
        else:
            assert (a / "tables" / name).read_text() == (b / "tables" / name).read_text(), name


def test_units_go_longest_first_to_the_least_loaded_rank():
    costs = [5.0, 1.0, 4.0, 2.0, 3.0, 3.0]
    owners = assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [9.0, 9.0]
    assert assign(costs, 1) == [0] * 6
    assert sorted(set(assign([1.0] * 7, 3))) == [0, 1, 2]


@pytest.mark.slow
def test_a_two_rank_study_has_the_tables_and_verdicts_of_one_process(tmp_path, torchrun):
    res = torchrun("-m", "probe", "--threads", "1", "study", *_sets(TINY), "--out", "two")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("verdicts:") == 1  # rank 0 reports
    assert "[rank 1/2]" in res.stderr  # rank 1 worked (and said on what)
    _one_process(tmp_path / "one", TINY)
    _same_tables(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "report.html").is_file()


def _killed_after(cmd, tmp_path, ready, kill_job) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESPROBE_DATA": str(tmp_path / "data")}
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    t0 = time.monotonic()
    while job.poll() is None and not ready() and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    kill_job(job)


@pytest.mark.slow
def test_an_interrupted_two_rank_study_with_arms_resumes_in_one_process(
    tmp_path, torchrun, kill_job
):
    """Two ranks start a study with intervention arms and are killed once its first captures
    exist; one process finishes it; tables and verdicts equal those of one uninterrupted
    process. Then three ranks rerun it and find nothing left to do."""
    grid = {**TINY, "depths": "8,14", "recipe_overrides": {"epochs": 2}}
    grid |= {"arms": "constructed,shortcut_scale", "lambdas": "0,1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "probe", "--threads", "1", "study", *_sets(grid), "--out", "cut"]  # fmt: skip
    captures = tmp_path / "cut" / "captures"
    _killed_after(cmd, tmp_path, lambda: len(list(captures.glob("*.h5"))) >= 2, kill_job)
    assert not (tmp_path / "cut" / "report.html").exists(), "the study finished before the kill"
    _one_process(tmp_path / "cut", grid)
    _one_process(tmp_path / "one", grid)
    _same_tables(tmp_path / "one", tmp_path / "cut")
    res = torchrun("-m", "probe", "--threads", "1", "study", *_sets(grid), "--out", "cut", nproc=3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "units on rank" not in res.stderr  # every unit was done
    _same_tables(tmp_path / "one", tmp_path / "cut")
