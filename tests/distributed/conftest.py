import os
import subprocess
import sys

import pytest


@pytest.fixture
def torchrun(tmp_path):
    """``run(*args, nproc=2)``: ``torchrun --standalone --nproc-per-node nproc ARGS`` (the same
    interpreter), in ``tmp_path``, with the data root there and one thread per rank."""

    def run(*args, nproc=2, timeout=300):
        env = {**os.environ, "RESPROBE_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *map(str, args)]  # fmt: skip
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env
        )

    return run
