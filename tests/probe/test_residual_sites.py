"""Residual sites read at the add itself, on hand-built blocks of every shape the design covers,
each compared with a direct computation (and, for Jacobians, jacrev in float64)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev

import probe
from probe.conformance import RawSites
from probe.errors import ProbeError
from probe.hooks.sites import discover_sites
from probe.jacobian.estimators import math_attention


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(model, x, layers="auto", probes=(), mode="eval", labels=None):
    labels = torch.zeros(len(x), dtype=torch.long) if labels is None else labels
    with probe.HookSession(model, layers, [RawSites(), *probes], mode=mode) as s:
        results, _ = s.run_batch(x, labels)
        return results, s


class Transformerish(nn.Module):
    """Two residual adds in one block (ViT): x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, d=6):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, body, d):
        super().__init__()
        self.body, self.fc = body, nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_two_sites_in_one_block_are_split_and_the_block_keeps_its_jacobian():
    torch.manual_seed(0)
    blk = Transformerish()
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(24, 3)).eval()
    x = _x(2, 4, 6)
    jac = probe.make_probe("jacobian:n_probes=64")
    results, s = _run(model, x, probes=[jac])
    assert [i.name for i in s.layers] == ["0", "0#0", "0#1"]
    with torch.no_grad():
        h = blk.ln1(x)
        f0 = blk.attn(h, h, h, need_weights=False)[0]
        y0 = x + f0
        f1 = blk.mlp(blk.ln2(y0))
    r0, r1 = results["0#0"], results["0#1"]
    for got, want in (
        (r0["F"], f0),
        (r0["S"], x),
        (r1["F"], f1),
        (r1["S"], y0),
        (r1["Y"], y0 + f1),
    ):
        assert torch.allclose(got, want, atol=1e-6)
    assert "jac_fro2" in results["0"] and "jac_fro2" not in results["0#0"]
    # The whole block's shortcut is the identity: jac_dev2 = ||J - I||^2 (jacrev, float64).
    b64 = Transformerish().double()
    b64.load_state_dict(blk.state_dict())
    for n in range(2):
        with math_attention(), torch.no_grad():
            J = jacrev(lambda z: b64(z[None])[0])(x[n].double()).reshape(24, 24)
        exact = float(((J - torch.eye(24, dtype=torch.float64)) ** 2).sum().detach())
        est, se = float(results["0"]["jac_dev2"][n]), float(results["0"]["jac_dev2_se"][n])
        assert abs(est - exact) < 4 * se + 1e-4


class DropPath(nn.Module):
    """Stochastic depth with a fixed per-sample mask (train mode only), so F is computable."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tensor([2.0, 0.0]).view(2, 1))

    def forward(self, t):
        return t * self.mask if self.training else t


class SharedDropPath(nn.Module):
    """Swin: one stochastic-depth module applied to both branches."""

    def __init__(self, d=6):
        super().__init__()
        self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, d)
        self.dp = DropPath()

    def forward(self, x):
        x = x + self.dp(self.f1(x))
        return x + self.dp(self.f2(x))


def test_a_branch_module_run_twice_and_drop_path_in_training_mode_are_read_at_the_add():
    torch.manual_seed(0)
    blk = SharedDropPath()
    model = nn.Sequential(blk, nn.Linear(6, 3))
    x = _x(2, 6)
    results, _ = _run(model, x, mode="train")
    with torch.no_grad():
        f0 = blk.f1(x) * blk.dp.mask  # after DropPath, as the block adds it
        f1 = blk.f2(x + f0) * blk.dp.mask
    assert torch.allclose(results["0#0"]["F"], f0) and torch.allclose(results["0#1"]["F"], f1)
    assert float(results["0#0"]["F"][1].abs().max()) == 0.0  # sample 1 dropped


class PreActDown(nn.Module):
    """Pre-activation downsampling block: S = down(norm(x)), not down(x)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(2)
        self.down = nn.Conv2d(2, 3, 1, stride=2)
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        z = torch.relu(self.norm(x))
        return self.conv2(torch.relu(self.conv1(z))) + self.down(z)


