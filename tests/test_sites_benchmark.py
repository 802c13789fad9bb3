"""benchmarks/bench_sites.py: the adapter and tracer sessions read their blocks the way each is
named for, the methods run in turns, and the adapter registry is left as it was."""

import importlib
import sys
from pathlib import Path

import pytest

from probe.hooks import residual

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # benchmarks/ imports itself as a package from the repository root
    sys.path.insert(0, _ROOT)
sites = importlib.import_module("benchmarks.bench_sites")


@pytest.fixture(autouse=True)
def _allocator_untouched(monkeypatch):
    """The benchmark tunes glibc's allocator for the process, as the CLI does; not the test
    worker's."""
    import probe.runtime

    monkeypatch.setattr(probe.runtime, "tune_allocator", lambda: False)


def test_each_method_runs_once_a_round_in_a_rotating_order():
    order = []
    methods = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = sites.in_turns(methods, rounds=3, warmup=2)
    assert all(len(t) == 3 for t in times.values())
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 3 + 2 and all(sorted(r) == list("abc") for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # each method leads a round in turn


def test_the_tracer_reads_sites_and_the_adapter_its_modules(monkeypatch, capsys):
    made = []
    session = sites.probe.HookSession

    def recording(*args, **kwargs):
        made.append(session(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sites.probe, "HookSession", recording)
    monkeypatch.setattr(
        sys, "argv", ["bench_sites", "--batch", "2", "--depth", "8", "--rounds", "2"]
    )
    before = dict(residual._ADAPTERS)
    sites.main()
    assert before == residual._ADAPTERS
    adapter, tracer, tiny = made
    assert {i.kind for i in adapter.layers} == {"adapter"}
    assert {i.kind for i in tracer.layers} == {"site"} and len(tracer.layers) == 3
    assert sum(i.kind == "site" for i in tiny.layers) == 12
    out = capsys.readouterr().out
    assert "resnet8 batch 2: 3 sites" in out and "12 sites" in out
    assert out.count("(round by round, 95 %)") == 4
