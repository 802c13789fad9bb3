"""Output-only probes on traced blocks: a block whose one residual add yields its output is read
from a hook on the block instead of tracing its code. Every result, key and file attribute must
equal the traced capture's, and the hand-read module outputs; blocks the hook cannot stand in for
(several sites, x + child(x) in a parent) stay traced."""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import probe
from probe.hooks.sites import SiteTracer
from probe.probes.base import Probe


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Reads(Probe):
    """Records nothing but may read anything of a call: the session must trace for it."""

    name: ClassVar[str] = "reads"


class Bottleneckish(nn.Module):
    """torchvision's pattern: ``out += identity`` into the branch, then an in-place ReLU."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn(self.conv(x))
        out += identity
        return self.relu(out)


class PostAdd(nn.Module):
    """One site whose add is not the output: y = pool(x + f(x)) has another shape."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(4, 4, 3, 1, 1)

    def forward(self, x):
        return nn.functional.avg_pool2d(x + self.f(x), 2)


class Transformerish(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.f1(self.ln1(x))
        return x + self.f2(self.ln2(x))


class Loop(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


class Wrap(nn.Module):
    """One site, then an op of the same shape: the site's y is the module's output, as for a
    ResNet block's ReLU."""

    def __init__(self, d=8):
        super().__init__()
        self.blk = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(x + self.blk(x))


def _convnet():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, 1, 1),
        Bottleneckish(4, 4),
        Bottleneckish(4, 8, stride=2),
        Bottleneckish(8, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    for m in net.modules():  # BN statistics away from the identity, so the adds matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval(), (5, 3, 8, 8)


def _mixed():
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, 1, 1), Bottleneckish(4, 4), PostAdd(), nn.Flatten(2), nn.Linear(16, 8)
    )
    model = nn.Sequential(body, Transformerish(), Loop(), Wrap(), nn.Flatten(), nn.Linear(32, 3))
    return model.eval(), (5, 3, 8, 8)


MODELS = {"torchvision-like": _convnet, "mixed": _mixed}
# which keys a hook can stand in for, per model
SERVED = {"torchvision-like": {"1", "2", "3"}, "mixed": {"0.1", "3"}}


class _TracedOps:
    """Counts the ops SiteTracer intercepts (its TorchFunctionMode is the cost avoided)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = SiteTracer.__torch_function__

        def counted(tracer, *a, **k):
            self.n += 1
            return original(tracer, *a, **k)

        monkeypatch.setattr(SiteTracer, "__torch_function__", counted)


def _batches(shape):
    return [_x(*shape, seed=s) for s in (1, 2)]


def _run(model, shape, probes, batches=None, labels=None):
    labels = torch.zeros(shape[0], dtype=torch.long) if labels is None else labels
    out = []
    with probe.HookSession(model, "auto", probes) as s:
        for x in batches or _batches(shape):
            out.append(s.run_batch(x, labels)[0])
        return out, {k: s.shapes[k] for k in s.shapes}, s


def _module_outputs(model, x):
    """Every module's output, read by plain hooks: the reference."""
    got, handles = {}, []
    for name, m in model.named_modules():
        handles.append(
            m.register_forward_hook(lambda m, a, o, name=name: got.setdefault(name, o.clone()))
        )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_blocks_read_by_a_hook_equal_the_traced_capture_and_the_module_outputs(name, dtype):
    model, shape = MODELS[name]()
    served, shapes, s = _run(model, shape, [probe.Activations(dtype=dtype)])
    traced, traced_shapes, _ = _run(model, shape, [probe.Activations(dtype=dtype), Reads()])
    assert shapes == traced_shapes  # what the file's layer attributes are made of
    for got, want, x in zip(served, traced, _batches(shape)):
        assert got.keys() == want.keys()
        assert SERVED[name] <= set(got)
        reference = _module_outputs(model, x)
        for key in got:
            assert got[key].keys() == want[key].keys()
            for q in got[key]:
                assert torch.equal(got[key][q], want[key][q]), (key, q)
            if key in SERVED[name]:
                ref = reference[key].to(got[key]["output"].dtype)
                assert torch.equal(got[key]["output"], ref), key
    assert {i.name for i in s.layers} == set(served[0])


