"""Temporary files of killed writers are removed by the next writer; a live writer's stay."""

import os
import subprocess
import sys

import torch

import probe
from probe.train.checkpoint import atomic_write_text


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_capture_removes_temporaries_of_killed_captures_of_the_same_file(tmp_path):
    stale = tmp_path / f"x.h5.tmp-{_dead_pid()}"
    stale.write_bytes(b"half a capture")
    live = tmp_path / f"x.h5.tmp-{os.getppid()}"  # a process that still runs: maybe writing
    live.write_bytes(b"someone else's")
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    probe.capture(
        model, [torch.randn(2, 1, 8, 8)], probes=["residual"], out=tmp_path / "x.h5"
    ).close()
    assert not stale.exists() and live.exists() and (tmp_path / "x.h5").exists()


def test_json_writes_clean_up_after_killed_writers(tmp_path):
    stale = tmp_path / f"run.json.tmp-{_dead_pid()}"
    stale.write_text("{")
    atomic_write_text(tmp_path / "run.json", "{}")
    assert not stale.exists() and (tmp_path / "run.json").read_text() == "{}"
