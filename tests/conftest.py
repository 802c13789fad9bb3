import shutil
import subprocess

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_isolated_data_root(tmp_path, monkeypatch):
    """Seed torch, and point the default data root at a temporary folder so no test writes to ./data."""
    torch.manual_seed(0)
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    yield


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


STRACE = shutil.which("strace")


@pytest.fixture
def run_killed():
    """``run(cmd, calls, when=None)``: run ``cmd``; with ``when=N``, under strace so that the N-th
    of the system calls ``calls`` (comma-separated) kills the process with SIGKILL."""
    if STRACE is None:
        pytest.skip("needs strace")

    def run(cmd, calls, when=None):
        if when is not None:
            cmd = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
                   "-e", f"inject={calls}:signal=KILL:when={when}", *cmd]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    return run