def test_a_site_in_a_parent_is_its_add_not_the_parent_output():
    model, shape = _mixed()
    x = _x(*shape)
    labels = torch.zeros(shape[0], dtype=torch.long)
    with probe.HookSession(model, ["2.blocks.0"], [probe.Activations("fp32")]) as s:
        got = s.run_batch(x, labels)[0]["2.blocks.0"]["output"]
    with torch.no_grad():
        h = model[1](model[0](x))
        added = h + model[2].blocks[0](h)  # not the output of the loop, model[2]
    assert torch.equal(got, added)


@pytest.mark.parametrize("name", MODELS)
def test_only_blocks_a_hook_can_stand_in_for_go_untraced(name, monkeypatch):
    model, shape = MODELS[name]()
    ops = _TracedOps(monkeypatch)
    labels = torch.zeros(shape[0], dtype=torch.long)
    with probe.HookSession(model, "auto", [probe.Activations(dtype="fp32")]) as s:
        s.run_batch(_x(*shape), labels)  # finds the sites by tracing, once
        ops.n = 0
        s.run_batch(_x(*shape), labels)
        untraced = ops.n
    with probe.HookSession(model, "auto", [probe.Activations(dtype="fp32"), Reads()]) as s:
        s.run_batch(_x(*shape), labels)
        ops.n = 0
        s.run_batch(_x(*shape), labels)
        assert ops.n > 0
    if name == "torchvision-like":
        assert untraced == 0  # every block is served: no op of the pass goes through Python
    else:
        assert 0 < untraced < ops.n  # the transformer block and the loop are still traced


def test_what_a_probe_reads_decides_whether_it_is_output_only():
    assert probe.Activations().output_only()
    assert not probe.Activations(which="input").output_only()
    assert probe.Gradients().output_only()
    assert not any(
        p.output_only() for p in (probe.ResidualNorms(), probe.ChannelStats(), probe.GradNorms())
    )
    assert not Reads().output_only()  # a user's probe may read anything unless it says otherwise


def test_gradients_of_served_blocks_equal_the_traced_ones_and_autograd():
    model, shape = _convnet()
    labels = torch.tensor([0, 1, 2, 0, 1])
    x = _x(*shape, seed=3)
    got = _run(model, shape, [probe.Gradients(dtype="fp32")], [x], labels)[0][0]
    want = _run(model, shape, [probe.Gradients(dtype="fp32"), Reads()], [x], labels)[0][0]
    outs = {}
    keys = ("1", "2", "3")
    handles = [
        model[int(k)].register_forward_hook(lambda m, a, o, k=k: outs.update({k: o})) for k in keys
    ]
    try:
        loss = nn.functional.cross_entropy(model(x), labels, reduction="sum")
        grads = torch.autograd.grad(loss, [outs[k] for k in keys])
    finally:
        for h in handles:
            h.remove()
    for key, g in zip(keys, grads):
        assert torch.equal(got[key]["grad_output"], want[key]["grad_output"])
        torch.testing.assert_close(got[key]["grad_output"], g, rtol=1e-5, atol=1e-6 * g.abs().max())


def test_a_served_capture_writes_the_same_file_as_a_traced_one(tmp_path):
    model, shape = _convnet()
    data = [(x, torch.zeros(shape[0], dtype=torch.long)) for x in _batches(shape)]
    a = probe.capture(model, data, probes=[probe.Activations(dtype="fp32")], out=tmp_path / "a.h5")
    with pytest.warns(probe.NothingRecordedWarning, match="reads"):  # it only forces tracing
        b = probe.capture(
            model, data, probes=[probe.Activations(dtype="fp32"), Reads()], out=tmp_path / "b.h5"
        )
    try:
        assert a.layers == b.layers and set(SERVED["torchvision-like"]) <= set(a.layers)
        for key in a.layers:
            assert a.layer_attrs(key) == b.layer_attrs(key)
            assert (a.read(key, "output") == b.read(key, "output")).all()
    finally:
        a.close()
        b.close()


