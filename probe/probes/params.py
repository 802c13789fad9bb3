"""Per-sample gradient norms of every parameter tensor (model level), via ``torch.func``.

For each of the first ``max_samples`` samples, ``vmap(grad(loss))`` over the batch gives the
gradient of that sample's own loss with respect to every parameter (eval mode: samples are
independent). Quantities are ``grad_norm.<parameter name>`` [N] under the layer key ``model``, so
the weight-update ratio ||dL/dW|| / ||W|| (the AGC ratio of Brock et al., ICML 2021) can be formed
against the checkpoint's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call, grad, vmap

from probe.errors import explain_autograd_refusal
from probe.losses import check_labels, exact_cross_entropy
from probe.probes.base import Call, Probe, in_parameter_precision, logits_of
from probe.probes.registry import register_probe
from probe.validation import PositiveInt

__all__ = ["ParamGradNorms"]


@register_probe
@dataclass
class ParamGradNorms(Probe):
    """Per-sample ||dl_n/dW|| for every parameter tensor W: l_n is the capture's ``loss_fn`` of
    sample n alone, by default cross-entropy on the true label with the exact gradient of
    :func:`probe.losses.exact_cross_entropy` (a ``loss_fn`` must then work under
    ``torch.func.vmap``, as torch's functional losses do).

    Args:
        max_samples: only the first ``max_samples`` samples of the capture (per-sample gradients
            hold one copy of the parameters per sample).
        chunk_size: samples differentiated at once (bounds memory).
    """

    name: ClassVar[str] = "param_grads"
    scope: ClassVar[str] = "model"
    requires_eval: ClassVar[bool] = True
    max_samples: PositiveInt | None = 64
    chunk_size: PositiveInt | None = 16

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        labels = call.labels
        keep = call.rows_within(self.max_samples)
        if keep == 0 or labels is None or call.input is None:
            return {}
        model = call.module
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        given = call.loss
        if given is None:
            check_labels(labels[:keep], call.output.shape[1])

        def loss(p, x, y):
            out = functional_call(model, (p, buffers), (x[None],))
            if given is not None:  # the capture's loss: the one every gradient probe reads
                return given(out, y[None])
            # exact for confident samples
            return exact_cross_entropy(logits_of(out, model), y[None], check=False)

        # under autocast, vmap(grad) met float32 inputs and bf16 weights: the parameters'
        # precision, autocast off (see in_parameter_precision)
        with (
            in_parameter_precision(model, call.input[:keep].detach()) as x,
            torch.enable_grad(),
            explain_autograd_refusal("param_grads"),
        ):
            grads = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=self.chunk_size)(
                params, x, labels[:keep]
            )
        return {
            f"grad_norm.{k}": torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32)
            for k, g in grads.items()
        }
