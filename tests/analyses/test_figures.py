"""What the per-layer figure draws: one line per model, and per residual site where blocks have
several (a transformer's attention and MLP adds), so that sites of different kinds are not joined
into one zigzag."""

import matplotlib
import numpy as np
import pandas as pd

from analyses.figures import plot_vs_layer

matplotlib.use("Agg")


def _table(layers: list[str], values: list[float], model: str = "m", seeds=(0,)) -> pd.DataFrame:
    rows = [
        {
            "model": model,
            "seed": seed,
            "layer": layer,
            "layer_index": i,
            "quantity": "residual_ratio",
            "value": v + 0.01 * seed,
            "ci_low": np.nan,
            "ci_high": np.nan,
        }
        for seed in seeds
        for i, (layer, v) in enumerate(zip(layers, values))
    ]
    return pd.DataFrame(rows)


def _drawn(fig) -> dict[str, list[float]]:
    ax = fig.axes[0]
    return {
        ln.get_label(): list(ln.get_ydata())
        for ln in ax.lines
        if not ln.get_label().startswith("_")
    }


def test_blocks_with_two_sites_get_a_line_per_site():
    layers = ["b.0#0", "b.0#1", "b.1#0", "b.1#1", "b.2#0", "b.2#1"]
    values = [0.03, 0.14, 0.031, 0.142, 0.032, 0.141]
    lines = _drawn(plot_vs_layer(_table(layers, values), "residual_ratio"))
    assert lines == {"m, site 0": [0.03, 0.031, 0.032], "m, site 1": [0.14, 0.142, 0.141]}


def test_blocks_with_one_site_get_one_line_per_model():
    t = pd.concat(
        [
            _table(["s.0", "s.1", "s.2"], [1.0, 2.0, 3.0], "a"),
            _table(["s.0", "s.1"], [4.0, 5.0], "b"),
        ]
    )
    assert _drawn(plot_vs_layer(t, "residual_ratio")) == {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0]}


def test_several_seeds_with_two_sites_are_drawn_per_site():
    layers = ["b.0#0", "b.0#1", "b.1#0", "b.1#1"]
    fig = plot_vs_layer(_table(layers, [0.1, 0.5, 0.1, 0.5], seeds=(0, 1)), "residual_ratio")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "site 0" in labels and "site 1" in labels


def test_whole_blocks_beside_their_sites_keep_a_line_of_their_own():
    layers = ["b.0", "b.0#0", "b.0#1", "b.1", "b.1#0", "b.1#1"]
    values = [5.0, 0.03, 0.14, 6.0, 0.031, 0.142]
    lines = _drawn(plot_vs_layer(_table(layers, values), "residual_ratio"))
    assert lines == {"m": [5.0, 6.0], "m, site 0": [0.03, 0.031], "m, site 1": [0.14, 0.142]}
    fig = plot_vs_layer(_table(layers, values, seeds=(0, 1)), "residual_ratio")
    drawn = sum(len(ln.get_xdata()) for ln in fig.axes[0].lines)
    assert drawn >= len(layers)  # every layer is on the figure, none dropped


def test_a_model_without_sites_beside_one_with_them_gets_no_empty_site_lines():
    vit = _table([f"b.{i // 12}#{i % 12}" for i in range(24)], [float(i) for i in range(24)], "vit")
    cnn = _table(["s.0", "s.1"], [1.0, 2.0], "cnn")
    lines = _drawn(plot_vs_layer(pd.concat([vit, cnn]), "residual_ratio"))
    assert lines["cnn"] == [1.0, 2.0] and not any(k.startswith("cnn,") for k in lines)
    assert lines["vit, site 2"] == [2.0, 14.0] and lines["vit, site 10"] == [10.0, 22.0]
    assert list(lines)[1:4] == ["vit, site 0", "vit, site 1", "vit, site 2"]  # by number
