import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "scripts" / "ranks_job.py"


def _torchrun(cwd: Path, args, nproc: int = 2, timeout: float = 300):
    env = {**os.environ, "RESPROBE_DATA": str(cwd / "data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def torchrun(tmp_path):
    """``run(*args, nproc=2)``: ``torchrun --standalone --nproc-per-node nproc ARGS`` (the same
    interpreter), in ``tmp_path``, with the data root there and one thread per rank."""

    def run(*args, nproc=2, timeout=300):
        return _torchrun(tmp_path, args, nproc, timeout)

    return run


@pytest.fixture(scope="session")
def ranks_job(tmp_path_factory):
    """The folder where scripts/ranks_job.py ran once on two ranks (captures, a training run,
    each rank's record), and torchrun's result. One job for all tests that read it: torchrun
    and the ranks' imports cost more than the work."""
    out = tmp_path_factory.mktemp("ranks_job")
    res = _torchrun(out, [JOB, out])
    assert res.returncode == 0, res.stderr[-4000:]
    return out, res
