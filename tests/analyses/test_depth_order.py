"""Depth is the order the forward pass produced the results in: a module called several times
(shared weights, a looped network) holds a depth per call, and modules used in turn interleave.
Before, ``layer_index`` was the module's place in the selection, the same for every call, so a
looped network's calls were drawn at one x and sorted in no particular order by the verdicts."""

import numpy as np
import pytest
import torch
from torch import nn

import probe
from analyses.identity import identity_closeness
from analyses.tidy import layer_positions, per_layer
from probe.store.reader import MemoryCapture


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return torch.relu(x + self.f(x))


class Looped(nn.Module):
    """Blocks a and b used in turn, twice; b is registered first, so the selection order
    (b, a) is not the depth order (a, b, a, b)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.b = Block(c)
        self.a = Block(c)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            x = self.b(self.a(x))
        return x.mean((2, 3))


def _hand_walk(model: Looped, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(x, F(x), y) of every block call in depth order, computed without hooks."""
    out = []
    with torch.no_grad():
        h = model.stem(x)
        for block in (model.a, model.b, model.a, model.b):
            f, y = block.f(h), block(h)
            out.append((h, f, y))
            h = y
    return out


@pytest.mark.parametrize("to_file", [False, True])
def test_every_call_has_its_own_depth_in_forward_order(tmp_path, to_file):
    torch.manual_seed(0)
    model = Looped().eval()
    x = torch.randn(6, 1, 5, 5)
    out = tmp_path / "c.h5" if to_file else None
    cap = probe.capture(model, [x[:3], x[3:]], probes=[probe.ResidualNorms()], out=out)
    assert cap.layers == ["a", "b", "a@1", "b@1"]
    assert [int(cap.layer_attrs(k)["layer_index"]) for k in cap.layers] == [0, 1, 2, 3]
    assert [int(cap.layer_attrs(k)["call"]) for k in cap.layers] == [0, 0, 1, 1]
    norm = lambda t: t.flatten(1).norm(dim=1).numpy()  # noqa: E731
    for key, (h, f, y) in zip(cap.layers, _hand_walk(model, x)):
        for q, t in (("x_norm", h), ("f_norm", f), ("y_norm", y), ("dev_norm", y - h)):
            np.testing.assert_allclose(cap.read(key, q), norm(t), rtol=1e-5, err_msg=f"{key} {q}")


def test_measures_place_each_call_at_its_depth():
    torch.manual_seed(0)
    model = Looped().eval()
    cap = probe.capture(model, [torch.randn(4, 1, 5, 5)], probes=[probe.ResidualNorms()])
    table = identity_closeness(cap)
    d = table[table["quantity"] == "closeness"]
    assert d["layer"].tolist() == ["a", "b", "a@1", "b@1"]
    assert d["layer_index"].tolist() == [0, 1, 2, 3]


def test_captures_that_numbered_the_selection_fall_back_to_capture_order():
    # attributes as captures wrote them before: every call of a module at its selection place
    old = {"b": {"layer_index": 0}, "a": {"layer_index": 1}, "a@1": {"layer_index": 1}}
    data = {k: {"v": np.ones((2, 1))} for k in ("a", "b", "a@1")}
    cap = MemoryCapture(data, old, np.arange(2), np.zeros(2, int), {})
    assert layer_positions(cap) == {"a": 0, "b": 1, "a@1": 2}
    rows = per_layer(cap, "v", ("v",), lambda c, l: (1.0, 1.0, 1.0))
    assert [(r["layer"], r["layer_index"]) for r in rows] == [("a", 0), ("b", 1), ("a@1", 2)]
    # distinct recorded positions are kept as recorded
    cap = MemoryCapture(
        data,
        {"a": {"layer_index": 5}, "b": {"layer_index": 2}, "a@1": {"layer_index": 9}},
        np.arange(2),
        np.zeros(2, int),
        {},
    )
    assert layer_positions(cap) == {"a": 5, "b": 2, "a@1": 9}
