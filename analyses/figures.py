"""Seaborn figures in one theme; each saved as PNG and SVG next to a CSV of the plotted numbers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analyses.stats import POSITIVE, RATE, seed_band  # noqa: E402
from probe.tempfiles import atomic_path  # noqa: E402

__all__ = [
    "theme",
    "legend_outside",
    "percent_axis",
    "model_order",
    "palette",
    "save",
    "figure_stamp",
    "STAMP_MARK",
    "plot_vs_layer",
    "site_of",
    "plot_fig7",
    "plot_cka",
    "plot_training",
    "plot_lesions",
    "plot_vs_depth",
    "with_relative_depth",
    "RATE_QUANTITIES",
]

LABELS = {
    "closeness": "identity-closeness d = ||y − S(x)|| / ||S(x)||",
    "cos_ys": "cos(y, S(x))",
    "jac_rel_dev": "||J − P||_F / ||P||_F",
    "cka_adjacent": "CKA(block input, block output)",
    "residual_ratio": "||F(x)|| / ||S(x)||",
    "residual_share": "E||F||² / E||y||²",
    "asm": "average channel squared mean",
    "av": "average channel variance",
    "branch_av": "branch average channel variance",
    "act_norm": "||y|| (activation norm)",
    "grad_norm": "||∂L/∂y|| (gradient norm)",
    "grad_x_norm": "||∂L/∂x||",
    "cos_f_grad": "cos(F(x), ∂L/∂x)",
    "jac_msv": "mean squared singular value of J",
    "jac_top_sv": "top singular value of J",
    "gsc": "gradient scale coefficient",
    "seg_in_msv": "mean sq. singular value, input → boundary",
    "seg_out_msv": "mean sq. singular value, boundary → logits",
    "param_grad_norm": "per-sample ||∂ℓ/∂W|| (parameter index)",
    "response_std_pooled": "layer response std (pooled)",
    "response_std_channel": "layer response std (per channel)",
    "bn_gamma_abs": "mean |γ| of the BN layer",
    "cos_lag": "input-gradient correlation R(Δ) along a line, against the lag Δ",
}
RATE_QUANTITIES = ("train_error", "test_error", "batch_error", "lesion_error")


def percent_axis(ax) -> None:
    """Error rates in percent, as in every table."""
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))


def legend_outside(ax, title: str = "model") -> None:
    """The legend right of the axes, where it cannot cover data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles, labels, title=title, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0)
        )


def theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def model_order(models: pd.Series) -> list[str]:
    """Plain before residual, shallow before deep."""

    def key(m: str):
        digits = "".join(ch for ch in m if ch.isdigit())
        return (not m.startswith(("plain", "preplain")), int(digits) if digits else 0, m)

    return sorted(pd.unique(models), key=key)


def palette(models: list[str]) -> dict[str, tuple]:
    """Oranges for plain nets, blues for residual nets, darker = deeper."""
    plain = [m for m in models if m.startswith(("plain", "preplain"))]
    res = [m for m in models if m not in plain]
    out = dict(zip(plain, sns.color_palette("Oranges", len(plain) + 1)[1:]))
    out.update(zip(res, sns.color_palette("Blues", len(res) + 1)[1:]))
    return out