def test_jac_dev2_is_measured_against_the_shortcut_the_block_computes():
    torch.manual_seed(0)
    blk = PreActDown()
    with torch.no_grad():
        blk.norm.running_mean.normal_()
        blk.norm.running_var.uniform_(0.5, 2)
        blk.norm.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(12, 3)).eval()
    x = _x(2, 2, 4, 4)
    results, _ = _run(model, x, probes=[probe.make_probe("jacobian:n_probes=256")])
    r = results["0"]
    with torch.no_grad():
        assert torch.allclose(r["S"], blk.down(torch.relu(blk.norm(x))), atol=1e-6)
    b64 = PreActDown().double().eval()
    b64.load_state_dict(blk.state_dict())
    for n in range(2):
        xn = x[n : n + 1].double()
        J = jacrev(b64)(xn).reshape(12, 32)
        P = jacrev(lambda z: b64.down(torch.relu(b64.norm(z))))(xn).reshape(12, 32)
        P_naive = jacrev(b64.down)(xn).reshape(12, 32)
        exact = float(((J - P) ** 2).sum().detach())
        naive = float(((J - P_naive) ** 2).sum().detach())
        est, se = float(r["jac_dev2"][n]), float(r["jac_dev2_se"][n])
        assert abs(est - exact) < 4 * se, (est, exact, se)
        assert abs(naive - exact) > 8 * se  # the test can tell the two shortcut maps apart


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        x += self.f(x)
        return x


class InPlaceBranchThenReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        out = self.f(x)
        out += x
        return torch.relu_(out)


def _split_between_layers(blk):
    """The raw split of ``blk`` between two linear layers, its input h and its branch f(h)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), blk, nn.Linear(4, 3)).eval()
    x = _x(3, 4)
    results, _ = _run(model, x)
    with torch.no_grad():
        h = model[0](x)
        return results["1"], h, blk.f(h)


@pytest.mark.parametrize("cls", [InPlaceInput, InPlaceBranchThenReLU])
def test_in_place_adds_and_later_in_place_ops_keep_the_operands(cls):
    r, h, f = _split_between_layers(cls())
    assert torch.allclose(r["S"], h) and torch.allclose(r["F"], f)
    assert torch.allclose(r["Y"], (h + f) if cls is InPlaceInput else torch.relu(h + f))


class MaybeResidual(nn.Module):
    """InvertedResidual: the shortcut exists only on some instances."""

    def __init__(self, use_res):
        super().__init__()
        self.use_res = use_res
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.f(x) if self.use_res else self.f(x)


def test_only_instances_that_add_their_input_are_sites():
    model = nn.Sequential(MaybeResidual(True), MaybeResidual(False), MaybeResidual(True)).eval()
    results, s = _run(model, _x(2, 4))
    assert [i.name for i in s.layers] == ["0", "2"]
    with pytest.warns(probe.NoResidualWarning, match="1"):
        results, _ = _run(model, _x(2, 4), layers=["1"], probes=[probe.ResidualNorms()])
    assert "f_norm" not in results["1"] and "y_norm" in results["1"]


class Loop(nn.Module):
    """Residual adds in the parent: x = x + blk(x)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.fc(x)


