"""Blocks whose residual split cannot be read correctly stop the capture with a ProbeError that
names the block, instead of giving wrong numbers."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import probe
from probe.errors import ProbeError


class InPlaceInput(nn.Module):
    """x += f(x): after the forward, x already holds y."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        x += self.f(x)
        return x


class InPlaceBranch(nn.Module):
    """out = f(x); out += x: the stored F(x) becomes y unless it was copied."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        out = self.f(x)
        out += x
        return torch.relu(out)


class TwiceBranch(nn.Module):
    """The branch module runs twice per call (shared weights), so F(x) is ambiguous."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return x + self.f(torch.relu(self.f(x)))


class KeywordInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, *, hidden, scale=None):
        return hidden + self.f(hidden)


class KeywordNet(nn.Module):
    def __init__(self, two=False):
        super().__init__()
        self.block = KeywordInput()
        self.two = two

    def forward(self, x):
        return self.block(hidden=x, scale=x if self.two else None).flatten(1)


def _register(cls, clone=False):
    probe.register_residual(cls, probe.ResidualSpec(branch="f", shortcut=None, clone_branch=clone))


def _x():
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "cls,match",
    [(InPlaceInput, "modified its input in place"), (TwiceBranch, "ran 2 times")],
)
def test_unreadable_blocks_raise_and_name_the_block(cls, match):
    _register(cls)
    model = nn.Sequential(cls())
    with pytest.raises(ProbeError, match=match) as e:
        probe.capture(model, [_x()], probes=[probe.ResidualNorms()])
    assert "'0'" in str(e.value)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks  # hooks removed


def test_in_place_branch_without_clone_raises_and_with_clone_is_right():
    _register(InPlaceBranch, clone=False)
    model = nn.Sequential(InPlaceBranch()).eval()
    with pytest.raises(ProbeError, match="clone_branch=True"):
        probe.capture(model, [_x()], probes=[probe.ResidualNorms()])
    _register(InPlaceBranch, clone=True)
    cap = probe.capture(model, [_x()], probes=[probe.ResidualNorms()])
    with torch.no_grad():
        f = model[0].f(_x())
    assert torch.allclose(torch.from_numpy(cap.read("0", "f_norm")), f.flatten(1).norm(dim=1))


def test_a_block_called_with_its_input_as_a_keyword_is_measured():
    _register(KeywordInput)
    model = KeywordNet().eval()
    cap = probe.capture(model, [_x()], probes=[probe.ResidualNorms()])
    x = _x()
    assert torch.allclose(torch.from_numpy(cap.read("block", "s_norm")), x.flatten(1).norm(dim=1))


def test_a_block_with_two_tensor_keywords_is_refused():
    _register(KeywordInput)
    with pytest.raises(ProbeError, match="ambiguous"):
        probe.capture(KeywordNet(two=True), [_x()], probes=[probe.ResidualNorms()])


@pytest.mark.parametrize(
    "shape,layout,axis",
    [
        ((3, 5, 8), "auto", 2),
        ((3, 4, 4, 8), "NHWC", 3),
        ((3, 8, 4, 4), "auto", 1),
        ((3, 8, 6), "NCL", 1),
    ],
)
def test_channel_statistics_reduce_over_everything_but_the_layouts_channel_axis(
    shape, layout, axis
):
    t = torch.randn(*shape, dtype=torch.float64)
    call = probe.Call("l", nn.Identity(), None, t, 0)
    out = probe.ChannelStats(layout=layout).forward(call)
    moved = t.movedim(axis, -1).reshape(shape[0], -1, shape[axis]).numpy()  # [N, positions, C]
    assert out["channel_mean"].shape == (shape[0], shape[axis])
    assert torch.allclose(out["channel_mean"], torch.from_numpy(moved.mean(1)))
    assert torch.allclose(out["channel_var"], torch.from_numpy(moved.var(1)))


class Block1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv1d(c, c, 3, padding=1), nn.Tanh(), nn.Conv1d(c, c, 3, padding=1)
        )

    def forward(self, x):
        return torch.relu(x + self.f(x))


