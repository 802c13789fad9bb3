"""Temporary files of killed writers are removed by the next writer; a live writer's stay."""

import os
import subprocess
import sys
import threading

import pytest
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


def _interrupt_opening(monkeypatch, writer_module):
    def _interrupted(self, attrs):
        assert self.tmp.exists()  # the window: the temporary file exists, the writer does not
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.H5Writer, "_start_file", _interrupted)


def _interrupt_thread_start(monkeypatch, writer_module):
    class _Thread(threading.Thread):
        def start(self):
            super().start()
            if self.name == "resprobe-h5-writer":
                raise KeyboardInterrupt  # the signal lands in Thread.start's wait for the thread

    monkeypatch.setattr(writer_module.threading, "Thread", _Thread)


@pytest.mark.parametrize("interrupt", [_interrupt_opening, _interrupt_thread_start])
def test_an_interrupt_while_the_writer_starts_leaves_no_temporary(tmp_path, monkeypatch, interrupt):
    """SIGTERM becomes an exception at whatever line is running: here, between HDF5 creating
    the temporary file and the writer existing (windows the CLI's SIGTERM test hit under load)."""
    from probe.store import writer as writer_module

    interrupt(monkeypatch, writer_module)
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    with pytest.raises(KeyboardInterrupt):
        probe.capture(model, [torch.randn(2, 1, 8, 8)], probes=["residual"], out=tmp_path / "x.h5")
    assert list(tmp_path.iterdir()) == []
