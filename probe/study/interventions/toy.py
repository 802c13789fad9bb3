"""The scalar toy behind "identity is hard, zero is easy", trained over many seeds at once.

A stack of six scalar layers fits f(x) = 4x + 3 on x in [0, 1]. Two layers suffice (the first
computes 4x + 3, the readout passes it on); the four in between should do nothing:

    plain:  h <- phi(w_k h + b_k)          nothing = the identity (w = 1, b = 0 for ReLU)
    skip:   h <- h + phi(w_k h + b_k)      nothing = zero (phi(w h + b) = 0, e.g. w, b <= 0)

Both variants start from the same draws (w ~ N(0, 1), b = 0) and take full-batch gradient steps;
what differs is only the shortcut, as in He et al.'s plain/residual pairs. The toy measures the
steps each seed needs to bring the mean squared error below ``threshold`` (relative to the
target's variance) and the middle layers' learned weights.

Example:
    >>> res = run_toy(ToyConfig(seeds=8, steps=200))
    >>> sorted(res.steps["variant"].unique())
    ['plain', 'skip']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from probe.errors import check_option

__all__ = ["ToyConfig", "ToyResult", "run_toy", "ACTIVATIONS"]

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "linear": lambda z: z}
VARIANTS = ("plain", "skip")  # without and with the shortcut


@dataclass(frozen=True)
class ToyConfig:
    """The toy's settings; the defaults take about 30 s on 2 CPU cores (every activation and
    variant trained as one stack)."""

    seeds: int = 200  # independent initialisations, trained side by side
    layers: int = 6  # first layer, layers - 2 middle layers, readout
    steps: int = 3000  # full-batch gradient steps
    lr: float = 0.01
    threshold: float = 1e-3  # "solved": MSE / Var(target) below this
    points: int = 64  # x on a grid in [0, 1]
    activations: tuple[str, ...] = ("relu", "tanh", "linear")
    record_every: int = 25  # loss curve resolution (steps)

    def __post_init__(self) -> None:
        for a in self.activations:
            check_option("toy activation", a, list(ACTIVATIONS))


@dataclass
class ToyResult:
    config: ToyConfig
    steps: pd.DataFrame  # activation, variant, seed, steps (NaN = not solved), final_loss
    curves: pd.DataFrame  # activation, variant, seed, step, loss (relative MSE)
    weights: pd.DataFrame  # activation, variant, seed, layer, w, b, branch_out (mean |phi| or |h|)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)


def _forward(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, phi, skip: bool | torch.Tensor
) -> torch.Tensor:
    """w, b: [S, L]; x: [P] -> predictions [S, P]. ``skip`` for all rows, or per row ([S, 1]
    bool: the variants trained side by side)."""
    h = phi(w[:, :1] * x + b[:, :1])  # [S, P]
    for k in range(1, w.shape[1] - 1):
        h = _add(h, phi(w[:, k : k + 1] * h + b[:, k : k + 1]), skip)
    return w[:, -1:] * h + b[:, -1:]


def _add(h: torch.Tensor, z: torch.Tensor, skip: bool | torch.Tensor) -> torch.Tensor:
    """The next layer's h: h + z with the shortcut, z without (per row: where() keeps each row's
    value exactly what it would be alone)."""
    if isinstance(skip, torch.Tensor):
        return torch.where(skip, h + z, z)
    return h + z if skip else z


def _stacked(activations: tuple[str, ...], rows: int):
    """phi for a stack of ``rows`` rows per activation, in that order."""
    fns = [ACTIVATIONS[a] for a in activations]
    return lambda z: torch.cat([f(part) for f, part in zip(fns, z.split(rows))])


def _train(cfg: ToyConfig) -> dict[tuple[str, str], tuple[dict, torch.Tensor, torch.Tensor]]:
    """Every (activation, variant) from the same draws, trained side by side as blocks of rows
    of one stack: each row's loss, gradient and step are its own (the same numbers as training
    each on its own), and one stack pays the per-operation overhead, which is all of a step's
    cost at this size, once instead of once per pair."""
    pairs = [(a, v) for a in cfg.activations for v in VARIANTS]
    s = cfg.seeds
    g = torch.Generator().manual_seed(0)  # the same draws for both variants and all activations
    w0 = torch.randn(s, cfg.layers, generator=g, dtype=torch.float64)
    w = w0.repeat(len(pairs), 1).requires_grad_()
    b = torch.zeros(len(pairs) * s, cfg.layers, dtype=torch.float64, requires_grad=True)
    skip = torch.tensor([v == "skip" for _, v in pairs]).repeat_interleave(s)[:, None]
    phi = _stacked(cfg.activations, len(VARIANTS) * s)
    x = torch.linspace(0, 1, cfg.points, dtype=torch.float64)
    y = 4 * x + 3
    var = float(y.var(correction=0))
    solved = torch.full((len(pairs) * s,), float("nan"), dtype=torch.float64)
    curve = []
    for step in range(cfg.steps + 1):
        loss = ((_forward(w, b, x, phi, skip) - y) ** 2).mean(1) / var  # [rows]
        with torch.no_grad():
            bad = ~torch.isfinite(loss)  # a diverged seed stays unsolved
            newly = torch.isnan(solved) & (loss < cfg.threshold) & ~bad
            solved[newly] = step
            if step % cfg.record_every == 0 or step == cfg.steps:
                curve.append((step, loss.detach().clone()))
        if step == cfg.steps:
            break
        gw, gb = torch.autograd.grad(torch.where(bad, 0.0, loss).sum(), (w, b))
        with torch.no_grad():
            w -= cfg.lr * gw
            b -= cfg.lr * gb
    w, b, loss = w.detach(), b.detach(), loss.detach()
    out = {}
    for i, pair in enumerate(pairs):
        r = slice(i * s, (i + 1) * s)
        got = {"solved": solved[r], "curve": [(t, c[r]) for t, c in curve], "final": loss[r]}
        out[pair] = got, w[r], b[r]
    return out


def _middle(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, phi, skip: bool) -> np.ndarray:
    """Per seed and middle layer: mean |phi(w h + b)| (skip: the branch, 0 = "learned zero") or
    mean |z - h| (plain: distance from the identity)."""
    h = phi(w[:, :1] * x + b[:, :1])
    out = []
    for k in range(1, w.shape[1] - 1):
        z = phi(w[:, k : k + 1] * h + b[:, k : k + 1])
        out.append((z.abs() if skip else (z - h).abs()).mean(1))
        h = _add(h, z, skip)
    return torch.stack(out, 1).numpy()  # [S, L - 2]


def run_toy(cfg: ToyConfig = ToyConfig()) -> ToyResult:
    """Train the plain and the skip variant for every activation; tables of steps, curves, weights."""
    steps, curves, weights = [], [], []
    x = torch.linspace(0, 1, cfg.points, dtype=torch.float64)
    trained = _train(cfg)
    for act in cfg.activations:
        for variant in VARIANTS:
            r, w, b = trained[act, variant]
            seeds = np.arange(cfg.seeds)
            steps.append(
                pd.DataFrame(
                    {
                        "activation": act,
                        "variant": variant,
                        "seed": seeds,
                        "steps": r["solved"].numpy(),
                        "final_loss": r["final"].numpy(),
                    }
                )
            )
            for step, loss in r["curve"]:
                curves.append(
                    pd.DataFrame(
                        {
                            "activation": act,
                            "variant": variant,
                            "seed": seeds,
                            "step": step,
                            "loss": loss.numpy(),
                        }
                    )
                )
            dist = _middle(w, b, x, ACTIVATIONS[act], variant == "skip")
            for k in range(1, cfg.layers - 1):
                weights.append(
                    pd.DataFrame(
                        {
                            "activation": act,
                            "variant": variant,
                            "seed": seeds,
                            "layer": k,
                            "w": w[:, k].numpy(),
                            "b": b[:, k].numpy(),
                            "deviation": dist[:, k - 1],
                        }
                    )
                )
    st = pd.concat(steps, ignore_index=True)
    res = ToyResult(
        cfg, st, pd.concat(curves, ignore_index=True), pd.concat(weights, ignore_index=True)
    )
    res.summary = (
        st.assign(solved=st["steps"].notna())
        .groupby(["activation", "variant"], sort=False)
        .agg(seeds=("seed", "size"), solved=("solved", "mean"), median_steps=("steps", "median"))
        .reset_index()
    )
    return res
