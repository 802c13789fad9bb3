"""End-to-end Jacobians of network segments (input -> block k, block k -> logits).

Segments need a chain of modules. Our zoo nets are chains of ``stem``, the blocks and ``head``;
an ``nn.Sequential`` is a chain of its children. For the dynamical-isometry view (Pennington et
al. 2017) the mean squared singular value ||J||_F^2 / min(d_in, d_out) and sigma_max of each segment are
estimated with the same Hutchinson and subspace-iteration estimators as single blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from probe.errors import ProbeError
from probe.jacobian.estimators import hutchinson, top_singular_values

__all__ = ["chain", "segment", "segment_spectrum"]


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of (name, module) whose composition is the forward pass."""
    from probe.zoo.cifar_resnet import CifarResNet

    if isinstance(model, CifarResNet):
        parts = [("stem", model.stem)]
        for s, stage in enumerate(model.stages):
            parts += [(f"stages.{s}.{b}", blk) for b, blk in enumerate(stage)]
        return parts + [("head", model.head)]
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    raise ProbeError(
        f"Segments need a chain of modules; {type(model).__name__} is neither a resprobe zoo net nor "
        "nn.Sequential. Wrap your model's parts in nn.Sequential to use segment Jacobians."
    )


def segment(model: nn.Module, start: str | None, end: str | None) -> nn.Sequential:
    """The modules after ``start`` (None: from the input) up to and including ``end`` (None: logits)."""
    parts = chain(model)
    names = [n for n, _ in parts]
    for ref in (start, end):
        if ref is not None and ref not in names:
            raise ProbeError(f"{ref!r} is not a segment boundary; boundaries: {', '.join(names)}.")
    i = 0 if start is None else names.index(start) + 1
    j = len(parts) if end is None else names.index(end) + 1
    if i >= j:
        raise ProbeError(f"Empty segment: {start!r} does not come before {end!r}.")
    return nn.Sequential(*[m for _, m in parts[i:j]])


@torch.no_grad()
def segment_spectrum(
    model: nn.Module,
    x: torch.Tensor,
    start: str | None,
    end: str | None,
    n_probes: int = 16,
    top_k: int = 1,
    iters: int = 20,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-sample mean squared singular value, its standard error and top singular values of a
    segment's Jacobian at the segment's input (``x`` is the network input)."""
    was = model.training
    model.eval()
    try:
        inp = x if start is None else segment(model, None, start)(x)
        seg = segment(model, start, end)
        gen = torch.Generator(device=x.device).manual_seed(seed)
        r = hutchinson(seg, inp, n_probes, gen=gen)
        # Over the min(d_in, d_out) singular values the shape leaves free (see analyses.signal).
        n_sv = min(inp[0].numel(), seg(inp[:1])[0].numel())
        out = {"msv": r.fro2 / n_sv, "msv_se": r.fro2_se / n_sv}
        if top_k:
            out["top_sv"] = top_singular_values(seg, inp, top_k, iters, gen=gen)
        return out
    finally:
        model.train(was)