def test_sites_in_the_parent_are_keyed_by_the_block_they_wrap():
    torch.manual_seed(0)
    model = Loop().eval()
    x = _x(2, 4)
    results, s = _run(model, x, probes=[probe.make_probe("jacobian:n_probes=64")])
    assert [i.name for i in s.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        h = model.stem(x)
        for i, blk in enumerate(model.blocks):
            r = results[f"blocks.{i}"]
            assert torch.allclose(r["X"], h) and torch.allclose(r["F"], blk(h))
            h = h + blk(h)
            assert torch.allclose(r["Y"], h)
    # The site's map is z -> z + blk(z), its shortcut the identity.
    m64 = Loop().double().eval()
    m64.load_state_dict(model.state_dict())
    z = m64.stem(x.double())
    J = jacrev(lambda v: v + m64.blocks[0](v))(z[0])
    exact = float(((J - torch.eye(4, dtype=torch.float64)) ** 2).sum().detach())
    r = results["blocks.0"]
    assert abs(float(r["jac_dev2"][0]) - exact) < 4 * float(r["jac_dev2_se"][0]) + 1e-6


class Twins(nn.Module):
    """a(x) + b(x) with a, b of the same size: no operand is the shortcut."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_an_add_whose_operands_cannot_be_told_apart_is_no_site():
    assert discover_sites(nn.Sequential(Twins()).eval(), (_x(2, 4),)) == {}


class Fickle(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.f(x) if self.calls <= 2 else self.f(x)


def test_a_block_whose_structure_changes_between_batches_stops_the_capture():
    model = nn.Sequential(Fickle(), nn.Linear(4, 3)).eval()
    with pytest.raises(ProbeError, match="ran 0 residual add"):
        probe.capture(model, [_x(2, 4), _x(2, 4, seed=1)], probes=[probe.ResidualNorms()])


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.armed = False

    def forward(self, x):
        y = x + self.f(x)
        if self.armed:
            raise RuntimeError("boom")
        return y


def test_an_error_inside_a_traced_block_leaves_no_hook_and_no_mode_behind():
    blk = Boom()
    model = nn.Sequential(blk, nn.Linear(4, 3)).eval()
    with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s:
        s.run_batch(_x(2, 4), torch.zeros(2, dtype=torch.long))
        blk.armed = True
        with pytest.raises(RuntimeError, match="boom"):
            s.run_batch(_x(2, 4), torch.zeros(2, dtype=torch.long))
    assert torch._C._len_torch_function_stack() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    blk.armed = False
    assert torch.allclose(model(_x(2, 4)), model(_x(2, 4)))


def test_capture_equals_an_unhooked_forward_and_changes_nothing():
    torch.manual_seed(0)
    model = Loop().eval()
    x = _x(5, 4)
    with torch.no_grad():
        want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s:
            _, logits = s.run_batch(x, torch.zeros(5, dtype=torch.long))
    assert torch.equal(logits, want)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert np.isfinite(logits.numpy()).all()


def test_deleting_a_block_of_any_model_zeroes_its_branches_at_the_add():
    import analyses

    torch.manual_seed(0)
    blk = PreActDown().eval()
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(12, 3)).eval()
    x = _x(2, 2, 4, 4)
    with torch.no_grad(), analyses.deleted(model, ["0"]):
        got = model[0](x)
    with torch.no_grad():
        assert torch.allclose(got, blk.down(torch.relu(blk.norm(x))))
    with (
        pytest.raises(ProbeError, match="no residual add"),
        torch.no_grad(),
        analyses.deleted(model, ["2"]),
    ):
        model(x)


def test_gradients_at_traced_sites_equal_autograd():
    torch.manual_seed(0)
    blk = Transformerish()
    model = nn.Sequential(blk, nn.Flatten(), nn.Linear(24, 3)).eval()
    x, y = _x(3, 4, 6), torch.tensor([0, 2, 1])
    results, _ = _run(model, x, probes=[probe.GradNorms()], labels=y)
    # Direct: dL/d(site input) and dL/d(site output) by autograd on a hand-written forward.
    xr = x.clone().requires_grad_(True)
    h = blk.ln1(xr)
    y0 = xr + blk.attn(h, h, h, need_weights=False)[0]
    y0.retain_grad()
    y1 = y0 + blk.mlp(blk.ln2(y0))
    y1.retain_grad()
    loss = nn.functional.cross_entropy(model[2](y1.flatten(1)), y, reduction="sum")
    loss.backward()
    norms = lambda g: g.flatten(1).norm(dim=1)  # noqa: E731
    assert torch.allclose(results["0#0"]["grad_x_norm"], norms(xr.grad), rtol=1e-4)
    assert torch.allclose(results["0#0"]["grad_y_norm"], norms(y0.grad), rtol=1e-4)
    assert torch.allclose(results["0#1"]["grad_x_norm"], norms(y0.grad), rtol=1e-4)
    assert torch.allclose(results["0#1"]["grad_y_norm"], norms(y1.grad), rtol=1e-4)


class ScaledAdd(nn.Module):
    """``torch.add(a, b, alpha=k)`` is a + k·b: k scales whichever operand comes second."""

    def __init__(self, branch_first: bool, k: float, inplace: bool):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.branch_first, self.k, self.inplace = branch_first, k, inplace

    def forward(self, x):
        f = self.f(x)
        a, b = (f, x) if self.branch_first else (x.clone() if self.inplace else x, f)
        return a.add_(b, alpha=self.k) if self.inplace else torch.add(a, b, alpha=self.k)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("branch_first", [False, True])
def test_a_scaled_add_splits_into_the_operands_it_adds(branch_first, inplace):
    blk = ScaledAdd(branch_first, 0.5, inplace)
    r, h, f = _split_between_layers(blk)
    F, S = (f, 0.5 * h) if branch_first else (0.5 * f, h)
    assert torch.allclose(r["F"], F) and torch.allclose(r["S"], S)
    assert torch.allclose(r["F"] + r["S"], r["Y"]) and torch.allclose(r["Y"], blk(h))
    assert float(r["F"].norm()) > 0.1 * float(r["S"].norm())  # a branch the check can see


def test_a_scaled_shortcut_is_no_identity_for_the_jacobian():
    torch.manual_seed(0)
    blk = ScaledAdd(branch_first=True, k=0.5, inplace=False)
    model = nn.Sequential(blk, nn.Linear(4, 3)).eval()
    x = _x(2, 4)
    results, _ = _run(model, x, probes=[probe.make_probe("jacobian:n_probes=256")])
    r = results["0"]
    b64 = ScaledAdd(branch_first=True, k=0.5, inplace=False).double().eval()
    b64.load_state_dict(blk.state_dict())
    for n in range(2):
        J = jacrev(b64)(x[n : n + 1].double()).detach().reshape(4, 4)
        exact = float(((J - 0.5 * torch.eye(4, dtype=torch.float64)) ** 2).sum())
        as_identity = float(((J - torch.eye(4, dtype=torch.float64)) ** 2).sum())
        est, se = float(r["jac_dev2"][n]), float(r["jac_dev2_se"][n])
        assert abs(est - exact) < 4 * se, (est, exact, se)
        assert abs(as_identity - exact) > 8 * se  # the test tells P = 0.5 I from P = I


class Subtracted(nn.Module):
    """y = x − k·f(x), written four ways: F = −k·f(x), S = x."""

    def __init__(self, how: str):
        super().__init__()
        self.f, self.how = nn.Linear(4, 4), how

    def forward(self, x):
        f = self.f(x)
        if self.how == "operator":
            return x - f
        if self.how == "alpha":
            return x.sub(f, alpha=2.0)
        if self.how == "inplace":
            y = x.clone()
            y -= f
            return y
        return torch.subtract(x, f)


SUB_SCALE = {"operator": 1.0, "alpha": 2.0, "inplace": 1.0, "subtract": 1.0}


@pytest.mark.parametrize("how", list(SUB_SCALE))
def test_a_subtracted_branch_is_a_site_whose_branch_is_minus_f(how):
    blk = Subtracted(how)
    r, h, f = _split_between_layers(blk)
    assert torch.allclose(r["F"], -SUB_SCALE[how] * f) and torch.allclose(r["S"], h)
    assert torch.allclose(r["F"] + r["S"], r["Y"]) and torch.allclose(r["Y"], blk(h))


class SubtractsTheStream(nn.Module):
    """PoolFormer's pooling mixer, pool(x) − x: the stream is subtracted, no shortcut."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool1d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x[:, None])[:, 0] - x


def test_subtracting_the_stream_itself_is_no_site():
    model = nn.Sequential(SubtractsTheStream(), nn.Linear(4, 3)).eval()
    with pytest.raises(ProbeError, match="No residual sites"):
        _run(model, _x(3, 4))


class LoopOverChildren(nn.Module):
    """A parent adding (c = k) or subtracting (c = -1) its children in turn: x + c·child(x)."""

    def __init__(self, c: float):
        super().__init__()
        self.blocks, self.c = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), c

    def forward(self, x):
        for b in self.blocks:
            x = x - b(x) if self.c == -1 else x.add(b(x), alpha=self.c)
        return x


