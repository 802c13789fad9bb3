"""Reducing probes run without autograd (no graph of statistics next to the model's); a probe that
differentiates in forward() keeps the grad mode of the pass, as before."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import probe
from probe.probes.base import Call, Probe
from probe.zoo import create


@dataclass
class _Mode(Probe):
    name: ClassVar[str] = "mode"
    seen: ClassVar[list] = []

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        type(self).seen.append(torch.is_grad_enabled())
        return {self.name: torch.ones(call.batch_size)}


@dataclass
class _Reducing(_Mode):
    name: ClassVar[str] = "mode_reducing"
    forward_grad: ClassVar[bool] = False
    seen: ClassVar[list] = []


def test_grad_mode_of_probe_forward():
    net = create("resnet8", in_channels=1, width=4).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with probe.HookSession(net, "auto", [_Mode(), _Reducing(), probe.GradNorms()]) as s:
        res, _ = s.run_batch(x, y)
    assert _Mode.seen and all(_Mode.seen)  # a gradient pass: a default probe sees grad on
    assert _Reducing.seen and not any(_Reducing.seen)
    assert all("grad_y_norm" in r for r in res.values())
    assert not any(t.requires_grad for r in res.values() for t in r.values())


@dataclass
class _LateGrad(Probe):
    """A gradient probe that does not declare eager_backward: it runs after the backward pass."""

    name: ClassVar[str] = "late"
    needs_grad: ClassVar[bool] = True

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        return {"late_norm": call.grad_output.flatten(1).norm(dim=1)}


def test_eager_and_deferred_gradient_probes_agree_and_eager_frees_the_gradients():
    net = create("resnet8", in_channels=1, width=4).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    kept = []
    with probe.HookSession(net, "auto", [probe.GradNorms()]) as s:
        emit = s._emit
        s._emit = lambda info, call: (kept.append(call), emit(info, call))[1]
        eager, _ = s.run_batch(x, y)
    assert kept and all(c.grad_output is None and c.grad_input is None for c in kept)
    with probe.HookSession(net, "auto", [probe.GradNorms(), _LateGrad()]) as s:
        late, _ = s.run_batch(x, y)
    for key, r in eager.items():
        torch.testing.assert_close(r["grad_y_norm"], late[key]["grad_y_norm"])
        torch.testing.assert_close(r["grad_y_norm"], late[key]["late_norm"], rtol=1e-5, atol=1e-7)
        if "cos_f_grad" in r:
            torch.testing.assert_close(r["cos_f_grad"], late[key]["cos_f_grad"])


@pytest.mark.parametrize(
    "names",
    [["residual", "channel", "grad", "activations", "gradients"], ["jacobian"], ["shattered"]],
    ids=["statistics", "jacobian", "model-level"],
)
@pytest.mark.parametrize("made", ["before", "inside"])
def test_a_capture_inside_inference_mode_equals_the_plain_one(names, made):
    """Probes that differentiate get autograd back inside a caller's inference_mode, as they do
    inside no_grad, and a batch made under inference_mode is copied where autograd needs it:
    the same numbers as a capture outside (it failed: 'element 0 of tensors does not require
    grad', and 'Inference tensors cannot be saved for backward')."""
    import numpy as np

    net = create("resnet8", in_channels=1, width=4).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g))]
    ref = probe.capture(net, data, probes=names)
    with torch.inference_mode():
        if made == "inside":
            data = [(x.clone(), y.clone()) for x, y in data]
            assert data[0][0].is_inference()
        cap = probe.capture(net, data, probes=names)
    assert cap.layers == ref.layers
    for layer in ref.layers:
        assert cap.quantities(layer) == ref.quantities(layer)
        for q in ref.quantities(layer):
            assert np.array_equal(cap.read(layer, q), ref.read(layer, q), equal_nan=True), q
