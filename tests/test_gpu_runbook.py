"""benchmarks/gpu_runbook.sh: its one-call ``targets`` step runs every command it names (at toy
sizes on the CPU, ``RUNBOOK_SMOKE=1``), and a command that fails or hangs is reported without
stopping the ones after it, so that a short GPU lease is never spent on a broken script."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "benchmarks" / "gpu_runbook.sh"
TARGETS = ["kernel-tests", "breakdown", "hooks", "train", "jacobian"]


def _run(step, tmp_path, **env):
    return subprocess.run(
        ["bash", str(RUNBOOK), step],
        cwd=ROOT,
        env={**os.environ, "RUNBOOK_SMOKE": "1", "RUNBOOK_OUT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ran(stdout):
    """{command name: its exit status} as the runbook reports them."""
    return {m[0]: int(m[1]) for m in re.findall(r"^### (\S+): rc (\d+) in", stdout, re.M)}


def _fake_python(tmp_path, body):
    """A ``python3`` first on PATH that runs ``body`` (a shell script's text) instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f"#!/usr/bin/env bash\n{body}\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.slow
def test_every_command_of_the_targets_step_runs(tmp_path):
    env = _fake_python(tmp_path, f'exec "{sys.executable}" "$@"')  # this interpreter
    done = _run("targets", tmp_path, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _ran(done.stdout) == dict.fromkeys(TARGETS, 0)
    assert "s/epoch" in done.stdout and "ms/sample" in done.stdout


def test_a_failing_command_is_reported_and_the_others_still_run(tmp_path):
    env = _fake_python(
        tmp_path,
        # no CUDA device; bench_breakdown fails; every other command succeeds at once
        'case "$*" in *"print(int("*) echo 0 ;; *bench_breakdown*) exit 3 ;; *) exit 0 ;; esac',
    )
    done = _run("targets", tmp_path, **env)
    assert done.returncode == 1
    assert _ran(done.stdout) == {**dict.fromkeys(TARGETS, 0), "breakdown": 3}
    assert "### failed: breakdown" in done.stderr


def test_a_command_that_hangs_is_stopped_at_its_limit(tmp_path):
    env = _fake_python(
        tmp_path,
        'case "$*" in *"print(int("*) echo 0 ;; *bench_jacobian*) sleep 600 ;; *) exit 0 ;; esac',
    )
    script = RUNBOOK.read_text()
    # the same runbook with the Jacobian's limit cut to a second
    fast = tmp_path / "runbook.sh"
    fast.write_text(re.sub(r"timed jacobian \d+", "timed jacobian 1", script))
    done = subprocess.run(
        ["bash", str(fast), "targets"],
        cwd=ROOT,
        env={**os.environ, "RUNBOOK_SMOKE": "1", "RUNBOOK_OUT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert _ran(done.stdout)["jacobian"] == 124  # timeout's status for a command it stopped
    assert "### failed: jacobian" in done.stderr


def test_an_unknown_step_is_refused_with_the_steps_there_are(tmp_path):
    done = _run("everything", tmp_path)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "targets|" in done.stderr


def test_the_targets_step_fits_one_ten_minute_command():
    """A device command may run 10 minutes: the limits of the step's commands leave a minute for
    the interpreter starts and the machine's own reporting."""
    script = RUNBOOK.read_text()
    step = script[script.index("  targets)") : script.index("verdict ;;")]
    limits = dict(re.findall(r"timed (\S+) (\d+)", step))
    assert set(limits) == {"data", *TARGETS}
    assert sum(map(int, limits.values())) <= 540


@pytest.mark.parametrize("archive", [True, False])
def test_the_full_sized_step_on_a_cuda_machine_with_and_without_the_archive(tmp_path, archive):
    """What each command is given on a CUDA machine: the data decoded first and the trainer on
    it where the archive was carried; synthetic images, said so, where it was not."""
    calls = tmp_path / "calls"
    env = _fake_python(
        tmp_path,
        f'echo "$*" >> "{calls}"\n'
        'case "$*" in *"print(int("*) echo 1 ;; *) exit 0 ;; esac',  # a CUDA device
    )
    path = tmp_path / "cifar10.tar.gz"
    if archive:
        path.write_bytes(b"")
    done = _run("targets", tmp_path, RUNBOOK_SMOKE="0", CIFAR_ARCHIVE=str(path), **env)
    assert done.returncode == 0, done.stderr
    ran = calls.read_text().splitlines()
    train = next(c for c in ran if "bench_train" in c)
    assert train.endswith("--epochs 3 --modes eager,graph")
    assert ("load_dataset" in " ".join(ran)) is archive
    assert (f"--data {path}" in train) is archive
    assert ("no " + str(path) in done.stderr) is not archive
    assert _ran(done.stdout) == {**dict.fromkeys(TARGETS, 0), **({"data": 0} if archive else {})}
    assert any("bench_hooks --samples 4096" in c for c in ran)