@pytest.mark.parametrize("c", [0.25, -1.0])
def test_a_parent_keys_its_children_with_the_coefficient_in_their_maps(c):
    torch.manual_seed(0)
    loop = LoopOverChildren(c)
    model = nn.Sequential(loop, nn.Linear(4, 3)).eval()
    x = _x(3, 4)
    results, _ = _run(model, x, probes=[probe.make_probe("jacobian:n_probes=256")])
    l64 = LoopOverChildren(c).double().eval()
    l64.load_state_dict(loop.state_dict())
    h, h64 = x, x.double()
    for i, (b, b64) in enumerate(zip(loop.blocks, l64.blocks)):
        r = results[f"0.blocks.{i}"]
        with torch.no_grad():
            assert torch.allclose(r["F"], c * b(h)) and torch.allclose(r["S"], h)
            assert torch.allclose(r["Y"], h + c * b(h))
        for n in range(3):
            J = jacrev(lambda z, b64=b64: z + c * b64(z))(h64[n : n + 1]).detach().reshape(4, 4)
            exact = float(((J - torch.eye(4, dtype=torch.float64)) ** 2).sum())
            est, se = float(r["jac_dev2"][n]), float(r["jac_dev2_se"][n])
            assert abs(est - exact) < 4 * se, (est, exact, se)
            if abs(c) != 1:  # read as z + child(z), the map would give ||W||^2
                assert abs(float((b64.weight.detach() ** 2).sum()) - exact) > 8 * se
        with torch.no_grad():
            h, h64 = h + c * b(h), h64 + c * b64(h64)


