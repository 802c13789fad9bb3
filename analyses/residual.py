"""Residual magnitude, residual share, signal-propagation statistics and the Fig. 7 response std.

ratio   = E_x ||F(x)|| / ||S(x)||                  (Jastrzebski et al., ICLR 2018)
share   = E ||F||^2 / E ||y||^2                    (De & Smith, NeurIPS 2020, norm form)
ASM     = mean_c mu_c^2, AV = mean_c var_c        (Brock, De & Smith, ICLR 2021)
sigma_pool, sigma_chan of BN outputs after 3x3 convs, beside mean |gamma|  (He et al. 2016, Fig. 7)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.checkpoints import source_checkpoint
from analyses.stats import bootstrap_ci, mean_ci
from analyses.tidy import frame, nan_ci, needs, per_layer, row, run_key, stage_of
from probe.stats import Moments, response_std
from probe.store.reader import CaptureReader
from probe.train.checkpoint import checkpoint_paths

__all__ = [
    "residual_ratio",
    "residual_share",
    "spp",
    "residual_magnitude",
    "response_std_table",
    "bn_gammas",
]


def residual_ratio(f_norm: np.ndarray, s_norm: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """||F(x)|| / ||S(x)|| per sample; 0 for a zero branch.

    Example:
        >>> residual_ratio(np.array([0.0, 3.0]), np.array([1.0, 6.0]))
        array([0. , 0.5])
    """
    with np.errstate(invalid="ignore"):  # inf / inf from a diverged net is NaN, said elsewhere
        return np.asarray(f_norm, np.float64) / np.maximum(np.asarray(s_norm, np.float64), eps)


def residual_share(f_norm: np.ndarray, y_norm: np.ndarray, axis: int = -1) -> np.ndarray:
    """E ||F||^2 / E ||y||^2 over samples (vectorised along ``axis`` for the bootstrap)."""
    f, y = np.asarray(f_norm, np.float64), np.asarray(y_norm, np.float64)
    return np.mean(f**2, axis=axis) / np.maximum(np.mean(y**2, axis=axis), 1e-30)


def spp(m: Moments) -> tuple[float, float]:
    """(average channel squared mean, average channel variance) of merged channel moments."""
    return float(np.mean(m.mean**2)), float(np.mean(m.var))


@needs("probe 'residual' on blocks (and 'channel')")
def residual_magnitude(cap: CaptureReader) -> pd.DataFrame:
    """Tidy rows of ``residual_ratio``, ``residual_share``, ``asm``, ``av`` and ``branch_av``."""
    rows = per_layer(
        cap,
        "residual_ratio",
        ("f_norm", "s_norm"),
        lambda c, l: mean_ci(residual_ratio(c.read(l, "f_norm"), c.read(l, "s_norm"))),
        blocks_only=True,
    )
    rows += per_layer(
        cap,
        "residual_share",
        ("f_norm", "y_norm"),
        lambda c, l: bootstrap_ci(residual_share, c.read(l, "f_norm"), c.read(l, "y_norm")),
        blocks_only=True,
    )
    rows += per_layer(
        cap, "asm", ("channel_mean",), lambda c, l: nan_ci(spp(c.channel_moments(l))[0])
    )
    rows += per_layer(
        cap, "av", ("channel_mean",), lambda c, l: nan_ci(spp(c.channel_moments(l))[1])
    )
    rows += per_layer(
        cap,
        "branch_av",
        ("f_channel_mean",),
        lambda c, l: nan_ci(spp(c.channel_moments(l, prefix="f_"))[1]),
        blocks_only=True,
    )
    return frame(rows)


def bn_gammas(cap: CaptureReader) -> dict[str, np.ndarray]:
    """BN scales gamma of the checkpoint a capture came from ({} when it cannot be found, or
    holds other weights now: see :func:`analyses.checkpoints.source_checkpoint`)."""
    ck = source_checkpoint(cap)
    if ck is None:
        return {}
    weights, _ = checkpoint_paths(ck)
    from safetensors.numpy import load_file

    state = load_file(str(weights))
    return {
        k[: -len(".weight")]: v
        for k, v in state.items()
        if k.endswith(".weight") and k[: -len(".weight")] + ".running_var" in state
    }


@needs("probe 'channel' on BatchNorm layers (--layers '**bn*')")
def response_std_table(cap: CaptureReader) -> pd.DataFrame:
    """Fig. 7 of He et al. (2016): pooled and per-channel std of each captured BN output, in
    capture order, with the mean |gamma| of that BN (in eval mode the std largely reads out gamma)."""
    gammas = bn_gammas(cap)
    key = run_key(cap)
    rows = []
    bn_layers = [
        l
        for l in cap.layers
        if cap.has(l, "channel_mean") and cap.layer_attrs(l).get("module_type") == "BatchNorm2d"
    ]
    for i, layer in enumerate(bn_layers):
        moments = cap.channel_moments(layer)
        pooled, chan = response_std(moments.mean, moments.var)
        where = (key, layer, i, stage_of(layer))
        rows.append(row(*where, "response_std_pooled", nan_ci(pooled)))
        rows.append(row(*where, "response_std_channel", nan_ci(chan)))
        if layer in gammas:
            rows.append(row(*where, "bn_gamma_abs", nan_ci(np.abs(gammas[layer]).mean())))
    return frame(rows)
