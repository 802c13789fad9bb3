"""Grouped statistics (probe.probes.group): calls of equal shapes computed together give each
call's own numbers -- numpy's float64 ones and the per-call path's -- and an in-place change of a
held tensor, a byte budget, NaN and errors are all handled as without grouping."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import probe
import probe.session
from probe.cli.main import cli
from probe.conformance import RawSites
from probe.errors import ProbeError
from probe.nonfinite import NonFiniteCounter
from probe.probes import onepass
from probe.probes.base import BlockTensors, Call
from probe.probes.group import CallGroup, group_key
from probe.probes.statistics import per_sample_norm


def _x(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net(name, **kw):
    torch.manual_seed(0)
    return probe.zoo.create(name, in_channels=1, width=4, num_classes=3, **kw).eval()


class Mixer(nn.Module):
    """A token block with two residual adds, found by tracing (no adapter)."""

    def __init__(self, d=6):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))

    def forward(self, x):
        x = x + self.tok(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(self.ln2(x))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 6)
        self.blocks = nn.Sequential(*(Mixer() for _ in range(3)))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.embed(x.reshape(len(x), 4, 16))
        return self.head(self.blocks(tokens).mean(1))


def _models():
    return [
        ("resnet14", _net("resnet14")),
        ("plain14", _net("plain14")),
        ("resnet14-B", _net("resnet14", shortcut="B")),
        ("preresnet14", _net("preresnet14")),
        ("tokens", Tokens().eval()),
    ]


def _stats(fused=False):
    return [
        probe.ResidualNorms(fused=fused),
        probe.ChannelStats(fused=fused),
        probe.GradNorms(),
    ]


def _sizes(monkeypatch):
    """The sizes of the groups the session computes, in order."""
    sizes = []

    class Recorded(CallGroup):
        def __init__(self, calls):
            sizes.append(len(calls))
            super().__init__(calls)

    monkeypatch.setattr(probe.session, "CallGroup", Recorded)
    return sizes


def _run(model, probes, grouped, x, y, raw=False):
    with probe.HookSession(model, "auto", [*probes, *([RawSites()] if raw else [])],
                           grouped=grouped) as s:  # fmt: skip
        return s.run_batch(x, y)[0], s


@pytest.mark.parametrize("name,model", _models(), ids=[n for n, _ in _models()])
def test_grouped_statistics_equal_numpy_and_the_per_call_path(
    name, model, monkeypatch, statistics_reference
):
    x, y = _x()
    alone, _ = _run(model, _stats(), False, x, y)
    sizes = _sizes(monkeypatch)
    grouped, session = _run(model, _stats(), True, x, y, raw=True)
    assert max(sizes) > 1, sizes  # blocks were computed together
    assert sorted(alone) == sorted(grouped)
    blocks = 0
    for key, qs in alone.items():
        assert sorted(qs) == sorted(q for q in grouped[key] if q not in "XFSY"), key
        for q, t in qs.items():
            torch.testing.assert_close(grouped[key][q], t, rtol=1e-5, atol=1e-7, msg=f"{key}.{q}")
        if "X" in grouped[key]:
            blocks += 1
            for q, want in statistics_reference(grouped[key]).items():
                got = grouped[key][q].double().numpy()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{key}.{q}")
    assert blocks >= 3
    assert not session._group_unsafe


def test_fused_grouped_statistics_equal_the_per_call_path(monkeypatch):
    model, (x, y) = _net("resnet14"), _x()
    alone, _ = _run(model, _stats(fused=True), False, x, y)
    sizes = _sizes(monkeypatch)
    grouped, _ = _run(model, _stats(fused=True), True, x, y)
    assert max(sizes) > 1
    for key, qs in alone.items():
        for q, t in qs.items():
            torch.testing.assert_close(grouped[key][q], t, rtol=1e-5, atol=1e-7)


def test_a_resnet_is_computed_in_one_group_per_run_of_equal_shapes(monkeypatch):
    # resnet20: three stages of three blocks; the first block of stages 2 and 3 downsamples
    sizes = _sizes(monkeypatch)
    _run(_net("resnet20"), _stats(), True, *_x())
    forward, backward = sizes[:5], sizes[5:]
    assert forward == [3, 1, 2, 1, 2]
    assert backward == [2, 1, 2, 1, 3]  # in the order the gradients complete


def test_gradient_norms_grouped_equal_autograd():
    model, (x, y) = _net("resnet14"), _x()
    results, _ = _run(model, [probe.GradNorms()], True, x, y, raw=True)
    inp = x.clone().requires_grad_(True)
    outs = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o))
        for name, b in model.named_modules()
        if name in results
    ]
    try:
        loss = probe.losses.exact_cross_entropy(model(inp), y)
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    for name, g in zip(names, grads):
        want = g.flatten(1).double().norm(dim=1).float()
        torch.testing.assert_close(results[name]["grad_y_norm"], want, rtol=1e-5, atol=1e-7)


class DoubleInPlace(nn.Module):
    """Doubles its input in place: the block before it sees its output changed after its call."""

    def forward(self, x):
        return x.mul_(2)


def test_a_held_tensor_changed_in_place_runs_the_batch_again_without_grouping(
    monkeypatch, statistics_reference
):
    model = _net("resnet14")
    model.stages[1] = nn.Sequential(DoubleInPlace(), *model.stages[1])
    x, y = _x()
    probes = [probe.ResidualNorms(), probe.ChannelStats()]
    alone, _ = _run(model, probes, False, x, y)
    sizes = _sizes(monkeypatch)
    with probe.HookSession(model, "auto", [*probes, RawSites()], grouped=True) as s:
        first, _ = s.run_batch(x, y)
        assert s._group_unsafe  # and later batches are not grouped
        count = len(sizes)
        second, _ = s.run_batch(x, y)
        assert all(n == 1 for n in sizes[count:])
    for results in (first, second):
        for key, qs in alone.items():
            for q, t in qs.items():
                torch.testing.assert_close(results[key][q], t, rtol=1e-5, atol=1e-7)
        block = results["stages.0.0"]  # its y was doubled later: the numbers are the call's own
        np.testing.assert_allclose(
            block["y_norm"].numpy(), statistics_reference(block)["y_norm"], rtol=1e-5
        )


def test_a_byte_budget_splits_groups_and_changes_no_number(monkeypatch):
    model, (x, y) = _net("resnet20"), _x()
    alone, _ = _run(model, _stats(), False, x, y)
    sizes = _sizes(monkeypatch)
    monkeypatch.setattr(probe.session, "_GROUP_BYTES", 1)
    grouped, _ = _run(model, _stats(), True, x, y)
    assert set(sizes) == {1}
    for key, qs in alone.items():
        for q, t in qs.items():
            torch.testing.assert_close(grouped[key][q], t, rtol=1e-5, atol=1e-7)


def test_nonfinite_samples_are_counted_per_layer_as_without_grouping():
    model, (x, y) = _net("resnet20"), _x()
    with torch.no_grad():  # sample 2 overflows from the second stage on
        model.stages[1][0].branch[0].weight[0] = float("inf")
    x[2] = 1.0
    counts = {}
    for grouped in (False, True):
        with probe.HookSession(model, "auto", [probe.ResidualNorms(), probe.ChannelStats()],
                               grouped=grouped) as s:  # fmt: skip
            s.run_batch(x, y)
            counts[grouped] = s.nonfinite
    assert counts[True] == counts[False]
    assert "stages.1.1" in counts[True] and "stages.0.0" not in counts[True]


def test_rows_of_a_grouped_result_are_checked_with_one_reduction():
    base = torch.zeros(6, 4)
    base[4, 1] = float("nan")
    c = NonFiniteCounter()
    rows = base.view(2, 3, 4).unbind(0)
    c.add("a", rows[0])
    c.add("b", rows[1])
    c.add("c", base[:, 2:])  # columns: not runs of rows, each checked on its own
    c.add("d", base[:, :2])
    assert len(c._sums_of) == 3  # the base's rows once, and each column view
    c.end_batch()
    assert c.counts == {"b": 1, "d": 1}


def _block_call(name, x, f, y):
    return Call(name, nn.Identity(), x, y, 0, BlockTensors(x, f, x, y, True))


def test_a_chain_of_blocks_is_stacked_once_for_its_inputs_and_outputs():
    ts = [torch.randn(2, 3) for _ in range(4)]
    calls = [_block_call(str(i), ts[i], ts[i] * 0.5, ts[i + 1]) for i in range(3)]
    group = CallGroup(calls)
    xs, ys = group.stacked(lambda c: c.block.x), group.stacked(lambda c: c.block.y)
    assert torch.equal(xs, torch.cat(ts[:3])) and torch.equal(ys, torch.cat(ts[1:]))
    assert xs.untyped_storage().data_ptr() == ys.untyped_storage().data_ptr()
    assert group.stacked(lambda c: c.block.s) is xs  # S is x: the same object, as unstacked
    seen = []

    def norm(t):
        seen.append(t.shape)
        return per_sample_norm(t)

    nx, ny = group.rowwise(lambda c: c.block.x, norm), group.rowwise(lambda c: c.block.y, norm)
    assert seen == [(8, 3)]  # one reduction over the chain's four tensors
    torch.testing.assert_close(nx, torch.cat(ts[:3]).norm(dim=1))
    torch.testing.assert_close(ny, torch.cat(ts[1:]).norm(dim=1))
    parts = group.per_call({"n": ny})
    assert len(parts) == 3
    for p, t in zip(parts, ts[1:]):
        torch.testing.assert_close(p["n"], t.norm(dim=1))


def test_gradients_in_backward_order_chain_as_well():
    gs = [torch.randn(2, 3) for _ in range(4)]
    calls = []
    for i in range(3):  # call i: dL/dy = gs[i], dL/dx = gs[i + 1] (the next call's dL/dy)
        c = _block_call(str(i), torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3))
        c.grad_output, c.grad_input = gs[i], gs[i + 1]
        calls.append(c)
    group = CallGroup(calls)
    gy, gx = group.stacked(lambda c: c.grad_output), group.stacked(lambda c: c.grad_input)
    assert gy.untyped_storage().data_ptr() == gx.untyped_storage().data_ptr()
    assert torch.equal(gy, torch.cat(gs[:3])) and torch.equal(gx, torch.cat(gs[1:]))
    assert group_key(calls[0], "backward") == group_key(calls[2], "backward")


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        lambda: torch.randn(2, 3, 4, 6)[..., :5],  # not dense
        lambda: torch.randn(4, 2, 3).transpose(0, 1),  # the sample axis not outermost
    ],
    ids=["channels-last", "strided", "transposed"],
)
def test_stacks_hold_the_tensors_values_in_their_layout(make):
    from probe.probes.group import _stack

    ts = [make() for _ in range(3)]
    out = _stack(ts)
    assert torch.equal(out, torch.cat(ts))
    if ts[0].is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_net_grouped_gives_the_per_call_numbers():
    model = _net("resnet14").to(memory_format=torch.channels_last)
    x, y = _x()
    x = x.to(memory_format=torch.channels_last)
    alone, _ = _run(model, _stats(), False, x, y)
    grouped, _ = _run(model, _stats(), True, x, y)
    for key, qs in alone.items():
        for q, t in qs.items():
            torch.testing.assert_close(grouped[key][q], t, rtol=1e-5, atol=1e-7)


def test_calls_of_other_shapes_or_kinds_get_other_keys():
    t = torch.ones(2, 3)
    a, b = _block_call("a", t, t, t), _block_call("b", t, t, torch.ones(2, 4))
    layer = Call("c", nn.Identity(), t, t, 0)
    assert len({group_key(a), group_key(b), group_key(layer)}) == 3


def test_a_subclass_that_overrides_forward_is_called_per_call(monkeypatch):
    seen = []

    class Mine(probe.ResidualNorms):
        def forward(self, call):
            seen.append(call.name)
            return super().forward(call)

    sizes = _sizes(monkeypatch)
    results, _ = _run(_net("resnet14"), [Mine(), probe.ChannelStats()], True, *_x())
    assert sorted(seen) == sorted(results) and "x_norm" in results["stages.0.0"]
    assert max(sizes) > 1  # ChannelStats still grouped


def test_grouped_must_be_a_flag(tmp_path):
    with pytest.raises(ProbeError, match="grouped must be True, False or None.*'yes'"):
        probe.HookSession(_net("resnet8"), "auto", [probe.ResidualNorms()], grouped="yes")
    with pytest.raises(ProbeError, match="grouped must be True, False or None.*1"):
        probe.capture(_net("resnet8"), [_x()], probes=["residual"], out=tmp_path / "a.h5",
                      grouped=1)  # fmt: skip
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_cli_and_capture_take_grouped_and_write_the_per_call_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    args = ["capture", "--model", "zoo:resnet14", "--model-arg", "in_channels=1", "--model-arg",
            "width=4", "--data", "digits", "--limit", "40", "--batch-size", "16",
            "--probe", "residual", "--probe", "channel", "--probe", "grad"]  # fmt: skip
    sizes = _sizes(monkeypatch)
    for flag in ("--grouped", "--per-call"):
        res = CliRunner().invoke(cli, [*args, flag, "--out", str(tmp_path / f"{flag[2:]}.h5")])
        assert res.exit_code == 0, res.output
        if flag == "--grouped":
            assert max(sizes) > 1
            sizes.clear()
    assert sizes == []  # --per-call: every statistic computed at its call
    grouped, alone = probe.open(tmp_path / "grouped.h5"), probe.open(tmp_path / "per-call.h5")
    api = probe.capture(_net("resnet14"), [_x()], probes=_stats(), grouped=True)
    with grouped, alone:
        assert grouped.layers == alone.layers and len(grouped.layers) == 6
        for layer in alone.layers:
            assert grouped.quantities(layer) == alone.quantities(layer)
            for q in alone.quantities(layer):
                np.testing.assert_allclose(
                    grouped.read(layer, q), alone.read(layer, q), rtol=1e-5, atol=1e-7
                )
    assert "cos_f_grad" in api.quantities("stages.0.1")


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_an_error_after_held_calls_drops_them_and_every_hook():
    model = _net("resnet14")
    model.head = Boom()
    with probe.HookSession(model, "auto", [probe.ResidualNorms()], grouped=True) as s:
        with pytest.raises(RuntimeError, match="boom"):
            s.run_batch(*_x())
        assert s._held == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_on_cuda_under_bf16_autocast_groups_are_the_default_and_give_the_per_call_numbers(
    fused, monkeypatch
):
    """The benchmark's setting: ResNet-56, channels-last, bf16 autocast on a GPU, where grouping
    is on by default. Every quantity equals the per-call path's (float32 accumulation of the
    same bf16 values; only the order of the sums may differ; fp16 activations bit for bit)."""
    torch.manual_seed(0)
    model = probe.zoo.create("resnet56").cuda().eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g).cuda()
    y = torch.randint(0, 10, (64,), generator=g).cuda()
    runs = {}
    for grouped in (False, None):
        sizes = _sizes(monkeypatch)
        probes = [*_stats(fused), probe.Activations(dtype="fp16")]
        session = probe.HookSession(model, "auto", probes, grouped=grouped)
        with session as s, torch.autocast("cuda", dtype=torch.bfloat16):
            runs[grouped] = s.run_batch(x, y)[0]
        if grouped is None:
            assert max(sizes) == 9  # the default groups a stage's nine blocks
    for key, qs in runs[False].items():
        for q, t in qs.items():
            torch.testing.assert_close(runs[None][key][q], t, rtol=1e-4, atol=1e-6)
        assert torch.equal(runs[None][key]["output"], qs["output"])


def test_check_probe_catches_a_group_computed_in_the_wrong_order():
    from probe.testing import check_probe

    class Shuffled(probe.ResidualNorms):
        def forward_group(self, group):
            return super().forward_group(group)[::-1]

    check_probe(probe.ResidualNorms())  # the right one passes, grouped and per call
    with pytest.raises(AssertionError, match="different .* for grouped calls"):
        check_probe(Shuffled())


@pytest.mark.parametrize(
    "spec",
    ["activations:dtype=fp16", "activations:dtype=bf16", "activations:dtype=fp16,channel_stride=2",
     "activations:dtype=fp16,which=input", "activations:dtype=fp32",
     "activations:dtype=fp16,max_samples=3"],
)  # fmt: skip
def test_activations_grouped_are_each_calls_own(spec, monkeypatch):
    """Raw tensors converted once per group: each call's rows are its own tensor in the storage
    dtype, its clip counts are its own (a block whose output exceeds fp16's range), and a tensor
    kept in its own dtype (or capped) is taken call by call, as a view where it was one."""
    from probe.probes.registry import make_probe

    model, (x, y) = _net("resnet14"), _x()
    with torch.no_grad():  # the last block of the first stage overflows fp16 for every sample
        model.stages[0][1].branch.bn2.bias.fill_(1e5)
    runs = {}
    for grouped in (False, True):
        sizes = _sizes(monkeypatch)
        results, _ = _run(model, [make_probe(spec)], grouped, x, y)
        runs[grouped] = results
    alone, grouped = runs[False], runs[True]
    assert sorted(alone) == sorted(grouped)
    for key, qs in alone.items():
        assert sorted(qs) == sorted(grouped[key]), key
        for q, t in qs.items():
            assert grouped[key][q].dtype == t.dtype and torch.equal(grouped[key][q], t), (key, q)
    if "fp16" in spec and "which=input" not in spec:
        assert alone["stages.0.1"]["output_clipped"].min() > 0  # the overflow was seen
        assert int(alone["stages.0.0"]["output_clipped"].sum()) == 0  # and only there
    assert max(sizes) > 1


def test_activations_and_statistics_grouped_share_one_stack(monkeypatch):
    stacks = []
    real = probe.probes.group._stack

    def counted(tensors):
        stacks.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(probe.probes.group, "_stack", counted)
    probes = [probe.Activations(dtype="fp16"), probe.ResidualNorms(), probe.ChannelStats()]
    _run(_net("resnet14"), probes, True, *_x())
    # the first stage's two blocks are one group (the other stages' differ in shape): their x's
    # and y's are one stack of three (outputs, inputs, S = x and every probe's reads), F's one
    assert sorted(n for n in stacks if n > 1) == [2, 3]


@pytest.mark.parametrize(
    "layers,probes,mode",
    [
        ("auto", ["residual", "channel", "grad"], "train"),  # BN in training mode
        # Gradients is not groupable backward: it runs at each call, GradNorms grouped
        ("auto", ["grad", "gradients:dtype=fp32"], "eval"),
        ("**.bn2", ["residual", "channel", "grad"], "eval"),  # plain layers, not blocks
    ],
    ids=["train-mode", "mixed-backward", "plain-layers"],
)
@pytest.mark.filterwarnings("ignore:.*hold no residual site")
def test_other_selections_and_modes_grouped_give_the_per_call_numbers(
    layers, probes, mode, monkeypatch
):
    from probe.probes.registry import make_probe

    sizes = _sizes(monkeypatch)

    model, (x, y) = _net("resnet20"), _x()
    runs = []
    for grouped in (False, True):
        with probe.HookSession(model, layers, [make_probe(p) for p in probes], mode=mode,
                               grouped=grouped) as s:  # fmt: skip
            runs.append(s.run_batch(x, y)[0])
    alone, grouped = runs
    assert max(sizes) > 1  # (the per-call session makes no group)
    assert sorted(alone) == sorted(grouped) and alone
    for key, qs in alone.items():
        assert sorted(qs) == sorted(grouped[key])
        for q, t in qs.items():
            torch.testing.assert_close(grouped[key][q], t, rtol=1e-5, atol=1e-7, msg=f"{key}.{q}")


def _block_bytes(model, x, y):
    """Each block's bytes as the session counts them: its distinct x, F(x), S(x) and y."""
    with probe.HookSession(model, "auto", [RawSites()], grouped=False) as s:
        raw = s.run_batch(x, y)[0]
    out = {}
    for key, parts in raw.items():
        ts = [parts["X"], parts["F"], parts["Y"]]
        if not torch.equal(parts["S"], parts["X"]):  # S is x itself for an identity shortcut
            ts.append(parts["S"])
        out[key] = sum(t.numel() * t.element_size() for t in ts)
    return out


def _recorded_groups(monkeypatch) -> list[str]:
    """The names of the calls the session groups from now on, as it groups them."""
    names: list[str] = []

    class Recorded(CallGroup):
        def __init__(self, calls):
            names.extend(c.name for c in calls)
            super().__init__(calls)

    monkeypatch.setattr(probe.session, "CallGroup", Recorded)
    return names


def test_on_the_cpu_the_default_groups_the_statistics_of_small_blocks_only(monkeypatch):
    """By default a CPU batch groups the reducing probes of the blocks whose tensors fit
    _CPU_GROUP_CALL_BYTES, computes every other block at its call, never groups a probe that
    copies tensors (Activations), and gives the per-call numbers (torch's formulas: with the
    one-pass kernels no block is grouped, next test)."""
    monkeypatch.setenv(onepass.ENV, "0")
    model, (x, y) = _net("resnet20"), _x()
    sizes = _block_bytes(model, x, y)
    limit = sorted(set(sizes.values()))[len(set(sizes.values())) // 2]
    small = {k for k, b in sizes.items() if b <= limit}
    assert small and small != set(sizes)  # the limit splits the blocks
    probes = [*_stats(), probe.Activations(dtype="fp32")]
    alone, _ = _run(model, probes, False, x, y)
    grouped_keys = _recorded_groups(monkeypatch)
    monkeypatch.setattr(probe.session, "_CPU_GROUP_CALL_BYTES", limit)
    copied = []
    monkeypatch.setattr(
        probe.Activations, "forward_group", lambda self, group: copied.append(group) or []
    )
    default, session = _run(model, probes, None, x, y)
    # forward and backward: each small block twice (its gradients are x's and y's size too)
    assert sorted(set(grouped_keys)) == sorted(small)
    assert copied == []  # block outputs are each call's own, never stacked on the CPU
    for key, qs in alone.items():
        assert sorted(default[key]) == sorted(qs), key
        for q, t in qs.items():
            torch.testing.assert_close(default[key][q], t, rtol=1e-5, atol=1e-7, msg=f"{key}.{q}")
    assert not session._group_unsafe


@pytest.mark.skipif(not onepass.available(), reason="needs numba")
def test_on_the_cpu_blocks_the_one_pass_kernels_take_are_not_grouped(monkeypatch):
    """Their statistics cost a handful of ops per call: a stack's copy would cost more. A
    bf16 model's blocks (torch's formulas) are still grouped."""
    grouped_keys = _recorded_groups(monkeypatch)
    model, (x, y) = _net("resnet20"), _x()
    alone, _ = _run(model, _stats(), False, x, y)
    default, _ = _run(model, _stats(), None, x, y)
    assert grouped_keys == []
    for key, qs in alone.items():
        for q, t in qs.items():
            torch.testing.assert_close(default[key][q], t, rtol=0, atol=0, msg=f"{key}.{q}")
    _run(model.bfloat16(), _stats(), None, x.bfloat16(), y)
    assert grouped_keys


def test_on_the_cpu_small_groups_are_computed_within_their_own_budget(monkeypatch):
    monkeypatch.setenv(onepass.ENV, "0")  # torch's formulas: the kernels' blocks are not grouped
    model, (x, y) = _net("resnet20"), _x()
    alone, _ = _run(model, _stats(), False, x, y)
    sizes = _sizes(monkeypatch)
    monkeypatch.setattr(probe.session, "_CPU_GROUP_BYTES", 1)  # each call its own group
    default, _ = _run(model, _stats(), None, x, y)
    assert sizes and set(sizes) == {1}
    monkeypatch.setattr(probe.session, "_CPU_GROUP_BYTES", 1 << 30)
    sizes.clear()
    _run(model, _stats(), None, x, y)
    assert sizes[:5] == [3, 1, 2, 1, 2]  # as grouped=True groups them: every block is small
    for key, qs in alone.items():
        for q, t in qs.items():
            torch.testing.assert_close(default[key][q], t, rtol=1e-5, atol=1e-7)


def test_on_the_cpu_no_call_is_grouped_when_none_is_small(monkeypatch):
    monkeypatch.setenv(onepass.ENV, "0")  # torch's formulas: else no block is grouped anyway
    sizes = _sizes(monkeypatch)
    monkeypatch.setattr(probe.session, "_CPU_GROUP_CALL_BYTES", 0)
    _run(_net("resnet20"), _stats(), None, *_x())
    assert sizes == []
