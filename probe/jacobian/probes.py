"""Jacobian probes that write into the same capture as every other probe.

``--probe jacobian`` records, per sample and block: ``jac_fro2``, ``jac_dev2`` (||J - P||_F^2 with P
the shortcut's Jacobian, defined for plain blocks too), ``jac_p_fro2``, ``jac_trace`` (square
blocks) and their standard errors; optionally the top-k singular values (``top_k``) and a
stochastic-Lanczos spectral density of J^T J (``slq_steps``). ``--probe shattered`` records the
input-gradient autocorrelation along a line through input space (Balduzzi et al., ICML 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from probe.errors import ProbeError, check_option
from probe.jacobian.estimators import (
    hutchinson,
    lanczos_spectrum,
    per_sample_probes,
    top_singular_values,
)
from probe.jacobian.segments import chain, segment
from probe.jacobian.shattered import shattered_profile
from probe.probes.base import Call, Probe, in_parameter_precision
from probe.probes.registry import register_probe
from probe.validation import NonNegativeInt, PositiveFloat, PositiveInt

__all__ = ["JacobianNorms", "SegmentJacobians", "ShatteredGradients"]


@register_probe
@dataclass
class JacobianNorms(Probe):
    """Hutchinson estimates of a layer's Jacobian (eval mode), with standard errors.

    Args:
        n_probes: Rademacher probe vectors per sample (the standard error shrinks as 1/sqrt(m)).
        seed: seed of the probe vectors (recorded in the capture).
        top_k: also estimate the top-k singular values (subspace iteration, ``iters`` steps).
        slq_steps: also estimate the spectral density of J^T J with this many Lanczos steps.
        max_samples: only the first ``max_samples`` samples of the capture (Jacobians are costly).
        spectrum_samples: top-k and Lanczos estimates on only the first ``spectrum_samples`` of
            the capture (they cost ``iters`` or ``slq_steps`` Jacobian products each); None = all.
        chunk_size: probe vectors evaluated at once (bounds memory).
    """

    name: ClassVar[str] = "jacobian"
    requires_eval: ClassVar[bool] = True
    dims: ClassVar = {
        "jac_top_sv": ("sample", "k"),
        "jac_slq_nodes": ("sample", "node"),
        "jac_slq_weights": ("sample", "node"),
    }
    n_probes: PositiveInt = 16
    seed: NonNegativeInt = 0
    top_k: NonNegativeInt = 0
    iters: PositiveInt = 30
    slq_steps: NonNegativeInt = 0
    slq_vectors: PositiveInt = 2
    max_samples: PositiveInt | None = 256
    spectrum_samples: PositiveInt | None = None
    chunk_size: PositiveInt | None = 8

    def applies_to(self, call: Call) -> bool:
        return (
            call.own_map
            and call.input is not None
            and call.input.shape[0] == call.batch_size
            and call.input.is_floating_point()
        )

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        keep = call.rows_within(self.max_samples)
        if keep == 0:
            return {}
        f = call.function()  # the block with its other call arguments held fixed
        off = call.sample_offset
        identity, shortcut = call.identity_shortcut, call.shortcut
        with (
            in_parameter_precision(call.module, call.input[:keep].detach()) as x,
            torch.no_grad(),
        ):
            r = hutchinson(
                f,
                x,
                self.n_probes,
                shortcut=None if identity else shortcut,
                identity_shortcut=identity,
                chunk_size=self.chunk_size,
                v=per_sample_probes(self.n_probes, x, self.seed, off),
            )
            out = {"jac_fro2": r.fro2, "jac_fro2_se": r.fro2_se}
            if r.dev2 is not None:
                out.update(jac_dev2=r.dev2, jac_dev2_se=r.dev2_se, jac_p_fro2=r.p_fro2)
            if r.trace is not None:
                out.update(jac_trace=r.trace, jac_trace_se=r.trace_se)
            # Spectral estimates cost iters / slq_steps Jacobian products each: fewer samples.
            n_spec = call.rows_within(self.spectrum_samples, len(x))
            xs = x[:n_spec]
            if self.top_k and n_spec:
                u0 = per_sample_probes(self.top_k + 4, xs, self.seed + 1, off, kind="normal")
                out["jac_top_sv"] = top_singular_values(
                    f, xs, self.top_k, self.iters, chunk_size=self.chunk_size, u0=u0
                )
            if self.slq_steps and n_spec:
                q0 = per_sample_probes(self.slq_vectors, xs, self.seed + 2, off)
                out["jac_slq_nodes"], out["jac_slq_weights"] = lanczos_spectrum(
                    f, xs, self.slq_steps, self.slq_vectors, chunk_size=self.chunk_size, q0=q0
                )
        return {k: v.float() for k, v in out.items()}


@register_probe
@dataclass
class ShatteredGradients(Probe):
    """Input gradients along a line through input space and their autocorrelation (model level).

    For sample n the line runs along a random direction d_n of the same norm as x_n (seeded by the
    sample's position, so results do not depend on batching), or with ``direction="next"`` towards
    the next sample in capture order, d_n = x_{n+1} - x_n (the capture's last sample pairs with its
    first; the capture reads one batch ahead so batch ends change nothing):
    x_t = x_n + t d_n, t in [0, span], ``n_points`` points.
    Records ``acf`` [N, max_lag] (autocorrelation of <G_t, u> for a fixed random unit u),
    ``cos_lag`` [N, max_lag] (mean cosine between centred gradients Delta apart), and
    ``corr_length`` [N] (first lag where cos_lag < 1/e; Balduzzi et al. 2017).
    """

    name: ClassVar[str] = "shattered"
    scope: ClassVar[str] = "model"
    requires_eval: ClassVar[bool] = True
    dims: ClassVar = {"acf": ("sample", "lag"), "cos_lag": ("sample", "lag")}
    n_points: Annotated[int, Field(ge=2)] = 128
    span: PositiveFloat = 1.0
    max_lag: PositiveInt = 32
    direction: str = "random"  # "random" (per-sample seeded) or "next" sample in capture order
    max_samples: PositiveInt | None = 16
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("shattered direction", self.direction, ["random", "next"])

    @property
    def needs_next_sample(self) -> bool:
        return self.direction == "next"

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        keep = call.rows_within(self.max_samples)
        if keep == 0 or call.input is None:
            return {}
        if not call.input.is_floating_point():
            raise ProbeError(
                f"Probe 'shattered' differentiates the logits along lines through input space, "
                f"but this model's input is {call.input.dtype} (e.g. token ids), which has no "
                "such lines. Leave the probe out for this model."
            )
        following = call.next_input
        with in_parameter_precision(call.module, call.input.detach()) as x:
            res = shattered_profile(
                call.module,
                x,
                keep,
                n_points=self.n_points,
                span=self.span,
                max_lag=self.max_lag,
                direction=self.direction,
                seed=self.seed,
                first_index=call.sample_offset,
                next_input=None if following is None else following.to(x.dtype),
            )
        return {k: v.float() for k, v in res.items()}


@register_probe
@dataclass
class SegmentJacobians(Probe):
    """End-to-end Jacobians for the dynamical-isometry view (Pennington et al. 2017), model level.

    For every boundary k of the model's chain (after the stem and after each block), the mean
    squared singular value ||J||_F^2 / min(d_in, d_out) of the segment input -> k (``seg_in_msv`` [N, K]) and of
    k -> logits (``seg_out_msv`` [N, K]), by Hutchinson with ``n_probes`` Rademacher vectors. Needs a
    zoo net or an ``nn.Sequential``; other models produce nothing.
    """

    name: ClassVar[str] = "segments"
    scope: ClassVar[str] = "model"
    requires_eval: ClassVar[bool] = True
    dims: ClassVar = {"seg_in_msv": ("sample", "boundary"), "seg_out_msv": ("sample", "boundary")}
    n_probes: PositiveInt = 8
    seed: NonNegativeInt = 0
    max_samples: PositiveInt | None = 16
    chunk_size: PositiveInt | None = 8

    def applies_to(self, call: Call) -> bool:
        try:
            return len(chain(call.module)) > 2
        except Exception:  # not a chain of modules: nothing to measure
            return False

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        keep = call.rows_within(self.max_samples)
        if keep == 0 or call.input is None:
            return {}
        model = call.module
        names = [n for n, _ in chain(model)][:-1]  # every boundary before the head
        seg_in, seg_out = [], []
        with (
            in_parameter_precision(model, call.input[:keep].detach()) as x,
            torch.no_grad(),
        ):
            v_in = per_sample_probes(self.n_probes, x, self.seed, call.sample_offset)
            for name in names:
                pre, post = segment(model, None, name), segment(model, name, None)
                h = pre(x)
                # Mean squared singular value over the min(d_in, d_out) singular values the shape
                # leaves free (Pennington et al. 2017 define it for square J; see analyses.signal).
                seg_in.append(
                    hutchinson(pre, x, v=v_in, chunk_size=self.chunk_size).fro2
                    / min(x[0].numel(), h[0].numel())
                )
                v_out = per_sample_probes(self.n_probes, h, self.seed + 1, call.sample_offset)
                seg_out.append(
                    hutchinson(post, h, v=v_out, chunk_size=self.chunk_size).fro2
                    / min(h[0].numel(), call.output[0].numel())
                )
        return {
            "seg_in_msv": torch.stack(seg_in, 1).float(),
            "seg_out_msv": torch.stack(seg_out, 1).float(),
        }
