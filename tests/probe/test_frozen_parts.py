"""Gradients of blocks after a frozen part of the model (run under ``no_grad`` or detached, as
when a head or the top blocks are tuned on a frozen backbone): the capture's backward to the
input never reached them, so every gradient probe recorded nothing there. Checked against a
hand-written backward in float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probe


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))

    def forward(self, x):
        return x + self.f(x)


class FrozenBottom(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.c = Block(), Block(), Block()
        self.head = nn.Linear(6, 3)
        self.how = how  # "no_grad", "detach" or "" (nothing frozen)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.how == "no_grad":
            with torch.no_grad():
                h = self.a(x)
        else:
            h = self.a(x).detach() if self.how == "detach" else self.a(x)
        return self.head(self.c(self.b(h)))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (10,), generator=g)


def _by_hand(model, x, y):
    """‖∂L/∂y‖ and ‖∂L/∂x‖ per sample of blocks b and c, L = Σₙ cross-entropy."""
    with torch.no_grad():
        h = model.a(x)
    yb = model.b(h.requires_grad_(True))
    yc = model.c(yb)
    loss = F.cross_entropy(model.head(yc), y, reduction="sum")
    gb, gc = torch.autograd.grad(loss, [yb, yc])
    return {
        "b": {"grad_y_norm": gb.norm(dim=1), "grad_x_norm": torch.autograd.grad(
            F.cross_entropy(model.head(model.c(model.b(h))), y, reduction="sum"), h)[0].norm(dim=1)},
        "c": {"grad_y_norm": gc.norm(dim=1), "grad_x_norm": gb.norm(dim=1)},
    }  # fmt: skip


@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_blocks_after_a_frozen_part_get_their_gradients(how):
    torch.manual_seed(0)
    model = FrozenBottom(how).double().eval()
    x, y = _data()
    with pytest.warns(
        probe.NothingRecordedWarning,
        match=r"grad measured no output gradient at 1 layer\(s\) \(a\)",
    ):
        cap = probe.capture(model, [(x, y, torch.arange(10))], layers="auto", probes=["grad"])
    want = _by_hand(model, x, y)
    # block a runs without autograd: it has no gradient to report; b's input has none either
    assert set(cap.layers) == {"b", "c"}
    assert set(cap["b"]) == {"grad_y_norm"}
    for key, qs in (("b", ["grad_y_norm"]), ("c", ["grad_y_norm", "grad_x_norm"])):
        for q in qs:
            torch.testing.assert_close(torch.from_numpy(cap[key][q]), want[key][q],
                                       rtol=1e-5, atol=1e-8)  # fmt: skip


def test_a_frozen_part_costs_one_extra_pass_once_and_a_whole_model_none():
    x, y = _data()
    batches = [(x[:5], y[:5], torch.arange(5)), (x[5:], y[5:], torch.arange(5, 10))]
    for how, extra in (("", 0), ("detach", 1)):
        model = FrozenBottom(how).double().eval()
        probe.capture(model, batches, layers=["b", "c"], probes=["grad"])
        assert model.calls == 1 + len(batches) + extra  # 1: the traced pass that finds the sites


class UnusedBranch(nn.Module):
    """A block whose output the loss never sees (an auxiliary output left out of the loss)."""

    def __init__(self):
        super().__init__()
        self.a, self.aux, self.head = Block(), Block(), nn.Linear(6, 3)
        self.last_aux = None

    def forward(self, x):
        h = self.a(x)
        self.last_aux = self.aux(h)
        return self.head(h)


def test_layers_no_gradient_reaches_are_named_and_a_whole_model_warns_nothing():
    x, y = _data()
    with pytest.warns(probe.NothingRecordedWarning, match=r"1 layer\(s\) \(aux\)"):
        cap = probe.capture(UnusedBranch().double().eval(), [(x, y, torch.arange(10))],
                            layers="auto", probes=["grad"])  # fmt: skip
    # aux's input is on the loss's way (through the head): its gradient there is measured
    assert "grad_y_norm" in cap["a"] and "grad_y_norm" not in cap["aux"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", probe.NothingRecordedWarning)
        probe.capture(FrozenBottom("").double().eval(), [(x, y, torch.arange(10))],
                      layers="auto", probes=["grad"])  # fmt: skip
