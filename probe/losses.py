"""The default per-sample loss of captures: cross-entropy whose gradient is exact at any confidence.

``F.cross_entropy`` differentiates to softmax(z) - onehot(y). In float32 the true-class entry
p_y - 1 cancels once 1 - p_y is below ~1e-5 (it rounds to 0 or to a multiple of 6e-8), so the
per-sample gradients of confidently classified samples -- a quarter of a test set after a few
epochs -- are wrong by tens of percent, and every gradient probe inherits the error. Here the
true-class entry is formed as -sum_{j != y} p_j, which has no cancellation, with every p_j computed
in float64 from the logit gaps z_j - z_y:

    loss_n  = log(1 + sum_{j != y} exp(z_j - z_y))          (= logsumexp(z) - z_y)
    dl/dz_j = p_j  (j != y),    dl/dz_y = -sum_{j != y} p_j

The gradient is returned in the logits' dtype, where its entries keep full relative precision.
"""

from __future__ import annotations

import torch

from probe.errors import ProbeError

__all__ = ["exact_cross_entropy", "check_labels"]


def _gaps(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_j - z_y in float64 with the true class masked to -inf. [N, C] -> [N, C]"""
    z = z.double()
    gaps = z - z.gather(1, y[:, None])
    return gaps.scatter(1, y[:, None], float("-inf"))


class _ExactCrossEntropy(torch.autograd.Function):
    # The setup_context form (no ctx in forward) lets torch.func.grad / vmap differentiate it,
    # which per-sample parameter gradients need.
    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gaps = _gaps(z, y)
        top = gaps.amax(1, keepdim=True).clamp_min(0.0)  # shift for overflow-free exponentials
        # log(exp(-top) + sum_j exp(gap_j - top)) + top; log1p keeps tiny losses exact when top = 0.
        rest = torch.exp(gaps - top).sum(1)
        loss = torch.where(
            top[:, 0] > 0, top[:, 0] + torch.log(torch.exp(-top[:, 0]) + rest), torch.log1p(rest)
        )
        return loss.to(z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, y = inputs
        ctx.save_for_backward(z, y)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        z, y = ctx.saved_tensors
        gaps = _gaps(z, y)
        # p_j = exp(z_j - logsumexp z) = exp(gap_j - logsumexp(0, gaps)), all in float64.
        lse = torch.logsumexp(torch.cat([torch.zeros_like(gaps[:, :1]), gaps], 1), 1, keepdim=True)
        p = torch.exp(gaps - lse)  # true class: exp(-inf) = 0
        g = p.scatter(1, y[:, None], -p.sum(1, keepdim=True))
        return (g * grad_loss.double()[:, None]).to(z.dtype), None


def check_labels(labels: torch.Tensor, n_classes: int) -> None:
    """Raise :class:`ProbeError` unless ``labels`` are integer classes in [0, n_classes)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ProbeError(f"Labels must be integer class indices; got dtype {labels.dtype}.")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ProbeError(
            f"Labels must lie in [0, {n_classes - 1}] for {n_classes} classes; got "
            f"[{int(labels.min())}, {int(labels.max())}]. Unlabelled samples (label -1) cannot "
            "drive gradient probes."
        )


def exact_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum", *, check: bool = True
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, C] against integer ``labels`` [N] with an exact gradient.

    Args:
        reduction: ``"sum"`` (the capture default: row n of every gradient is then the gradient of
            sample n's own loss), ``"mean"`` or ``"none"`` (per-sample losses [N]).
        check: validate the labels (reads them on the host; pass False inside ``torch.func``
            transforms after calling :func:`check_labels` once outside).

    Example:
        >>> z = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)  # p_y = 1 - 1.9e-13
        >>> exact_cross_entropy(z, torch.tensor([0])).backward()
        >>> f"{float(z.grad[0, 0]):.4e}"  # float32 F.cross_entropy gives exactly 0 here
        '-1.8715e-13'
    """
    if logits.ndim != 2 or labels.ndim != 1 or len(labels) != len(logits):
        raise ProbeError(
            f"The default loss needs logits [N, classes] and labels [N]; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}. Pass loss_fn=... for other "
            "outputs (it must sum per-sample losses)."
        )
    if check:
        check_labels(labels, logits.shape[1])
    loss = _ExactCrossEntropy.apply(logits, labels)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ProbeError(f"Invalid reduction {reduction!r}; allowed: sum, mean, none.")
