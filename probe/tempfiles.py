"""Temporary names for atomic writes, and removal of the ones a killed process left behind.

Every file is written as ``<name>.tmp-<pid>`` and renamed into place when complete. A process
killed before the rename leaves its temporary file; the next writer of the same file removes
those whose process is gone (a live pid may be another writer at work, so its file stays).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "x.h5.tmp-999999999").write_text("left by a killed run")
    20
    >>> remove_stale_temps(d / "x.h5"), list(d.iterdir())
    (1, [])
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["temp_path", "remove_stale_temps", "sync", "commit", "atomic_path"]


def temp_path(path: Path) -> Path:
    """``<path>.tmp-<this pid>``, beside ``path`` (same file system, so the rename is atomic)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier, failed attempt in this process (or a reused pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: Path) -> int:
    """Delete ``<path>.tmp-<pid>`` files of processes that no longer run; returns how many."""
    removed = 0
    if not path.parent.is_dir():
        return 0
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def sync(path: Path, *, data_only: bool = False) -> None:
    """Wait until what was written to ``path`` is on the disk (fsync; ``data_only``: fdatasync,
    which skips metadata such as the modification time, where the system has it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (getattr(os, "fdatasync", os.fsync) if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Make the finished ``tmp`` durable (fsync) and rename it over ``path`` in one step."""
    sync(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path to write ``path``'s content to; on success it is fsynced and renamed
    over ``path``, on any error deleted -- so ``path`` is either its old self or complete, never
    half written (a killed study once left an empty table that every rerun trusted).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("a,b\\n1,2\\n")
        >>> target.read_text().splitlines()[0]
        'a,b'
    """
    path = Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