@pytest.mark.parametrize(
    "block",
    [
        ScaledAdd(True, 0.5, False),
        ScaledAdd(False, -2.0, False),
        Subtracted("operator"),
        Subtracted("alpha"),
        LoopOverChildren(0.25),
        LoopOverChildren(-1.0),
    ],
)
def test_the_conformance_check_reads_scaled_adds_and_subtractions_as_the_fx_graph_does(block):
    from probe.conformance import check_sites

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), block, nn.Linear(4, 3)).eval()
    row = check_sites(model, _x(3, 4), name=type(block).__name__)
    assert row.fx_checked == row.sites > 0
    assert row.max_fs_error < 1e-6 and row.max_act_error < 1e-6, row


class CallsGrandchildren(nn.Module):
    """A parent calling the members of an nn.Sequential directly: x + body[k](x)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x):
        x = x + self.body[0](x)
        return x + self.body[1](x)


def test_sites_whose_branches_are_grandchildren_are_read_at_every_batch():
    torch.manual_seed(0)
    model = nn.Sequential(CallsGrandchildren(), nn.Linear(4, 3)).eval()
    x = _x(3, 4)
    results, _ = _run(model, x)
    h = x
    with torch.no_grad():
        for k, b in enumerate(model[0].body):
            r = results[f"0.body.{k}"]
            assert torch.allclose(r["F"], b(h)) and torch.allclose(r["S"], h)
            h = h + b(h)
            assert torch.allclose(r["Y"], h)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = Subtracted("operator"), Subtracted("operator"), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_flattened_fx_graph_is_refused_and_a_traced_block_is_not():
    torch.manual_seed(0)
    flat = torch.fx.symbolic_trace(TwoBlocks().eval())
    with pytest.raises(ProbeError, match="torch.fx GraphModule whose code calls modules inside"):
        _run(flat, _x(3, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in flat.modules())
    # one block traced on its own keeps its code: its adds are its own
    blk = Subtracted("operator")
    model = nn.Sequential(torch.fx.symbolic_trace(blk), nn.Linear(4, 3)).eval()
    results, _ = _run(model, _x(3, 4))
    with torch.no_grad():
        assert torch.allclose(results["0"]["F"], -blk.f(_x(3, 4)))


class ReturnsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ScaledAdd(False, 1.0, False)

    def forward(self, x):
        return {"features": self.block(x)}


def test_a_model_returning_a_mapping_is_captured_by_probes_that_need_no_logits():
    model = ReturnsFeatures().eval()
    cap = probe.capture(model, [(_x(3, 4), torch.zeros(3, dtype=torch.long), torch.arange(3))],
                        layers="auto", probes=["residual"])  # fmt: skip
    with torch.no_grad():
        want = model.block.f(_x(3, 4)).norm(dim=1)
    np.testing.assert_allclose(cap["block"]["f_norm"], want.numpy(), rtol=1e-6)


class WholeNetInOneForward(nn.Module):
    """A pre-activation residual MLP written in one forward, after a stem: h + f(relu(h))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 4)
        self.fs = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        for f in self.fs:
            h = h + f(torch.relu(h))
        return self.head(h)


