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
