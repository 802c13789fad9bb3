"""benchmarks/bench_statistics_parts.py: the parts that replace resprobe's functions for a
measurement put them back, and the variant that skips the kernels' arithmetic writes only what
the kernels would have written."""

import functools
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.probes import onepass

# benchmarks/ is not an installed package and imports itself as one (`python -m benchmarks.…`
# from the repository root): its root on the path, as that command has it
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
parts = importlib.import_module("benchmarks.bench_statistics_parts")


@pytest.fixture(autouse=True)
def _allocator_untouched(monkeypatch):
    """The parts tune glibc's allocator for the process, as the CLI does; not the test worker's."""
    import probe.runtime

    monkeypatch.setattr(probe.runtime, "tune_allocator", lambda: False)


def _settings():
    return onepass.block_sums, onepass.TEAM_VALUES, onepass.MIN_VALUES


def test_the_kernel_time_part_puts_the_kernels_and_their_thresholds_back(capsys):
    before = _settings()
    parts.kernel_time(rounds=2, batch=2, places=list(parts.PLACES))
    assert _settings() == before
    out = capsys.readouterr().out
    assert "batch 2" in out and out.count("\n") >= 4


def test_the_kernel_time_part_puts_them_back_when_a_pass_fails(monkeypatch):
    before = _settings()
    monkeypatch.setattr(parts.probe.HookSession, "run_batch", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        parts.kernel_time(rounds=2, batch=2, places=["pool"])
    assert _settings() == before


def test_skipping_the_kernel_zeroes_its_outputs_and_leaves_the_models_tensors_alone():
    y = torch.ones(2, 3, 4)
    view = y.numpy()  # what the wrapper hands a kernel: a view of the model's tensor
    moments, part, sample = np.ones((4, 2, 3)), np.ones((6, 6)), np.ones((6, 2))
    finish = functools.partial(lambda p, s: None, part, sample)
    assert parts._kernel_skipped(None, (view, view, view, 1.0, moments, part), 6, 72, finish)
    assert (y == 1).all()
    assert not moments.any() and not part.any() and not sample.any()
