"""benchmarks/bench_statistics_parts.py: the parts that replace resprobe's functions for a
measurement put them back, and the variant that skips the kernels' arithmetic writes only what
the kernels would have written."""

import importlib
import sys
from pathlib import Path

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


def test_skipping_the_kernel_zeroes_its_outputs_and_leaves_the_models_tensors_alone(monkeypatch):
    launched = []
    monkeypatch.setattr(
        onepass, "_launch", lambda *a: launched.append(a[4]) or parts._kernel_skipped(*a)
    )
    f, s, y = torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)
    found = onepass.block_sums(f, s, y, 1)
    if found is None:
        pytest.skip("the one-pass kernels do not serve this process")
    assert launched and all(not a.any() for a in launched[0])
    assert all(not t.any() for t in (*found[0], *found[1]))
    assert (f == 1).all() and (s == 1).all() and (y == 2).all()


def test_the_y_alone_variant_reads_y_for_f_and_s_and_is_put_back():
    from probe.probes import statistics as st

    stubs = parts.VARIANTS["kernel reads y alone"][1]
    f, s = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    y = torch.arange(24.0).view(2, 3, 4)
    with parts._stubbed(stubs):
        found = st._onepass_block(f, s, y, 1)
    assert onepass.block_sums is parts._BLOCK_SUMS
    if found is None:
        pytest.skip("the one-pass kernels do not serve this process")
    block, channel = found
    norm_y = y.flatten(1).norm(dim=1)
    # F and S read as y: their norms are y's, y - S is zero, cos(F, S) = 1
    torch.testing.assert_close(block["f_norm"], norm_y)
    torch.testing.assert_close(block["s_norm"], norm_y)
    assert not block["dev_norm"].any()
    torch.testing.assert_close(block["cos_fs"], torch.ones(2))
    torch.testing.assert_close(channel["f_channel_mean"], y.mean(2))


def test_the_pass_variants_run_with_the_allocator_the_cli_tunes(monkeypatch, capsys):
    import probe.runtime

    tuned = []
    monkeypatch.setattr(probe.runtime, "tune_allocator", lambda: tuned.append(1) or False)
    parts.inside_the_pass(rounds=2, batch=2, only=["hooks, no arithmetic"])
    assert tuned
    assert "hooks, no arithmetic" in capsys.readouterr().out


def test_the_one_result_variant_merges_each_probes_first_result_and_is_put_back(capsys):
    stubs = parts.VARIANTS["kernel skipped, one result a probe"][1]
    parts.inside_the_pass(rounds=2, batch=2, only=["kernel skipped, one result a probe"])
    assert parts.probe.HookSession._merge is parts._MERGE
    assert onepass._launch is not parts._kernel_skipped
    assert dict(stubs)["HookSession._merge"] is parts._first_result_merged
    assert "one result a probe" in capsys.readouterr().out


def test_merging_the_first_result_alone_hands_on_one_quantity_a_probe(monkeypatch):
    seen = []
    monkeypatch.setattr(parts, "_MERGE", lambda self, results, new, *a: seen.append((new, a)))
    new = {"a": torch.ones(2), "b": torch.zeros(2)}
    parts._first_result_merged("session", {}, new, "probe", "key", 2)
    assert [list(n) for n, _ in seen] == [["a"]] and seen[0][1] == ("probe", "key", 2)


@pytest.mark.parametrize("skip_kernel", [True, False])
def test_the_cold_call_part_times_both_calls_and_puts_the_probe_back(capsys, skip_kernel):
    before = parts.probe.ResidualNorms.forward, onepass._launch
    parts.cold_calls(rounds=2, batch=2, skip_kernel=skip_kernel)
    assert (parts.probe.ResidualNorms.forward, onepass._launch) == before
    out = capsys.readouterr().out
    assert "in the pass" in out and "right after" in out


def test_the_cold_call_part_puts_them_back_when_a_pass_fails(monkeypatch):
    before = parts.probe.ResidualNorms.forward, onepass._launch
    monkeypatch.setattr(parts.probe.HookSession, "run_batch", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        parts.cold_calls(rounds=2, batch=2, skip_kernel=True)
    assert (parts.probe.ResidualNorms.forward, onepass._launch) == before


def _helpers():
    return {
        name: getattr(onepass, name) for name in [*parts.STEPS, "block_sums"] if name != "team"
    } | {"team": onepass._Team.run}


def test_the_steps_part_times_every_step_and_puts_the_helpers_back(capsys):
    before = _helpers()
    parts.kernel_steps(rounds=2, batch=2)
    assert _helpers() == before
    out = capsys.readouterr().out
    if not onepass.available():
        assert "nothing to time" in out
        return
    for label in [*parts.STEPS.values(), "the whole call", "hot, the arithmetic skipped"]:
        assert label in out


def test_the_steps_part_puts_the_helpers_back_when_a_pass_fails(monkeypatch):
    before = _helpers()
    monkeypatch.setattr(parts.probe.HookSession, "run_batch", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        parts.kernel_steps(rounds=2, batch=2)
    assert _helpers() == before