class Net1d(nn.Module):
    """A 1-D convolutional net (audio, time series): its block outputs are [N, C, L]."""

    def __init__(self, c: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv1d(2, c, 3, padding=1)
        self.blocks = nn.Sequential(Block1d(c), Block1d(c))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean(2)


@pytest.mark.parametrize(
    "make",
    [
        probe.ChannelStats,
        lambda: probe.Activations(spatial_stride=2),
        lambda: probe.Activations(which="input"),
    ],
)
def test_the_auto_layout_refuses_three_axis_maps_of_1d_convolutions(make):
    """[N, C, L] read as tokens [N, T, C] took the positions for channels: every channel
    statistic was that of a position, and a spatial stride thinned nothing."""
    model = Net1d().eval()
    with pytest.raises(ProbeError, match=r"'blocks.0'(?s:.*)Conv1d(?s:.*)layout='NCL' or 'NTC'"):
        probe.capture(model, [torch.randn(3, 2, 9)], probes=[make()])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Outer1d(nn.Module):
    """A residual unit around another: both are traced, the outer one still running when the
    inner one's first call is refused."""

    def __init__(self, c: int = 5) -> None:
        super().__init__()
        self.inner = Block1d(c)
        self.g = nn.Conv1d(c, c, 1)

    def forward(self, x):
        return x + self.g(self.inner(x))


class Conv1dHead(nn.Module):
    """[N, C, L] maps in, [N, C * L] features out."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_only_the_tensors_an_auto_layout_reads_are_checked():
    """A layer's three-axis input makes it ambiguous only to a probe that reads inputs by the
    'auto' layout: not to 'auto' channel statistics of its [N, F] output beside inputs kept
    with their layout given."""
    model = nn.Sequential(Conv1dHead()).eval()
    x = torch.randn(2, 4, 5)
    probes = [probe.ChannelStats(), probe.Activations(which="input", layout="NCL", dtype="fp32")]
    cap = probe.capture(model, [x], layers="0", probes=probes)
    assert np.allclose(cap.read("0", "input"), x.numpy())
    with torch.no_grad():
        assert np.allclose(cap.read("0", "channel_mean"), model(x).numpy())  # one position each
    with pytest.raises(ProbeError, match=r"gives an input of shape \[2, 4, 5\]"):
        probe.capture(model, [x], layers="0", probes=[probe.Activations(which="input")])


def test_a_refused_layer_inside_a_traced_unit_is_one_error_and_no_warning():
    """The outer unit's forward raised with the error; its add-counting hook, which torch runs
    anyway, reported a second error that torch printed as a warning beside the first."""
    model = nn.Sequential(nn.Conv1d(2, 5, 1), Outer1d()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ProbeError, match="layout='NCL' or 'NTC'"):
            probe.capture(model, [torch.randn(3, 2, 9)], probes=[probe.ChannelStats()])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_1d_maps_with_their_layout_given_are_measured_per_channel():
    torch.manual_seed(0)
    model = Net1d().eval().double()
    x = torch.randn(3, 2, 9, dtype=torch.float64)
    cap = probe.capture(
        model, [x], probes=[probe.ChannelStats(layout="NCL"), probe.Activations(
            dtype="fp32", spatial_stride=2, layout="NCL")]
    )  # fmt: skip
    with torch.no_grad():
        h = model.stem(x)
        for i, block in enumerate(model.blocks):
            f, h = block.f(h), block(h)
            key = f"blocks.{i}"
            assert np.allclose(cap.read(key, "channel_mean"), h.mean(2).numpy())
            assert np.allclose(cap.read(key, "channel_var"), h.var(2, unbiased=False).numpy())
            assert np.allclose(cap.read(key, "f_channel_mean"), f.mean(2).numpy())
            assert np.allclose(cap.read(key, "output"), h[:, :, ::2].float().numpy())
    # tokens are still read as tokens: a transformer-like layer with no 1-D convolution
    tokens = nn.Sequential(nn.Linear(4, 4))
    cap = probe.capture(tokens, [torch.randn(2, 7, 4)], layers="0", probes=[probe.ChannelStats()])
    assert cap.read("0", "channel_mean").shape == (2, 4)


class Mixed1d2d(nn.Module):
    """2-D maps, then 1-D maps of their flattened positions: tensors of two ranks (as in
    EfficientViM)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.two = Block2d(c)
        self.one = Block1d(c)

    def forward(self, x):
        return self.one(self.two(self.stem(x)).flatten(2)).mean(2)


class Block2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.f(x))


