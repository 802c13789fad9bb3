"""Reducing probes run without autograd (no graph of statistics next to the model's); a probe that
differentiates in forward() keeps the grad mode of the pass, as before."""

from dataclasses import dataclass
from typing import ClassVar

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
