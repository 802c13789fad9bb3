"""Identity-closeness: how far each block (residual or plain pseudo-block) is from its shortcut.

    d   = ||y - S(x)|| / ||S(x)||                       (per sample; 0 for a block that is act(S))
    cos = cos(y, S(x))
    delta_J = ||J - P||_F / ||P||_F                      (Jacobian form; P = the shortcut's Jacobian)
    CKA between consecutive block outputs               (Kornblith et al. 2019; Nguyen et al. 2021)
Defined on equal terms for plain nets, whose pseudo-blocks are measured against the same S.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.cka import capture_representations, cka_matrix
from analyses.stats import bootstrap_ci, mean_ci
from analyses.tidy import (
    frame,
    layer_positions,
    nan_ci,
    needs,
    per_layer,
    row,
    run_key,
    stage_of,
)
from probe.store.reader import CaptureReader

__all__ = ["closeness", "jacobian_deviation", "identity_closeness", "cka_layers"]


def closeness(dev_norm: np.ndarray, s_norm: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """d = ||y - S(x)|| / ||S(x)|| per sample.

    Example:
        >>> closeness(np.array([0.0, 1.0]), np.array([2.0, 2.0]))
        array([0. , 0.5])
    """
    with np.errstate(invalid="ignore"):  # inf / inf from a diverged net is NaN, said elsewhere
        return np.asarray(dev_norm, np.float64) / np.maximum(np.asarray(s_norm, np.float64), eps)


def jacobian_deviation(dev2: np.ndarray, p_fro2: np.ndarray) -> np.ndarray:
    """||J - P||_F / ||P||_F per sample from the Hutchinson estimates."""
    return np.sqrt(
        np.maximum(np.asarray(dev2, np.float64), 0)
        / np.maximum(np.asarray(p_fro2, np.float64), 1e-30)
    )


def _ratio_of_means(a, b, axis=-1):
    return np.sqrt(np.mean(a, axis=axis) / np.mean(b, axis=axis))


@needs("probe 'residual' on blocks (and 'jacobian', 'activations')")
def identity_closeness(cap: CaptureReader, cka_batch: int | None = None) -> pd.DataFrame:
    """Tidy rows of ``closeness``, ``cos_ys``, ``jac_rel_dev`` and ``cka_adjacent`` per block."""
    rows = per_layer(
        cap,
        "closeness",
        ("dev_norm", "s_norm"),
        lambda c, l: mean_ci(closeness(c.read(l, "dev_norm"), c.read(l, "s_norm"))),
        blocks_only=True,
    )
    rows += per_layer(
        cap, "cos_ys", ("cos_ys",), lambda c, l: mean_ci(c.read(l, "cos_ys")), blocks_only=True
    )
    # Ratio of mean ||J-P||^2 to mean ||P||^2 over samples, i.e. the dataset-level relative deviation.
    # Every layer that has a shortcut's Jacobian P has it: residual units, and whole blocks of
    # several (a transformer block, whose Jacobian the sites inside it cannot have alone).
    rows += per_layer(
        cap,
        "jac_rel_dev",
        ("jac_dev2", "jac_p_fro2"),
        lambda c, l: bootstrap_ci(_ratio_of_means, c.read(l, "jac_dev2"), c.read(l, "jac_p_fro2")),
    )
    rows += cka_layers(cap, cka_batch, adjacent_only=True)
    return frame(rows)


def cka_layers(
    cap: CaptureReader, batch_size: int | None = None, adjacent_only: bool = False
) -> list[dict]:
    """CKA between the captured ``output`` activations of consecutive layers (``cka_adjacent``) or,
    with ``adjacent_only=False``, every pair (quantity ``cka``, ``layer`` = 'a|b')."""
    layers, reps = capture_representations(cap)
    if len(layers) < 2:
        return []
    n = len(reps[0])
    mat = cka_matrix(reps, batch_size if batch_size and n >= 2 * batch_size else None)
    key, positions = run_key(cap), layer_positions(cap)
    rows = []
    for i, layer in enumerate(layers):
        js = [i - 1] if adjacent_only else range(len(layers))
        for j in js:
            if j < 0:
                continue
            rows.append(
                row(
                    key,
                    layer if adjacent_only else f"{layers[j]}|{layer}",
                    positions[layer],
                    stage_of(layer),
                    "cka_adjacent" if adjacent_only else "cka",
                    nan_ci(mat[i, j]),
                )
            )
    return rows