def _by_hand(model, streams, labels):
    """The rest of a one-forward net's pass by hand from its first ``streams`` (the first a
    leaf): every stream after h + f(relu(h)), and the loss gradient at each but the last."""
    for f in model.fs:
        streams.append(streams[-1] + f(torch.relu(streams[-1])))
    loss = torch.nn.functional.cross_entropy(model.head(streams[-1]), labels, reduction="sum")
    return streams, torch.autograd.grad(loss, streams[:-1])


def test_the_x_of_each_of_several_sites_is_the_stream_that_enters_it():
    torch.manual_seed(0)
    model = WholeNetInOneForward().eval()
    x, labels = _x(3, 5), torch.tensor([0, 1, 2])
    results, _ = _run(model, x, probes=[probe.make_probe("grad")], labels=labels)
    streams, grads = _by_hand(model, [model.stem(x).detach().requires_grad_(True)], labels)
    for k in range(3):
        r = results[f"model#{k}"]
        # until 2026-12-05 the first site's x was the model's input (5 features, not the stream)
        assert torch.allclose(r["X"], streams[k].detach()), k
        assert torch.allclose(r["S"], streams[k].detach())
        np.testing.assert_allclose(r["grad_x_norm"], grads[k].norm(dim=1).numpy(), rtol=1e-5)


def test_a_network_in_one_forward_is_written_to_hdf5_as_its_sites(tmp_path):
    torch.manual_seed(0)
    model = WholeNetInOneForward().eval()
    batches = [(_x(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6))]
    mem = probe.capture(model, batches, layers="auto", probes=["residual", "grad"])
    # until 2026-12-05 the model itself was a 'block' keyed '' and the file broke its schema
    probe.capture(model, batches, layers="auto", probes=["residual", "grad"], out=tmp_path / "r.h5")
    with probe.open(tmp_path / "r.h5") as cap:
        assert cap.layers == mem.layers == ["model#0", "model#1", "model#2"]
        for k in cap.layers:
            for q in mem[k]:
                np.testing.assert_array_equal(cap.read(k, q), mem[k][q])