def test_a_layout_per_rank_reads_each_tensor_by_its_own():
    torch.manual_seed(0)
    model = Mixed1d2d().eval().double()
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(ProbeError, match=r"no layout of 4 axes(?s:.*)NCL/NCHW"):
        probe.capture(model, [x], probes=[probe.ChannelStats(layout="NCL")])
    cap = probe.capture(model, [x], probes=[probe.ChannelStats(layout="NCL/NCHW")])
    with torch.no_grad():
        two = model.two(model.stem(x))
        one = model.one(two.flatten(2))
    assert np.allclose(cap.read("two", "channel_mean"), two.mean((2, 3)).numpy())
    assert np.allclose(cap.read("one", "channel_mean"), one.mean(2).numpy())
    assert np.allclose(cap.read("one", "channel_var"), one.var(2, unbiased=False).numpy())


@pytest.mark.parametrize("bad", ["NCL/NTC", "NCL/", "NCHW/XY", "ncl"])
def test_bad_layouts_are_refused_with_what_is_allowed(bad):
    with pytest.raises(ProbeError, match=r"Invalid layout(?s:.*)NCL/NCHW"):
        probe.ChannelStats(layout=bad)


class Scaled(nn.Module):
    """y = x + scale * f(x): the Jacobian depends on the keyword the block is called with."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, scale=1.0):
        return x + scale * torch.tanh(self.f(x))


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Scaled()

    def forward(self, x):
        scale = torch.linspace(0.5, 3.0, len(x), dtype=x.dtype).view(-1, 1, 1, 1)  # per sample
        return self.block(x, scale=scale).flatten(1)


def test_jacobians_are_taken_with_the_arguments_the_block_was_called_with():
    from probe.jacobian import JacobianNorms
    from probe.jacobian.estimators import exact_jacobian

    _register(Scaled)
    model = ScaledNet().double().eval()
    x = _x().double()
    cap = probe.capture(model, [x], probes=[JacobianNorms(n_probes=512, max_samples=2)])
    scale = torch.linspace(0.5, 3.0, len(x), dtype=x.dtype).view(-1, 1, 1, 1)
    exact = torch.stack(
        [
            (
                exact_jacobian(lambda z, s=scale[n : n + 1]: model.block(z, scale=s), x[n : n + 1])
                ** 2
            ).sum()
            for n in range(2)
        ]
    )
    got, se = cap.read("block", "jac_fro2"), cap.read("block", "jac_fro2_se")
    assert got.shape == (2,)
    assert np.all(np.abs(got - exact.detach().numpy()) <= 4 * se), (got, exact, se)


class MaybeProjected(nn.Module):
    """RegNet: ``proj`` is a module on some instances and None on others."""

    def __init__(self, project):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4) if project else None

    def forward(self, x):
        return (self.proj(x) if self.proj is not None else x) + self.f(x)


def test_an_adapter_shortcut_that_is_none_on_an_instance_is_the_identity():
    probe.register_residual(MaybeProjected, probe.ResidualSpec(branch="f", shortcut="proj"))
    model = nn.Sequential(MaybeProjected(True), MaybeProjected(False)).eval()
    x = _x().flatten(1)[:, :4]
    cap = probe.capture(model, [x], probes=[probe.ResidualNorms()])
    with torch.no_grad():
        h = model[0](x)
        s0 = model[0].proj(x)
    assert np.allclose(cap.read("0", "s_norm"), s0.norm(dim=1).numpy(), rtol=1e-5)
    assert np.allclose(cap.read("1", "s_norm"), h.norm(dim=1).numpy(), rtol=1e-5)


def test_an_adapter_that_does_not_fit_names_the_block():
    probe.register_residual(MaybeProjected, probe.ResidualSpec(branch="g", shortcut="proj"))
    with pytest.raises(ProbeError, match="'1'.*lacks"):
        probe.capture(
            nn.Sequential(nn.Linear(4, 4), MaybeProjected(False)), [torch.ones(2, 4)],
            probes=[probe.ResidualNorms()],
        )  # fmt: skip


@pytest.mark.parametrize("cls", [InPlaceInput, InPlaceBranch, TwiceBranch])
def test_output_only_probes_read_blocks_with_an_unreadable_split_rightly(cls):
    """Block outputs alone need no split: no hook on the branch, none of the split's errors, and
    the outputs are the blocks' own, also where the next block adds into its input in place."""
    _register(cls)
    model = nn.Sequential(cls(), cls()).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 2, 4, 4, generator=g) for _ in range(3)]
    want: dict[str, list[torch.Tensor]] = {"0": [], "1": []}
    handles = [
        model[i].register_forward_hook(lambda m, a, o, k=str(i): want[k].append(o.clone()))
        for i in range(2)
    ]
    with torch.no_grad():
        for x in batches:
            model(x.clone())  # the first block may write into its input
    for h in handles:
        h.remove()
    with probe.HookSession(model, ["0", "1"], [probe.Activations(dtype="fp32")]) as s:
        assert not model[0].f._forward_hooks and not model[0]._forward_pre_hooks
        for b, x in enumerate(batches):
            got = s.run_batch(x.clone(), torch.zeros(3, dtype=torch.long))[0]
            for k in ("0", "1"):
                assert torch.equal(got[k]["output"], want[k][b]), (k, b)