def save(
    fig: plt.Figure,
    out_dir: Path,
    name: str,
    data: pd.DataFrame | None = None,
    *,
    key: str | None = None,
) -> list[Path]:
    """``fig`` as ``name``.png (150 dpi) and .svg, and ``data`` as ``name``.csv, each written
    atomically; ``key`` (:func:`analyses.figure_reuse.figure_key`) is stamped into the PNG and
    the SVG with the CSV's digest, so that a run again can reuse them. Closes ``fig``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    csv = data.to_csv(index=False).encode() if data is not None else None
    meta = {"Identifier": figure_stamp(key, csv)} if key is not None else {}
    try:
        if csv is not None:  # first: a stamp never names a CSV that is not there yet
            with atomic_path(out_dir / f"{name}.csv") as tmp:
                tmp.write_bytes(csv)
        else:  # one left by an earlier figure of this name is not this figure's
            (out_dir / f"{name}.csv").unlink(missing_ok=True)
        for path, kw in zip(paths, ({"dpi": 150}, {})):
            with atomic_path(path) as tmp:  # a killed run leaves no half-written figure
                fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight", metadata=meta, **kw)
    finally:
        plt.close(fig)
    return paths + ([out_dir / f"{name}.csv"] if csv is not None else [])


STAMP_MARK = "resprobe-figure"  # the first word of every stamp (figure_stamp)


def figure_stamp(key: str | None, csv: bytes | None) -> str:
    """What :func:`save` stamps into a figure's PNG and SVG: the figure's key and the sha256
    of its CSV (``-`` without one)."""
    digest = hashlib.sha256(csv).hexdigest() if csv is not None else "-"
    return f"{STAMP_MARK} {key} csv {digest}"


def _seed_errorbar(name: str, values: pd.Series):
    """The across-seed interval of the tables (Student t clipped to the quantity's range), as a
    seaborn errorbar: error rates in [0, 1], non-negative quantities in [0, inf)."""
    if "error" in name:
        return seed_band(RATE)
    return seed_band(POSITIVE) if bool((values.dropna() >= 0).all()) else seed_band()


def _band(ax, d: pd.DataFrame, x: str, color) -> None:
    ok = d["ci_low"].notna() & d["ci_high"].notna()
    if ok.any():
        ax.fill_between(
            d.loc[ok, x], d.loc[ok, "ci_low"], d.loc[ok, "ci_high"], color=color, alpha=0.2, lw=0
        )


OTHER_LAYERS = "other layers"  # in a figure with a line per site: the layers that are no site


def site_of(layers: pd.Series) -> pd.Series:
    """Which residual site of its block each layer key is: 'site 0', 'site 1' for the keys
    'blocks.3#0', 'blocks.3#1' of a block with several adds; '' for any other layer.

    Example:
        >>> site_of(pd.Series(["blocks.0#0", "blocks.0#1@2", "stages.1.0"])).tolist()
        ['site 0', 'site 1', '']
    """
    k = layers.astype(str).str.extract(r"#(\d+)(?:@\d+)?$", expand=False)
    return ("site " + k).fillna("")


def with_relative_depth(d: pd.DataFrame) -> pd.DataFrame:
    """``d`` with ``relative_depth`` = layer_index / the model's last layer_index (0 = first
    block, 1 = last), so nets of different depths line up by position, not by block count."""
    d = d.copy()
    last = d.groupby("model")["layer_index"].transform("max").clip(lower=1)
    d["relative_depth"] = d["layer_index"] / last
    return d


def plot_vs_layer(
    df: pd.DataFrame,
    quantity: str,
    ax: plt.Axes | None = None,
    logy: bool = False,
    relative: bool = False,
) -> plt.Figure:
    """``quantity`` against layer index (or, with ``relative``, against relative depth), one line
    per model; bands are 95% CIs (across seeds when several seeds exist, else bootstrap over
    samples)."""
    theme()
    d = df[df["quantity"] == quantity]
    x = "layer_index"
    if relative:
        d, x = with_relative_depth(d), "relative_depth"
    fig = ax.figure if ax is not None else plt.figure(figsize=(6.4, 3.8))
    ax = ax or fig.add_subplot()
    order = model_order(d["model"])
    pal = palette(order)
    # Blocks with several residual sites (a transformer's attention and MLP adds, keys 'b#0',
    # 'b#1') get a line per site: joined in layer order, sites of different kinds zigzag.
    d = d.assign(site=site_of(d["layer"]).replace("", OTHER_LAYERS))
    sites = sorted(set(d["site"]) - {OTHER_LAYERS}, key=lambda k: int(k.split()[-1]))
    several = len(sites) > 1
    if several and (d["site"] == OTHER_LAYERS).any():  # whole blocks, plain layers: a line too
        sites = [OTHER_LAYERS, *sites]
    if d.groupby(["model", "layer_index"])["seed"].nunique().max() > 1:
        sns.lineplot(
            d,
            x=x,
            y="value",
            hue="model",
            hue_order=order,
            palette=pal,
            errorbar=_seed_errorbar(quantity, d["value"]),
            marker="o",
            markersize=3,
            ax=ax,
            **({"style": "site", "style_order": sites} if several else {}),
        )
    else:
        dashes = ["-", "--", ":", "-."]
        for m in order:
            of_model = d[d["model"] == m]
            for k, site in enumerate(sites if several else [None]):
                dm = of_model if site is None else of_model[of_model["site"] == site]
                if dm.empty:  # a model without this site (a CNN beside a transformer)
                    continue
                dm = dm.sort_values(x)
                label = m if site in (None, OTHER_LAYERS) else f"{m}, {site}"
                ax.plot(
                    dm[x], dm["value"], marker="o", ms=3, color=pal[m], label=label,
                    ls=dashes[k % len(dashes)],
                )  # fmt: skip
                _band(ax, dm, x, pal[m])
    legend_outside(ax)
    ax.set_xlabel(
        {"cos_lag": "lag", "param_grad_norm": "parameter (forward order)"}.get(
            quantity,
            "relative depth (first block 0, last 1)" if relative else "block / layer index",
        )
    )
    ax.set_ylabel(LABELS.get(quantity, quantity))
    if not relative:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    positive = d["value"][d["value"] > 0]
    if logy and len(positive) == len(d) and positive.max() / positive.min() > 20:
        ax.set_yscale("log")  # only when the values span more than about a decade
    fig.tight_layout()  # room for the axis labels and the outside legend
    return fig


def plot_vs_depth(df: pd.DataFrame, quantity: str, ylabel: str) -> plt.Figure:
    """A per-run scalar against network depth, plain and residual as hues, 95% CI over seeds."""
    theme()
    d = df[df["quantity"] == quantity].copy()
    d["architecture"] = np.where(d["residual"], "residual", "plain")
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    sns.lineplot(
        d,
        x="depth",
        y="value",
        hue="architecture",
        hue_order=["plain", "residual"],
        palette={"plain": "tab:orange", "residual": "tab:blue"},
        errorbar=_seed_errorbar(quantity, d["value"]),
        marker="o",
        ax=ax,
    )
    ax.set_xticks(sorted(d["depth"].unique()))
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel(ylabel)
    if quantity in RATE_QUANTITIES:
        percent_axis(ax)
    legend_outside(ax, "architecture")
    fig.tight_layout()
    return fig


def plot_fig7(df: pd.DataFrame, quantity: str = "response_std_pooled") -> plt.Figure:
    """He et al. (2016) Fig. 7: response std per 3x3 layer in original order (top) and sorted (bottom)."""
    theme()
    d = df[df["quantity"] == quantity]
    order = model_order(d["model"])
    pal = palette(order)
    fig, axes = plt.subplots(2, 1, figsize=(6.4, 6.0))
    for m in order:
        dm = d[d["model"] == m].groupby("layer_index")["value"].mean()
        axes[0].plot(dm.index, dm.values, color=pal[m], label=m, lw=1.2)
        axes[1].plot(np.arange(len(dm)), np.sort(dm.values)[::-1], color=pal[m], label=m, lw=1.2)
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel(LABELS.get(quantity, quantity))
    legend_outside(axes[0])
    fig.tight_layout()
    return fig


def plot_cka(matrix: np.ndarray, labels: list[str], title: str) -> plt.Figure:
    theme()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    sns.heatmap(
        matrix,
        ax=ax,
        vmin=0,
        vmax=1,
        cmap="magma",
        square=True,
        cbar_kws={"label": "linear CKA"},
        xticklabels=False,
        yticklabels=False,
    )
    ax.invert_yaxis()
    ax.set_xlabel(f"layer ({labels[0]} … {labels[-1]})")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return fig


def plot_training(history: pd.DataFrame, metric: str = "train_error") -> plt.Figure:
    """Training curves by depth: ``metric`` per epoch, one line per model (CI across seeds)."""
    theme()
    order = model_order(history["model"])
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    sns.lineplot(
        history,
        x="epoch",
        y=metric,
        hue="model",
        hue_order=order,
        palette=palette(order),
        errorbar=_seed_errorbar(metric, history[metric]),
        ax=ax,
    )
    ax.set_ylabel(metric.replace("_", " "))
    if metric in RATE_QUANTITIES:
        percent_axis(ax)
    legend_outside(ax)
    fig.tight_layout()
    return fig


def plot_lesions(df: pd.DataFrame) -> plt.Figure:
    """Test error after deleting each single block, plain against residual."""
    theme()
    d = df[df["quantity"] == "lesion_error"]
    order = model_order(d["model"])
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    sns.barplot(
        d,
        x="layer_index",
        y="value",
        hue="model",
        hue_order=order,
        palette=palette(order),
        ax=ax,
        errorbar=seed_band(RATE),
    )
    base = df[df["quantity"] == "lesion_baseline"].groupby("model")["value"].mean()
    pal = palette(order)
    for m, v in base.items():
        ax.axhline(v, color=pal[m], ls="--", lw=0.8)
    ax.set_xlabel("deleted block")
    ax.set_ylabel("test error (dashed: intact net)")
    percent_axis(ax)
    legend_outside(ax)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def plot_spectra(spectra: pd.DataFrame) -> plt.Figure:
    """Spectral densities of J^T J (stochastic Lanczos quadrature), one panel per block position."""
    theme()
    positions = list(dict.fromkeys(spectra["position"]))
    order = model_order(spectra["model"])
    # One panel per row: side by side they shrink to a thumbnail in a two-column report.
    fig, axes = plt.subplots(
        len(positions), 1, figsize=(6.4, 2.6 * len(positions)), squeeze=False, sharex=True
    )
    for ax, pos in zip(axes[:, 0], positions):
        d = spectra[spectra["position"] == pos]
        sns.histplot(
            d,
            x="log10_eigenvalue",
            weights="weight",
            hue="model",
            hue_order=order,
            palette=palette(order),
            element="step",
            stat="probability",
            common_norm=False,
            bins=30,
            ax=ax,
        )
        ax.set_title(f"{pos} block")
        ax.set_xlabel("log10 eigenvalue of JᵀJ")
    fig.tight_layout()
    return fig