class ProjectionFirstInOneForward(nn.Module):
    """A network in one forward whose first site has a projection shortcut after a stem:
    h = stem(x); h = proj(h) + f0(relu(h)); then h + f(relu(h))."""

    def __init__(self):
        super().__init__()
        self.stem, self.proj = nn.Linear(5, 4), nn.Linear(4, 6)
        self.f0 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))  # heavier than proj
        self.fs = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.stem(x)
        h = self.proj(h) + self.f0(torch.relu(h))
        for f in self.fs:
            h = h + f(torch.relu(h))
        return self.head(h)


def test_the_x_of_a_first_projection_site_after_a_stem_is_the_stem_output():
    torch.manual_seed(0)
    model = ProjectionFirstInOneForward().eval()
    x, labels = _x(3, 5), torch.tensor([0, 1, 2])
    results, _ = _run(model, x, probes=[probe.make_probe("grad")], labels=labels)
    h = model.stem(x).detach().requires_grad_(True)
    streams, grads = _by_hand(model, [h, model.proj(h) + model.f0(torch.relu(h))], labels)
    for k in range(3):
        r = results[f"model#{k}"]
        # until 2026-12-05 the first site's x was the model's input (5 features, not the stem's 4)
        assert torch.allclose(r["X"], streams[k].detach()), k
        np.testing.assert_allclose(r["grad_x_norm"], grads[k].norm(dim=1).numpy(), rtol=1e-5)
    assert torch.allclose(results["model#0"]["S"], model.proj(h).detach())


def test_sites_are_selected_by_key_without_their_block():
    """A '#' in a layer pattern names sites by key: `body.*#1` is each block's second site alone
    (its output is the block's), no whole-block entry, no first site; mixed with module names
    the entries keep forward order; a key that matches nothing is an error naming the keys."""
    torch.manual_seed(0)
    body = nn.Sequential(Transformerish(), Transformerish())
    model = Head(body, 24).eval()
    x = _x(3, 4, 6)
    results, s = _run(model, x, layers="body.*#1")
    assert [i.name for i in s.layers] == list(results) == ["body.0#1", "body.1#1"]
    every, s = _run(model, x, layers="body.*")  # the blocks and all their sites
    names = ["body.0", "body.0#0", "body.0#1", "body.1", "body.1#0", "body.1#1"]
    assert [i.name for i in s.layers] == names
    for key, got in results.items():
        assert got.keys() == every[key].keys() and got["F"].abs().max() > 0
        assert all(torch.equal(got[q], every[key][q]) for q in got)
    with torch.no_grad():  # an unhooked pass: attention's fast path rounds otherwise
        y0 = body[0](x)
        torch.testing.assert_close(results["body.0#1"]["Y"], y0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results["body.1#1"]["Y"], body[1](y0), rtol=1e-6, atol=1e-6)
    _, s = _run(model, x, layers=["body.1", "re:body\\.0#0"])
    assert [i.name for i in s.layers] == ["body.0#0", "body.1", "body.1#0", "body.1#1"]
    with pytest.raises(
        probe.ProbeError, match=r"No residual site is keyed 'body\.\*#2'.*body\.0#0"
    ):
        _run(model, x, layers="body.*#2")


def test_select_sites_matches_keys_in_their_order():
    from probe.hooks.select import select_sites

    keys = ["b.0#0", "b.0#1", "b.1#0", "b.1#1", "loop.3"]
    assert select_sites(["b.1#*", "b.0#1"], keys) == ["b.0#1", "b.1#0", "b.1#1"]
    assert select_sites(["re:b\\.\\d#0"], keys) == ["b.0#0", "b.1#0"]
    with pytest.raises(probe.ProbeError, match="b.0#0, b.0#1, b.1#0, b.1#1"):
        select_sites(["c#0"], keys)
