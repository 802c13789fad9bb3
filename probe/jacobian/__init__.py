"""Jacobian estimators (Hutchinson, subspace iteration, Lanczos quadrature, exact) and probes."""

from probe.jacobian.estimators import (
    HutchinsonResult,
    exact_jacobian,
    hutchinson,
    hutchinson_interval,
    jvp_many,
    lanczos_spectrum,
    top_singular_values,
)
from probe.jacobian.probes import JacobianNorms, SegmentJacobians, ShatteredGradients
from probe.jacobian.segments import chain, segment, segment_spectrum
from probe.jacobian.shattered import (
    autocorrelation,
    correlation_length,
    line_gradients,
    shattered_profile,
)

__all__ = [
    "HutchinsonResult",
    "JacobianNorms",
    "SegmentJacobians",
    "ShatteredGradients",
    "autocorrelation",
    "chain",
    "correlation_length",
    "exact_jacobian",
    "hutchinson",
    "hutchinson_interval",
    "jvp_many",
    "lanczos_spectrum",
    "line_gradients",
    "segment",
    "segment_spectrum",
    "shattered_profile",
    "top_singular_values",
]
