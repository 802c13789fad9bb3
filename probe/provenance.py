"""Provenance recorded with every checkpoint, capture and report: versions, revision, command."""

from __future__ import annotations

import functools
import subprocess
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["library_versions", "code_revision", "command_line", "FORMULA_KEYS"]

# The runtime settings that say which formulas took the statistics, per device (a capture's
# provenance, probe.runtime.statistics_formulas; a join of shards names each rank's where they
# differ, probe.store.shards). Here, not in probe.runtime, which loads torch: joining shards
# loads none.
FORMULA_KEYS = ("cpu_statistics", "cuda_statistics")

_PACKAGES = ("resprobe", "torch", "numpy", "h5py", "safetensors", "scipy", "einops", "numba")


def library_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (looked up once per process: the
    modules already imported are what produced the result)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@functools.cache
def code_revision() -> str:
    """The git revision of the source tree this package runs from ('+dirty' if modified).

    Asked once per process (two git subprocesses cost ~10 ms, paid by every capture call before):
    the code this process runs was loaded when it started, so a later edit of the tree does not
    change what produced its results."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    return " ".join(sys.argv)
