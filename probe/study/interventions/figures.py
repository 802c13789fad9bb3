"""The intervention arms' figures: training error over steps (seeds as bands) and each arm's own."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analyses.figure_reuse import render
from analyses.figures import legend_outside, percent_axis, theme
from analyses.stats import POSITIVE, RATE, seed_band
from probe.study.interventions.runner import InterventionData
from probe.study.interventions.toy import VARIANTS
from probe.study.interventions.verdicts import matched_loss_table

__all__ = ["plot_arm_curves", "write_arm_figures"]


def plot_arm_curves(curves: pd.DataFrame, metric: str = "train_error") -> plt.Figure:
    """``metric`` (eval mode, every epoch) against optimizer steps, one line per condition, the
    band the across-seed 95% interval of the tables."""
    theme()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    order = list(dict.fromkeys(curves["label"]))
    sns.lineplot(
        curves,
        x="step",
        y=metric,
        hue="label",
        hue_order=order,
        errorbar=seed_band(RATE),
        marker="o",
        markersize=3,
        ax=ax,
    )
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(metric.replace("_", " ") + " (eval mode)")
    percent_axis(ax)
    legend_outside(ax, "run")
    fig.tight_layout()
    return fig


def _closeness(cl: pd.DataFrame) -> plt.Figure:
    theme()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sns.lineplot(
        cl,
        x="step",
        y="closeness",
        hue="label",
        style="blocks",
        errorbar=seed_band(POSITIVE),
        marker="o",
        ax=ax,
    )
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("identity-closeness d (mean over blocks)")
    legend_outside(ax, "run / blocks")
    fig.tight_layout()
    return fig


def _gradients(profile: pd.DataFrame) -> plt.Figure:
    theme()
    at = profile[profile["epoch"] == profile.groupby("key")["epoch"].transform("min")].copy()
    at["λ"] = at["lam"].map(lambda v: f"{v:g}")
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sns.lineplot(
        at, x="layer_index", y="grad_norm", hue="λ", errorbar=seed_band(POSITIVE), marker="o", ax=ax
    )
    ax.set_yscale("log")
    ax.set_xlabel("block (input → output)")
    ax.set_ylabel("||∂L/∂y|| at initialisation")
    legend_outside(ax, "λ")
    fig.tight_layout()
    return fig


def _matched(curves: pd.DataFrame, keys: tuple[str, str]) -> tuple[plt.Figure, pd.DataFrame]:
    theme()
    c = curves[curves["key"].isin(keys) & (curves["epoch"] > 0)]
    _, target = matched_loss_table(curves, keys)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sns.lineplot(
        c,
        x="train_loss",
        y="test_error",
        hue="label",
        units="seed",
        estimator=None,
        marker="o",
        ax=ax,
    )
    if np.isfinite(target):
        ax.axvline(target, color="0.4", ls="--", lw=1, label="matched loss")
    ax.set_xscale("log")
    ax.invert_xaxis()  # training proceeds to the right
    ax.set_xlabel("training loss (eval mode; training proceeds →)")
    ax.set_ylabel("test error")
    percent_axis(ax)
    legend_outside(ax, "run (one line per seed)")
    fig.tight_layout()
    return fig, c


def _toy_solved(steps: pd.DataFrame, budget: int) -> tuple[plt.Figure, pd.DataFrame]:
    theme()
    grid = np.linspace(0, budget, 61)
    rows = [
        {"activation": a, "variant": v, "step": t, "solved": float((g["steps"] <= t).mean())}
        for (a, v), g in steps.groupby(["activation", "variant"], sort=False)
        for t in grid
    ]
    d = pd.DataFrame(rows)
    acts = list(dict.fromkeys(d["activation"]))
    fig, axes = plt.subplots(
        1, len(acts), figsize=(3.2 * len(acts), 3.2), sharey=True, squeeze=False
    )
    for ax, act in zip(axes[0], acts):
        sns.lineplot(
            d[d["activation"] == act],
            x="step",
            y="solved",
            hue="variant",
            hue_order=list(VARIANTS),
            ax=ax,
        )
        ax.set_title(act)
        ax.set_xlabel("gradient steps")
        percent_axis(ax)
    axes[0][0].set_ylabel("initialisations solved")
    fig.tight_layout()
    return fig, d


def _toy_loss(curves: pd.DataFrame) -> plt.Figure:
    theme()
    acts = list(dict.fromkeys(curves["activation"]))
    fig, axes = plt.subplots(
        1, len(acts), figsize=(3.2 * len(acts), 3.2), sharey=True, squeeze=False
    )
    for ax, act in zip(axes[0], acts):
        c = curves[curves["activation"] == act]
        sns.lineplot(
            c,
            x="step",
            y="loss",
            hue="variant",
            hue_order=list(VARIANTS),
            estimator="median",
            errorbar=("pi", 50),
            ax=ax,
        )
        ax.set_yscale("log")
        ax.set_title(act)
        ax.set_xlabel("gradient steps")
    axes[0][0].set_ylabel("MSE / Var(target): median, quartiles")
    fig.tight_layout()
    return fig


def write_arm_figures(
    data: InterventionData, figdir: Path, families: tuple[str, str], depth: int, toy_steps: int
) -> list[Path]:
    """Every arm's figures (PNG, SVG and the plotted numbers as CSV) into ``figdir``."""
    files: list[Path] = []
    keys_of = data.conditions.groupby("arm")["key"].unique()
    for arm in ("constructed", "skipinit", "shortcut_scale", "lr"):
        if arm in data.arms:
            labels = data.conditions[data.conditions["arm"] == arm].drop_duplicates("key")
            labels = dict(zip(labels["key"], labels["label"]))
            c = data.curves[data.curves["key"].isin(keys_of.get(arm, []))]
            c = c.assign(label=c["key"].map(labels))
            files += render(figdir, f"arm_{arm}_training_error", plot_arm_curves, c, data=c)
    if "constructed" in data.arms and len(data.closeness):
        files += render(
            figdir, "arm_constructed_closeness", _closeness, data.closeness, data=data.closeness
        )
    if "shortcut_scale" in data.arms and len(data.grad_profile):
        files += render(
            figdir,
            "arm_shortcut_scale_gradients",
            _gradients,
            data.grad_profile,
            data=data.grad_profile,
        )
    if "matched_loss" in data.arms:
        keys = (f"{families[0]}{depth}", f"{families[1]}{depth}")
        files += render(figdir, "arm_matched_loss", _matched, data.curves, keys)
    if "toy" in data.arms and data.toy:
        files += render(figdir, "arm_toy_solved", _toy_solved, data.toy["steps"], toy_steps)
        curves = data.toy["curves"]
        files += render(figdir, "arm_toy_loss", _toy_loss, curves, data=curves)
    return files
