"""Signal propagation: activation and gradient norms against depth, Jacobian gains, the gradient
scale coefficient and shattered-gradient correlation.

    act_norm   = E ||y||,  grad_norm = E ||dL/dy||       (He et al. 2016 Sec. 4.1 "healthy norms")
    jac_msv    = E ||J||_F^2 / min(d_in, d_out)          (mean squared singular value; Pennington 2017)
    gsc        = E sqrt(||J||_F^2 / d_in) ||x|| / ||y||   (gradient scale coefficient of one block,
                                                          Philipp, Song & Carbonell 2018)
    corr_length: first lag where the gradient cosine along a line drops below 1/e (Balduzzi 2017)
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analyses.stats import mean_ci
from analyses.tidy import frame, needs, per_layer, row, run_key
from probe.store.reader import CaptureReader

__all__ = [
    "gsc",
    "mean_squared_singular_value",
    "signal_propagation",
    "shattered_table",
    "model_level_table",
]


def mean_squared_singular_value(
    fro2: np.ndarray, d_in: int, d_out: int | None = None
) -> np.ndarray:
    """Mean of the squared singular values of J [d_out, d_in] per sample: 1 for an isometry.

    Pennington, Schoenholz & Ganguli (NeurIPS 2017, Sec. 2) define it as (1/n) ||J||_F^2 for a
    square J. A d_out x d_in Jacobian has min(d_in, d_out) singular values that its shape does not
    force to zero, so a non-square J (a downsampling block, a segment ending at the logits) is
    averaged over those: ||J||_F^2 / min(d_in, d_out). Dividing by d_in would count the
    d_in - d_out zeros of a shape-reducing map and report half of an isometry's value for a
    stride-2 block that maps C x H x W to 2C x H/2 x W/2.

    Example:
        >>> mean_squared_singular_value(np.array([8.0]), 8)
        array([1.])
        >>> mean_squared_singular_value(np.array([4.0]), 8, 4)  # a 4 x 8 partial isometry
        array([1.])
    """
    n = d_in if d_out is None else min(d_in, d_out)
    return np.asarray(fro2, np.float64) / n


def gsc(fro2: np.ndarray, d_in: int, x_norm: np.ndarray, y_norm: np.ndarray) -> np.ndarray:
    """Per-sample gradient scale coefficient of one block: ||J||_qm ||x|| / ||y||, ||J||_qm = ||J||_F/sqrt(d_in)."""
    return (
        np.sqrt(np.maximum(fro2, 0) / d_in)
        * np.asarray(x_norm, np.float64)
        / np.maximum(y_norm, 1e-30)
    )


def _d_in(cap: CaptureReader, layer: str) -> int:
    return int(cap.layer_attrs(layer).get("input_size", 0)) or 1


def _d_out(cap: CaptureReader, layer: str) -> int:
    return int(np.prod(json.loads(cap.layer_attrs(layer).get("output_shape", "[]")))) or 1


@needs("probe 'residual', 'grad' or 'jacobian'")
def signal_propagation(cap: CaptureReader) -> pd.DataFrame:
    """Tidy rows of act_norm, grad_norm, grad_x_norm, cos_f_grad, jac_msv, jac_top_sv and gsc."""
    simple = {
        "act_norm": "y_norm",
        "grad_norm": "grad_y_norm",
        "grad_x_norm": "grad_x_norm",
        "cos_f_grad": "cos_f_grad",
    }
    rows = []
    for quantity, source in simple.items():
        rows += per_layer(cap, quantity, (source,), lambda c, l, s=source: mean_ci(c.read(l, s)))
    rows += per_layer(
        cap,
        "jac_msv",
        ("jac_fro2",),
        lambda c, l: mean_ci(
            mean_squared_singular_value(c.read(l, "jac_fro2"), _d_in(c, l), _d_out(c, l))
        ),
    )
    rows += per_layer(
        cap, "jac_top_sv", ("jac_top_sv",), lambda c, l: mean_ci(c.read(l, "jac_top_sv")[:, 0])
    )

    def _gsc(c, l):
        fro2 = c.read(l, "jac_fro2")
        n = len(fro2)
        return mean_ci(gsc(fro2, _d_in(c, l), c.read(l, "x_norm")[:n], c.read(l, "y_norm")[:n]))

    rows += per_layer(cap, "gsc", ("jac_fro2", "x_norm", "y_norm"), _gsc)
    return frame(rows)


@needs("probe 'shattered'")
def shattered_table(cap: CaptureReader) -> pd.DataFrame:
    """corr_length (mean over lines, with CI) and the mean cos_lag curve (layer_index = lag)."""
    if not cap.has("model", "cos_lag"):
        return frame([])
    key = run_key(cap)
    rows = [row(key, "model", 0, -1, "corr_length", mean_ci(cap.read("model", "corr_length")))]
    cos_lag = cap.read("model", "cos_lag")
    rows += [
        row(key, "model", lag, -1, "cos_lag", mean_ci(cos_lag[:, lag]))
        for lag in range(cos_lag.shape[1])
    ]
    return frame(rows)


@needs("probe 'segments' or 'param_grads'")
def model_level_table(cap: CaptureReader) -> pd.DataFrame:
    """Segment Jacobians (``seg_in_msv``/``seg_out_msv``, layer_index = boundary) and per-parameter
    gradient norms (``param_grad_norm``, layer = parameter name) from the ``model`` group."""
    if "model" not in cap.layers:
        return frame([])
    key = run_key(cap)
    rows = []
    for q in ("seg_in_msv", "seg_out_msv"):
        if cap.has("model", q):
            vals = cap.read("model", q)
            rows += [
                row(key, f"boundary{k}", k, -1, q, mean_ci(vals[:, k]))
                for k in range(vals.shape[1])
            ]
    params = [q for q in cap.quantities("model") if q.startswith("grad_norm.")]
    rows += [
        row(key, q[len("grad_norm.") :], i, -1, "param_grad_norm", mean_ci(cap.read("model", q)))
        for i, q in enumerate(params)
    ]
    return frame(rows)
