"""A figure is drawn again exactly when what it shows could have changed: reused when its inputs,
code and settings are those stamped into its files, drawn anew after any change to them and
after any damage to its PNG, SVG or CSV."""

import matplotlib
import pandas as pd
import pytest

from analyses import figure_reuse
from analyses.figure_reuse import figure_key, render
from analyses.figures import plot_vs_depth

matplotlib.use("Agg")


def _runs(error: float = 0.2) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "quantity": "train_error",
            "depth": [8, 14, 8, 14],
            "value": [0.1, error, 0.1, 0.05],
            "residual": [False, False, True, True],
            "seed": 0,
        }
    )


class Counting:
    """plot_vs_depth, counting its calls (one per figure drawn)."""

    def __init__(self) -> None:
        self.calls = 0
        self.__module__, self.__qualname__ = plot_vs_depth.__module__, plot_vs_depth.__qualname__

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return plot_vs_depth(*args, **kwargs)


@pytest.fixture
def plot():
    return Counting()


def _draw(out, plot, d):
    return render(out, "err", plot, d, "train_error", "error", data=d)


def _stamps(paths):
    return [p.stat().st_mtime_ns for p in paths]


def test_an_unchanged_figure_is_reused_without_drawing(tmp_path, plot):
    first = _draw(tmp_path, plot, _runs())
    assert [p.suffix for p in first] == [".png", ".svg", ".csv"] and plot.calls == 1
    stamps = _stamps(first)
    assert _draw(tmp_path, plot, _runs()) == first
    assert plot.calls == 1 and _stamps(first) == stamps


def test_changed_numbers_or_settings_draw_it_again(tmp_path, plot):
    _draw(tmp_path, plot, _runs())
    _draw(tmp_path, plot, _runs(error=0.3))  # one value differs
    assert plot.calls == 2
    assert "0.3" in (tmp_path / "err.csv").read_text()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # a setting theme() leaves alone
        _draw(tmp_path, plot, _runs(error=0.3))
    assert plot.calls == 3
    _draw(tmp_path, plot, _runs(error=0.3).astype({"depth": float}))  # same values, other dtype
    assert plot.calls == 4


def test_changed_plotting_code_draws_it_again(tmp_path, plot, monkeypatch):
    _draw(tmp_path, plot, _runs())
    monkeypatch.setattr(figure_reuse, "_code_digest", lambda: "another version")
    _draw(tmp_path, plot, _runs())
    assert plot.calls == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "err.png").write_bytes((d / "err.png").read_bytes()[:2000]),  # truncated
        lambda d: (d / "err.png").unlink(),
        lambda d: (d / "err.svg").write_text("<svg/>"),  # rewritten without the stamp
        lambda d: (d / "err.csv").write_text("quantity,depth\n"),  # another table beside it
        lambda d: (d / "err.csv").unlink(),
    ],
    ids=["truncated png", "missing png", "svg of another run", "edited csv", "missing csv"],
)
def test_a_damaged_file_draws_the_figure_again(tmp_path, plot, damage):
    first = _draw(tmp_path, plot, _runs())
    whole = [p.read_bytes() for p in first]
    damage(tmp_path)
    again = _draw(tmp_path, plot, _runs())
    assert plot.calls == 2 and again == first
    assert (tmp_path / "err.csv").read_bytes() == whole[2]
    assert figure_reuse._kept(tmp_path, "err", figure_key(plot, _args(), {}, _runs()))


def _args():
    return (_runs(), "train_error", "error")


def test_a_plot_that_computes_its_numbers_has_them_stamped(tmp_path, monkeypatch):
    """Plots returning (figure, numbers) get a CSV of those numbers, reused with the figure."""
    calls = []

    def with_numbers(d):
        calls.append(1)
        return plot_vs_depth(d, "train_error", "error"), d.assign(doubled=2 * d["value"])

    first = render(tmp_path, "n", with_numbers, _runs())
    assert "doubled" in (tmp_path / "n.csv").read_text()
    assert render(tmp_path, "n", with_numbers, _runs()) == first and len(calls) == 1


def test_an_input_without_a_hash_of_its_values_is_refused(tmp_path, plot):
    with pytest.raises(TypeError, match="got a object.*tables, arrays"):
        render(tmp_path, "err", plot, object())


def test_a_figure_without_numbers_is_reused_and_leaves_no_csv_of_another(tmp_path, plot):
    (tmp_path / "err.csv").write_text("left,by another figure\n")
    first = render(tmp_path, "err", plot, _runs(), "train_error", "error")
    assert [p.suffix for p in first] == [".png", ".svg"] and not (tmp_path / "err.csv").exists()
    assert render(tmp_path, "err", plot, _runs(), "train_error", "error") == first
    assert plot.calls == 1