def test_output_only_blocks_keep_every_layer_attribute_but_the_unseen_branch_shape():
    model = probe.zoo.create("resnet8", in_channels=2, width=4).eval()
    data = [_x()]
    a = probe.capture(model, data, probes=[probe.Activations(dtype="fp32")])
    b = probe.capture(model, data, probes=[probe.Activations(dtype="fp32"), probe.ResidualNorms()])
    assert a.layers == b.layers
    for key in a.layers:
        split = dict(b.layer_attrs(key))
        assert split.pop("f_spatial_size") > 0  # F was read by the split ...
        assert a.layer_attrs(key) == split  # ... and is not claimed where it was not
        assert np.array_equal(a.read(key, "output"), b.read(key, "output"))


class _ComplexBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(6, 6, dtype=torch.complex64)

    def forward(self, x):
        return x + self.branch(x)


@pytest.mark.parametrize("fused", [False, True])
def test_a_complex_blocks_norms_and_cosines_are_those_of_its_real_vectors(fused):
    """A complex block's quantities are those of its tensors read as real vectors (real and
    imaginary parts): a plain product would give complex cosines, as the compiled kernels would
    (they are left to real tensors). Its channel moments are refused by name."""
    probe.register_residual(_ComplexBlock, probe.ResidualSpec(branch="branch"))
    torch.manual_seed(0)
    net = nn.Sequential(_ComplexBlock(), _ComplexBlock()).eval()
    x = torch.randn(4, 6, dtype=torch.complex64)
    cap = probe.capture(net, [x], probes=[probe.ResidualNorms(fused=fused)], layers=["0"])
    with torch.no_grad():
        f = net[0].branch(x)

    def real(t):
        return torch.view_as_real(t).reshape(4, -1).double().numpy()

    F, S = real(f), real(x)
    Y = F + S
    norm = lambda a: np.linalg.norm(a, axis=1)  # noqa: E731
    want = {
        "f_norm": norm(F),
        "y_norm": norm(Y),
        "dev_norm": norm(Y - S),
        "cos_ys": (Y * S).sum(1) / norm(Y) / norm(S),
        "cos_fs": (F * S).sum(1) / norm(F) / norm(S),
    }
    for q, ref in want.items():
        got = cap.read("0", q)
        assert not np.iscomplexobj(got), q
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=q)
    with pytest.raises(ProbeError, match="need a real tensor"):
        probe.capture(net, [x], probes=[probe.ChannelStats(fused=fused)], layers=["0"])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_a_complex_tensor_is_not_stored_without_its_imaginary_part(dtype):
    """A cast of a complex activation to a real storage dtype keeps the real part only (with a
    warning at most): the capture stops and says what to store instead."""
    probe.register_residual(_ComplexBlock, probe.ResidualSpec(branch="branch"))
    net = nn.Sequential(_ComplexBlock()).eval()
    x = torch.randn(4, 6, dtype=torch.complex64)
    with pytest.raises(ProbeError, match=r"'output' is torch.complex64 .*view_as_real"):
        probe.capture(net, [x], probes=[probe.Activations(dtype=dtype)], layers=["0"])
