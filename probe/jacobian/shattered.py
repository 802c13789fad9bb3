"""Shattered gradients (Balduzzi et al., ICML 2017): how input gradients decorrelate along a line.

For a line x_t = x0 + t d through input space, G_t = d(logit of the predicted class at x0)/dx at
x_t. White-noise-like gradients (short correlation length) indicate shattering; feed-forward nets
shatter with depth (correlation ~ 2^-L), ResNets much more slowly (~ 1/sqrt(L)).

    ACF(k)   = sum_t (g_t - mean g)(g_{t+k} - mean g) / sum_t (g_t - mean g)^2,  g_t = <G_t, u>
    R(Delta) = mean_t cos(G_t - mean G, G_{t+Delta} - mean G)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from probe.errors import ProbeError, explain_autograd_refusal
from probe.probes.base import logits_of

__all__ = ["line_gradients", "autocorrelation", "shattered_profile", "correlation_length"]


def line_gradients(
    model: nn.Module, x0: torch.Tensor, direction: torch.Tensor, ts: torch.Tensor, target: int
) -> torch.Tensor:
    """Input gradients of logit ``target`` at x0 + t*direction for each t. -> [T, *x0.shape]"""
    pts = (x0[None] + ts.view(-1, *([1] * x0.ndim)) * direction[None]).detach().requires_grad_(True)
    with torch.enable_grad():
        out = logits_of(model(pts), model)[:, target].sum()  # eval mode: samples independent
        with explain_autograd_refusal("shattered"):
            (g,) = torch.autograd.grad(out, pts)
    return g


def autocorrelation(g: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Normalised autocorrelation of a 1-D series ``g`` [T] for lags 0..max_lag-1."""
    g = g - g.mean()
    denom = (g * g).sum().clamp_min(1e-30)
    t = len(g)
    return torch.stack([(g[: t - k] * g[k:]).sum() / denom for k in range(min(max_lag, t))])


def correlation_length(cos_lag: torch.Tensor) -> torch.Tensor:
    """First lag at which ``cos_lag`` [..., L] drops below 1/e (L if it never does)."""
    below = cos_lag < math.exp(-1)
    first = torch.where(
        below.any(-1),
        below.float().argmax(-1),
        torch.full_like(below[..., 0], cos_lag.shape[-1], dtype=torch.long),
    )
    return first.float()


def shattered_profile(
    model: nn.Module,
    x: torch.Tensor,
    keep: int,
    *,
    n_points: int = 128,
    span: float = 1.0,
    max_lag: int = 32,
    direction: str = "random",
    seed: int = 0,
    first_index: int = 0,
    next_input: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """ACF, lagged cosine and correlation length for the first ``keep`` samples of ``x``.

    Random directions and the projection vector u depend only on ``seed`` and the sample's
    index ``first_index + n``, never on the batch. With ``direction="next"`` sample n's line runs
    towards the sample after it in capture order: ``x[n + 1]``, or ``next_input[0]`` (the sample
    after the batch) for the batch's last sample -- so no line depends on where a batch ends.
    """
    ts = torch.linspace(0.0, span, n_points, device=x.device, dtype=x.dtype)
    u = torch.randn(x[0].shape, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    u = u / u.norm()
    acfs, coss = [], []
    with torch.no_grad():
        targets = logits_of(model(x[:keep]), model).argmax(1)
    for n in range(keep):
        if direction == "next":
            if n + 1 < len(x):
                partner = x[n + 1]
            elif next_input is not None:
                partner = next_input[0].to(x.device, x.dtype)
            else:
                raise ProbeError(
                    "direction='next' pairs each sample with the one after it, but the sample after "
                    "this batch was not given. Capture with probe.capture (it reads one batch "
                    "ahead), or pass next_input to shattered_profile / HookSession.run_batch."
                )
            d = partner - x[n]
            if not bool(d.any()):
                raise ProbeError(
                    f"direction='next': sample {first_index + n} equals the sample after it, so "
                    "the line has no direction. Capture at least two distinct samples, or use "
                    "direction='random'."
                )
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + first_index + n + 1)
            d = torch.randn(x[n].shape, generator=gen).to(x.device, x.dtype)
            d = d * (x[n].norm() / d.norm().clamp_min(1e-12))
        g = line_gradients(model, x[n], d, ts, int(targets[n])).flatten(1).double()  # [T, D]
        acfs.append(autocorrelation(g @ u.flatten().double(), max_lag))
        c = g - g.mean(0, keepdim=True)
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)
        coss.append(
            torch.stack(
                [(c[: n_points - k] * c[k:]).sum(1).mean() for k in range(min(max_lag, n_points))]
            )
        )
    acf, cos_lag = torch.stack(acfs), torch.stack(coss)
    return {"acf": acf, "cos_lag": cos_lag, "corr_length": correlation_length(cos_lag)}
