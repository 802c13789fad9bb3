"""Measures that turn captures into answers: pure functions on arrays, tidy tables, figures.

Example:
    >>> import analyses
    >>> analyses.residual_ratio([0.0, 1.0], [1.0, 2.0])
    array([0. , 0.5])
"""

from analyses.checkpoints import CheckpointMissingWarning, source_checkpoint
from analyses.cka import MinibatchCKA, cka_matrix, hsic_biased, hsic_unbiased, linear_cka
from analyses.identity import closeness, identity_closeness, jacobian_deviation
from analyses.lesions import deleted, error_rate, lesion_study
from analyses.pipeline import AnalysisResult, analyze, measure_table
from analyses.residual import (
    residual_magnitude,
    residual_ratio,
    residual_share,
    response_std_table,
    spp,
)
from analyses.signal import gsc, mean_squared_singular_value, shattered_table, signal_propagation
from analyses.stats import bootstrap_ci, mean_ci, seed_ci

__all__ = [
    "AnalysisResult",
    "CheckpointMissingWarning",
    "MinibatchCKA",
    "analyze",
    "bootstrap_ci",
    "cka_matrix",
    "closeness",
    "deleted",
    "error_rate",
    "gsc",
    "hsic_biased",
    "hsic_unbiased",
    "identity_closeness",
    "jacobian_deviation",
    "lesion_study",
    "linear_cka",
    "mean_ci",
    "mean_squared_singular_value",
    "measure_table",
    "residual_magnitude",
    "residual_ratio",
    "residual_share",
    "response_std_table",
    "seed_ci",
    "shattered_table",
    "signal_propagation",
    "source_checkpoint",
    "spp",
]
