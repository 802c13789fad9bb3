"""A full disk: the capture fails at the first batch that does not fit, with one clear error,
and leaves nothing behind (it used to run to the end and then crash the process)."""

import shutil
import subprocess

import pytest
import torch

import probe
from probe.errors import ProbeError


@pytest.fixture
def tiny_disk(tmp_path):
    where = tmp_path / "full"
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_capture_onto_a_full_disk_fails_early_and_leaves_nothing(tiny_disk):
    model = probe.zoo.create("resnet8", in_channels=1, width=8).eval()
    seen = []

    def batches():
        for i in range(50):  # ~0.8 MB of fp32 activations per batch of 64: the disk holds one
            seen.append(i)
            yield torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    with pytest.raises(ProbeError, match="No space left"):
        probe.capture(
            model, batches(), probes=[probe.Activations(dtype="fp32")], out=tiny_disk / "x.h5"
        )
    assert len(seen) < 10, f"{len(seen)} batches ran before the error"
    assert list(tiny_disk.iterdir()) == []


def test_a_failed_background_flush_fails_the_capture_and_leaves_nothing(tmp_path, monkeypatch):
    """The periodic fdatasync runs on its own thread; an I/O error there (EIO on a dying disk)
    fails the capture with that error instead of being lost with the thread."""
    import errno

    from probe.store import writer

    def failing_sync(path, *, data_only=False):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer, "_SYNC_BYTES", 1)  # a flush after every batch
    monkeypatch.setattr(writer, "sync", failing_sync)
    model = probe.zoo.create("resnet8", in_channels=1, width=8).eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    out = tmp_path / "x.h5"
    with pytest.raises(ProbeError, match="Input/output error"):
        probe.capture(model, batches, probes=[probe.Activations(dtype="fp32")], out=out)
    assert list(tmp_path.iterdir()) == []