def test_served_hooks_are_removed_on_success_and_on_error():
    model, shape = _convnet()
    labels = torch.zeros(shape[0], dtype=torch.long)

    @dataclass
    class Fails(Probe):
        name: ClassVar[str] = "fails"

        def output_only(self) -> bool:
            return True

        def forward(self, call):
            raise RuntimeError("probe failed")

    with probe.HookSession(model, "auto", [probe.Activations()]) as s:
        s.run_batch(_x(*shape), labels)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with (
        pytest.raises(RuntimeError, match="probe failed"),
        probe.HookSession(model, "auto", [Fails()]) as s,
    ):
        s.run_batch(_x(*shape), labels)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


class Narrowing(nn.Module):
    """``out += x; relu_(out)`` returned whole at first, then only some channels: the add's result
    is needed from then on, but its in-place ReLU went uncopied (the output stood for it)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.f(x)
        out += x
        out = torch.relu_(out)
        return out if self.calls <= 2 else out[:, :2]


def test_a_sum_changed_in_place_uncopied_is_an_error_where_it_would_be_read():
    model = nn.Sequential(nn.Linear(4, 4), Narrowing()).eval()
    labels = torch.zeros(3, dtype=torch.long)
    with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s:
        s.run_batch(_x(3, 4), labels)  # the sites are found on a first call, then it runs
        with pytest.raises(probe.ProbeError, match="changed in place and is needed"):
            s.run_batch(_x(3, 4, seed=1), labels)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_the_add_of_a_block_with_an_in_place_activation_is_read_without_a_second_copy():
    model, shape = _convnet()
    x = _x(*shape)
    copies = []
    original = torch.Tensor.clone

    def counted(t, *a, **k):
        copies.append(tuple(t.shape))
        return original(t, *a, **k)

    with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as s:
        s.run_batch(x, torch.zeros(shape[0], dtype=torch.long))
        torch.Tensor.clone = counted
        try:
            results = s.run_batch(x, torch.zeros(shape[0], dtype=torch.long))[0]
        finally:
            torch.Tensor.clone = original
    assert len(copies) == 3  # F of each block, which `out += identity` overwrites; not the sum
    with torch.no_grad():
        h = model[0](x)
        for key in ("1", "2", "3"):
            blk = model[int(key)]
            f = blk.bn(blk.conv(h))
            sc = h if blk.down is None else blk.down(h)
            y = torch.relu(f + sc)
            r = results[key]
            torch.testing.assert_close(r["f_norm"], f.flatten(1).norm(dim=1))
            torch.testing.assert_close(r["dev_norm"], (y - sc).flatten(1).norm(dim=1))
            torch.testing.assert_close(r["y_norm"], y.flatten(1).norm(dim=1))
            h = y


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("to_disk", [True, False], ids=["hdf5", "memory"])
def test_served_blocks_on_cuda_under_bf16_autocast_equal_the_traced_capture(tmp_path, to_disk):
    """On the GPU under bf16 autocast (the benchmark's setting), a block read from its hook gives
    the traced capture's values and the module's output, bit for bit, and its gradient too."""
    model, shape = _convnet()
    model = model.cuda()
    xs = [_x(*shape, seed=s) for s in (1, 2)]
    data = [(x, torch.tensor([0, 1, 2, 0, 1])) for x in xs]
    runs = []
    for probes, name in (([], "a"), ([Reads()], "b")):
        # Reads records nothing (it only forces tracing), which the capture says
        quiet = (
            pytest.warns(probe.NothingRecordedWarning, match="reads") if probes else nullcontext()
        )
        with quiet, torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(
                probe.capture(
                    model,
                    data,
                    probes=[
                        probe.Activations(dtype="fp32"),
                        probe.Gradients(dtype="fp32"),
                        *probes,
                    ],
                    out=tmp_path / f"{name}.h5" if to_disk else None,
                )
            )
    served, traced = runs
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = [_module_outputs(model, x.cuda()) for x in xs]
    try:
        assert served.layers == traced.layers and SERVED["torchvision-like"] <= set(served.layers)
        for key in served.layers:
            for q in ("output", "grad_output"):
                assert (served.read(key, q) == traced.read(key, q)).all(), (key, q)
            want = torch.cat([r[key].float() for r in reference]).cpu().numpy()
            assert (served.read(key, "output") == want).all(), key
    finally:
        if to_disk:
            served.close()
            traced.close()
