"""benchmarks/bench_train.py: modes run in turns whose order rotates, each against the first."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # benchmarks/ imports itself as a package, as `python -m` runs it
    sys.path.insert(0, _ROOT)
bench = importlib.import_module("benchmarks.bench_train")


def _args(repeats: int) -> argparse.Namespace:
    return argparse.Namespace(repeats=repeats, seed=0)


def test_modes_run_in_turns_whose_order_rotates(monkeypatch, capsys):
    ran = []
    # seconds per epoch by mode: the first epoch is left out of the steady median
    secs = {"eager": [9.0, 2.0, 2.0], "minimal": [9.0, 1.0, 3.0], "graph": [9.0, 4.0, 4.0]}
    monkeypatch.setattr(
        bench, "run_mode", lambda args, data, mode: ran.append(mode) or (secs[mode], "", "ok")
    )
    steady = bench.steady_in_turns(_args(3), None, ["eager", "minimal", "graph"])
    assert ran == [
        *["eager", "minimal", "graph"],
        *["minimal", "graph", "eager"],
        *["graph", "eager", "minimal"],
    ]
    assert steady == {"eager": [2.0] * 3, "minimal": [2.0] * 3, "graph": [4.0] * 3}
    out = capsys.readouterr().out
    assert out.count("repeat 3: ") == 3


def test_one_run_gives_each_mode_against_the_first(monkeypatch, capsys):
    secs = {"eager": [5.0, 2.0], "minimal": [5.0, 1.0]}
    monkeypatch.setattr(bench, "run_mode", lambda args, data, mode: (secs[mode], "", "ok"))
    bench.steady_in_turns(_args(1), None, ["eager", "minimal"])
    out = capsys.readouterr().out
    assert "0.50x eager" in out and "repeat" not in out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--modes", "eager,eager"], "each mode once"),
        (["--modes", "fast"], "unknown mode"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(monkeypatch, capsys, argv, says):
    monkeypatch.setattr(sys, "argv", ["bench_train", *argv])
    monkeypatch.setattr(bench, "steady_in_turns", lambda *a: pytest.fail("ran"))
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
