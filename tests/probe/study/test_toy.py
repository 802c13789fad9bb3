"""The toy's stacked training against each (activation, variant) trained on its own."""

import numpy as np
import torch

from probe.study.interventions.toy import ACTIVATIONS, ToyConfig, run_toy


def _alone(cfg: ToyConfig, activation: str, skip: bool, seed: int):
    """One seed of one variant, trained by a loop of its own: (solved step or NaN, final loss,
    learned w, b)."""
    phi = ACTIVATIONS[activation]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(cfg.seeds, cfg.layers, generator=g, dtype=torch.float64)[seed].clone()
    b = torch.zeros(cfg.layers, dtype=torch.float64)
    w.requires_grad_(), b.requires_grad_()
    x = torch.linspace(0, 1, cfg.points, dtype=torch.float64)
    y = 4 * x + 3
    solved = float("nan")
    for step in range(cfg.steps + 1):
        h = phi(w[0] * x + b[0])
        for k in range(1, cfg.layers - 1):
            z = phi(w[k] * h + b[k])
            h = h + z if skip else z
        loss = ((w[-1] * h + b[-1] - y) ** 2).mean() / y.var(correction=0)
        if np.isnan(solved) and loss < cfg.threshold:
            solved = step
        if step == cfg.steps or not torch.isfinite(loss):
            break
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= cfg.lr * gw
            b -= cfg.lr * gb
    return solved, float(loss.detach()), w.detach().numpy(), b.detach().numpy()


def test_the_stacked_toy_equals_each_seed_trained_alone():
    cfg = ToyConfig(seeds=2, steps=150, lr=0.05)
    res = run_toy(cfg)
    for act in cfg.activations:
        for variant in ("plain", "skip"):
            rows = res.steps[(res.steps["activation"] == act) & (res.steps["variant"] == variant)]
            ws = res.weights[
                (res.weights["activation"] == act) & (res.weights["variant"] == variant)
            ]
            for seed in range(cfg.seeds):
                solved, final, w, b = _alone(cfg, act, variant == "skip", seed)
                got = rows[rows["seed"] == seed].iloc[0]
                assert np.isnan(got["steps"]) if np.isnan(solved) else got["steps"] == solved
                np.testing.assert_allclose(got["final_loss"], final, rtol=1e-9, atol=1e-15)
                mine = ws[ws["seed"] == seed].sort_values("layer")
                np.testing.assert_allclose(mine["w"], w[1:-1], rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(mine["b"], b[1:-1], rtol=1e-9, atol=1e-12)
    solved = res.summary.set_index(["activation", "variant"])["solved"]
    assert solved.between(0, 1).all() and solved.max() > 0  # some seeds solve it
