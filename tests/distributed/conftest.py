import contextlib
import os
import signal
import subprocess
import sys
import time
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


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                out.append(int(entry.name))
    return out


@pytest.fixture
def kill_job():
    """``kill(job)``: SIGKILL a torchrun job started with ``start_new_session=True`` -- the
    launcher and its workers, which torchrun starts in sessions of their own (killing the
    launcher's process group alone leaves them running, writing beside whatever runs next) --
    and wait until every one of them is gone."""

    def kill(job: subprocess.Popen) -> None:
        pids = [job.pid, *_children(job.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in pids[1:]):
            assert time.monotonic() < deadline, "a killed rank is still running"
            time.sleep(0.05)

    return kill
