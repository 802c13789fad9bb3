import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections import namedtuple

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import probe
from analyses.tidy import run_key
from probe.errors import ProbeError
from probe.hooks import ResidualSpec, register_residual
from probe.probes import ChannelStats, GradNorms, ResidualNorms
from probe.store.writer import H5Writer


def _model(name="resnet8"):
    return probe.zoo.create(name, in_channels=1, width=4).eval()


def _batches(n_batches=3, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n_batches)
    ]


def _hook_counts(model):
    return {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    }


@pytest.mark.parametrize("name", ["resnet8", "plain8"])
def test_capture_to_hdf5_equals_direct_computation(tmp_path, name):
    model = _model(name)
    batches = _batches()
    cap = probe.capture(model, batches, probes=[ResidualNorms()], out=tmp_path / "c.h5")
    x = torch.cat([b[0] for b in batches])
    block = model.stages[1][0]
    with torch.no_grad():
        h = model.stages[0](model.stem(x))
        f, s, y = block.branch(h), block.shortcut(h), block(h)
    with cap:
        assert np.allclose(
            cap.read("stages.1.0", "f_norm"), f.flatten(1).norm(dim=1).numpy(), rtol=1e-5
        )
        assert np.allclose(
            cap.read("stages.1.0", "s_norm"), s.flatten(1).norm(dim=1).numpy(), rtol=1e-5
        )
        assert np.allclose(
            cap.read("stages.1.0", "dev_norm"), (y - s).flatten(1).norm(dim=1).numpy(), rtol=1e-5
        )
        F, S, Y = (t.double().flatten(1).numpy() for t in (f, s, y))
        for q, a, b in (("cos_ys", Y, S), ("cos_fs", F, S)):
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            np.testing.assert_allclose(cap.read("stages.1.0", q), cos, rtol=0, atol=2e-6)
        assert cap.sample_index().tolist() == list(range(15))
        assert cap.layer_attrs("stages.1.0")["residual"] == int(name.startswith("res"))


def test_streaming_channel_statistics_equal_numpy_float64(tmp_path):
    model = _model().double()
    batches = [(x.double(), y) for x, y in _batches(4, 7)]
    cap = probe.capture(
        model,
        batches,
        layers=["stages.0.0", "stem.bn"],
        probes=[ChannelStats()],
        out=tmp_path / "c.h5",
    )
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        r = model.stem(x) if False else model.stem.bn(model.stem.conv(x))
    ref = r.permute(1, 0, 2, 3).reshape(r.shape[1], -1).numpy()
    with cap:
        m = cap.channel_moments("stem.bn")
    assert np.max(np.abs(m.mean - ref.mean(1)) / np.abs(ref.mean(1))) <= 1e-6
    assert np.max(np.abs(m.var - ref.var(1)) / ref.var(1)) <= 1e-6
    pooled, per_channel = probe.response_std(m.mean, m.var)
    assert pooled == pytest.approx(ref.std(), rel=1e-6)
    assert per_channel == pytest.approx(ref.std(1).mean(), rel=1e-6)


def test_hooks_removed_and_model_state_unchanged_after_success():
    model = _model()
    model.train()
    before = _hook_counts(model)
    x, y = _batches(1)[0]
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    grad_mode = torch.is_grad_enabled()
    with probe.HookSession(model, probes=[ResidualNorms(), GradNorms()]) as s:
        _, out = s.run_batch(x, y)
    assert torch.equal(out, ref)
    assert _hook_counts(model) == before
    assert model.training and all(m.training for m in model.modules())
    assert torch.is_grad_enabled() == grad_mode
    assert all(p.grad is None for p in model.parameters())


class _Boom(probe.Probe):
    name = "boom"

    def forward(self, call):
        raise RuntimeError("probe failed")


def test_hooks_removed_after_a_probe_raises(tmp_path):
    model = _model()
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="probe failed"):
        probe.capture(model, _batches(), probes=[_Boom()], out=tmp_path / "c.h5")
    assert _hook_counts(model) == before
    assert not list(tmp_path.iterdir()), "a failed capture must leave no file"


def test_a_failed_capture_leaves_an_existing_output_as_it_was_and_a_whole_one_replaces_it(
    tmp_path,
):
    out = tmp_path / "c.h5"
    probe.capture(_model(), _batches(1), probes=[ResidualNorms()], out=out).close()
    before = out.read_bytes()

    def failing():  # the second batch fails, after the first was written
        yield from _batches(1)
        raise RuntimeError("the data ran dry")

    with pytest.raises(RuntimeError, match="ran dry"):
        probe.capture(_model(), failing(), probes=[ResidualNorms()], out=out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.h5"]
    probe.capture(_model(), _batches(2), probes=[ResidualNorms()], out=out).close()
    with probe.open(out) as cap:
        assert int(cap.attrs["n_samples"]) == 10


def test_hooks_removed_after_bad_layer_spec():
    model = _model()
    before = _hook_counts(model)
    with pytest.raises(ProbeError, match="Did you mean 'stages"):
        probe.capture(model, _batches(), layers="stage.*", probes=[ResidualNorms()])
    assert _hook_counts(model) == before


def test_captured_gradients_equal_autograd():
    model = _model()
    x, y = _batches(1)[0]
    cap = probe.capture(
        model,
        [(x, y)],
        layers=["stages.1.0", "head.fc"],
        probes=[probe.Gradients(dtype="fp32"), GradNorms()],
    )
    acts = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o))
        for n in ("stages.1.0", "head.fc")
    ]
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, [acts["stages.1.0"], acts["head.fc"]])
    for h in hooks:
        h.remove()
    assert np.allclose(cap.read("stages.1.0", "grad_output"), grads[0].numpy(), atol=1e-6)
    assert np.allclose(cap.read("head.fc", "grad_y_norm"), grads[1].norm(dim=1).numpy(), rtol=1e-5)


class TorchvisionLikeBlock(nn.Module):
    """Same structure as torchvision's BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


register_residual(TorchvisionLikeBlock, ResidualSpec(branch="bn2", shortcut=lambda b: b.downsample))


def test_inplace_block_warns_and_branch_is_cloned_before_the_add():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), TorchvisionLikeBlock(4)).eval()
    x = torch.randn(3, 1, 6, 6)
    with pytest.warns(probe.InPlaceWarning, match="relu"):
        cap = probe.capture(model, [x], probes=[ResidualNorms()])
    with torch.no_grad():
        h = model[0](x)
        blk = model[1]
        f = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(h)))))
    assert np.allclose(cap.read("1", "f_norm"), f.flatten(1).norm(dim=1).numpy(), rtol=1e-5)


def test_module_called_twice_is_recorded_per_call():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.warns(probe.NoResidualWarning, match="hold no residual site"):  # a plain layer
        cap = probe.capture(model, [torch.randn(2, 4)], layers="0", probes=[ResidualNorms()])
    assert cap.layers == ["0", "0@1"]
    assert cap.layer_attrs("0@1")["call"] == 1


class TwinBlock(nn.Module):
    """One block class for a plain net and its residual twin, as a user would write it."""

    def __init__(self, c, residual):
        super().__init__()
        self.residual = residual
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return torch.relu(x + self.f(x)) if self.residual else self.f(x)


register_residual(TwinBlock, ResidualSpec(branch="f"))


@pytest.mark.parametrize("residual", [False, True])
def test_a_user_plain_block_is_measured_against_the_identity_it_lacks(residual):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), TwinBlock(4, residual), TwinBlock(4, residual)
    )
    model.eval()
    x = torch.randn(5, 1, 6, 6)
    cap = probe.capture(model, [x], probes=[ResidualNorms()])
    assert cap.layers == ["1", "2"]
    norm = lambda t: t.flatten(1).norm(dim=1).numpy()  # noqa: E731
    with torch.no_grad():
        h = model[0](x)
        for key, block in (("1", model[1]), ("2", model[2])):
            f, y = block.f(h), block(h)
            assert int(cap.layer_attrs(key)["residual"]) == int(residual)
            np.testing.assert_allclose(cap.read(key, "f_norm"), norm(f), rtol=1e-5)
            np.testing.assert_allclose(cap.read(key, "s_norm"), norm(h), rtol=1e-5)
            np.testing.assert_allclose(cap.read(key, "dev_norm"), norm(y - h), rtol=1e-5)
            h = y
    assert run_key(cap)["residual"] is residual


def test_plain_model_without_blocks_needs_explicit_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ProbeError, match=r"No residual sites found(?s:.*)0 \(Linear\), 1 \(ReLU\)"):
        probe.capture(model, [torch.randn(2, 4)], probes=[ResidualNorms()])


def test_unwritable_location_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(ProbeError, match="Cannot write the capture"):
            probe.capture(_model(), _batches(), probes=[ResidualNorms()], out=ro / "c.h5")
    finally:
        ro.chmod(0o700)


def test_output_in_a_regular_file_path_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProbeError, match="Cannot write the capture"):
        probe.capture(
            _model(), _batches(), probes=[ResidualNorms()], out=tmp_path / "file" / "c.h5"
        )


def test_full_disk_gives_clear_error_and_no_file(tmp_path, monkeypatch):
    def full(self, dset, arr):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(H5Writer, "_append", full)
    with pytest.raises(ProbeError, match="No space left"):
        probe.capture(_model(), _batches(), probes=[ResidualNorms()], out=tmp_path / "c.h5")
    assert not list(tmp_path.iterdir())


def test_reader_refuses_incomplete_and_unknown_versions(tmp_path):
    path = tmp_path / "c.h5"
    probe.capture(_model(), _batches(1), probes=[ResidualNorms()], out=path).close()
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(ProbeError, match="incomplete"):
        probe.open(path)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = True
        f.attrs["format_version"] = "2.0.0"
    with pytest.raises(ProbeError, match="format version"):
        probe.open(path)


def test_bf16_activations_round_trip_exactly(tmp_path):
    x, model = _batches(1)[0], _model()
    cap = probe.capture(
        model,
        [x],
        layers="stages.0.0",
        probes=[probe.Activations(dtype="bf16")],
        out=tmp_path / "c.h5",
    )
    mem = probe.capture(model, [x], layers="stages.0.0", probes=[probe.Activations(dtype="bf16")])
    assert np.array_equal(cap.read("stages.0.0", "output"), mem.read("stages.0.0", "output"))


def test_activation_sample_cap_and_subsampling():
    cap = probe.capture(
        _model(),
        _batches(3, 5),
        layers="stages.0.0",
        probes=[probe.Activations(dtype="fp32", max_samples=7, channel_stride=2, spatial_stride=2)],
    )
    assert cap.read("stages.0.0", "output").shape == (7, 2, 4, 4)


def test_compressed_capture_is_lossless(tmp_path):
    x, model = _batches(2), _model()
    raw = probe.capture(model, x, probes=[ChannelStats()])
    for codec in ("gzip", "zstd"):
        with probe.capture(
            model, x, probes=[ChannelStats()], out=tmp_path / f"{codec}.h5", compression=codec
        ) as cap:
            assert np.array_equal(
                cap.read("stages.2.0", "channel_var"), raw.read("stages.2.0", "channel_var")
            )


def test_provenance_is_recorded(tmp_path):
    with probe.capture(
        _model(),
        _batches(1),
        probes=[ResidualNorms()],
        out=tmp_path / "c.h5",
        provenance={"seed": 7},
    ) as cap:
        assert cap.provenance["seed"] == 7 and "torch" in cap.provenance["versions"]
        assert cap.config["probes"] == [{"probe": "residual", "fused": False}]


_KILLED = textwrap.dedent(
    """
    import sys, time, torch, probe
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    class Slow(probe.ResidualNorms):
        def forward(self, call):
            time.sleep(0.05)
            return super().forward(call)
    def batches():
        for i in range(10_000):
            if i == 3:
                print("started", flush=True)
            yield torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    probe.capture(model, batches(), probes=[Slow()], out=sys.argv[1])
    """
)


def test_killed_capture_leaves_no_accepted_file_and_rerun_succeeds(tmp_path):
    out = tmp_path / "c.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    for leftover in tmp_path.iterdir():  # the temporary file, if any, is refused
        with pytest.raises(ProbeError):
            probe.open(leftover)
    probe.capture(_model(), _batches(1), probes=[ResidualNorms()], out=out).close()
    with probe.open(out) as cap:
        assert cap.attrs["complete"]


def test_torchvision_resnet18_blocks_found_automatically():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.InPlaceWarning)
        cap = probe.capture(model, [torch.randn(2, 3, 32, 32)], probes=[ResidualNorms()])
    assert len(cap.layers) == 8 and cap.layer_attrs("layer1.0")["is_block"]
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():  # ReLU(inplace=True) after the add: the tracer copies first
        warnings.simplefilter("error", probe.InPlaceWarning)
        cap = probe.capture(model, [x], layers="layer2.0", probes=[ResidualNorms()])
    with torch.no_grad():  # F(x) = bn2(conv2(relu(bn1(conv1(h))))), S(x) = downsample(h)
        h = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        blk = model.layer2[0]
        f = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(h)))))
        s = blk.downsample(h)
    assert np.allclose(cap.read("layer2.0", "f_norm"), f.flatten(1).norm(dim=1).numpy(), rtol=1e-4)
    assert np.allclose(cap.read("layer2.0", "s_norm"), s.flatten(1).norm(dim=1).numpy(), rtol=1e-4)


@pytest.mark.parametrize("arch, se", [("resnet18", False), ("seresnet18", True)])
def test_timm_resnet_blocks_found_automatically(arch, se):
    timm = pytest.importorskip("timm")
    from probe.conformance import randomize_

    # timm zero-initialises each block's last norm (F = 0): randomise so F is worth comparing.
    model = randomize_(timm.create_model(arch, num_classes=10, pretrained=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.InPlaceWarning)
        cap = probe.capture(model, [x], probes=[ResidualNorms()])
        assert len(cap.layers) == 8 and cap.layer_attrs("layer2.0")["is_block"]
        cap = probe.capture(model, [x], layers="layer2.0", probes=[ResidualNorms()])
    with torch.no_grad():  # F(x) = se(bn2(conv2(act1(bn1(conv1(h)))))), S(x) = downsample(h)
        h = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        blk = model.layer2[0]
        f = blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(h)))))
        if se:
            f = blk.se(f)
        s = blk.downsample(h)
    assert np.allclose(cap.read("layer2.0", "f_norm"), f.flatten(1).norm(dim=1).numpy(), rtol=1e-4)
    assert np.allclose(cap.read("layer2.0", "s_norm"), s.flatten(1).norm(dim=1).numpy(), rtol=1e-4)
    assert float(f.norm()) > 0.1 * float(s.norm())  # a non-trivial branch


def test_torchvision_vgg11_bn_with_explicit_layers():
    tv = pytest.importorskip("torchvision")
    model = tv.models.vgg11_bn(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.InPlaceWarning)
        cap = probe.capture(
            model, [torch.randn(2, 3, 32, 32)], layers="features.*", probes=[ChannelStats()]
        )
    assert "features.0" in cap.layers


def test_unlabelled_capture_stores_minus_one_labels(tmp_path):
    with probe.capture(
        _model(), [torch.randn(4, 1, 8, 8)], probes=[ResidualNorms()], out=tmp_path / "c.h5"
    ) as cap:
        assert cap.labels().tolist() == [-1, -1, -1, -1] and len(cap.sample_index()) == 4


@pytest.mark.parametrize("probes", [["shattered"], ["shattered", "residual"], ["grad"]])
def test_in_memory_and_hdf5_captures_list_the_same_layers(tmp_path, probes):
    """A layer where every probe declined (model-level probes only) is not a layer of the
    capture, in memory as in the file; before, memory listed such layers with no quantities."""
    net = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    mem = probe.capture(net, batches, probes=probes)
    with probe.capture(net, batches, probes=probes, out=tmp_path / "x.h5") as disk:
        assert mem.layers == disk.layers
        assert all(mem.quantities(k) == disk.quantities(k) for k in mem.layers)
        assert all(mem.quantities(k) for k in mem.layers)


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "hdf5"])
def test_a_capture_under_another_default_device_equals_the_plain_one(tmp_path, to_disk):
    """A user's ``torch.set_default_device`` does not move the capture's host-side buffers
    (rows, indices, clip counts, compacted results): a CPU model captured under the meta
    default device, where any tensor made without a device has no data, gives the same file."""
    model, data = _model(), _batches()
    probes = ["residual", "channel", "grad", probe.Activations(dtype="fp16")]
    ref = probe.capture(model, data, probes=probes)
    with torch.device("meta"):
        cap = probe.capture(model, data, probes=probes, out=tmp_path / "c.h5" if to_disk else None)
    assert cap.layers == ref.layers and np.array_equal(cap.sample_index(), ref.sample_index())
    for layer in ref.layers:
        assert cap.quantities(layer) == ref.quantities(layer)
        for q in ref.quantities(layer):
            assert np.array_equal(cap.read(layer, q), ref.read(layer, q), equal_nan=True), q


def _wrapped(kind, model, tmp_path):
    if kind == "compiled":
        return torch.compile(model)
    if kind == "data-parallel":
        return nn.DataParallel(model)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("kind", ["compiled", "data-parallel", "distributed"])
def test_a_wrapped_model_is_captured_as_the_module_it_wraps(kind, tmp_path, recwarn):
    """``torch.compile(model)``, ``DataParallel`` and ``DistributedDataParallel`` keep their
    layers' names (not ``_orig_mod.…`` or ``module.…``), selections and numbers: the session
    runs the module they wrap (a compiled one eagerly, with nothing traced by Dynamo and no
    warning), and leaves no hook behind."""
    model, data = _model(), _batches(2)
    probes = ["residual", "channel", "grad"]
    ref = probe.capture(model, data, probes=probes)
    try:
        wrapped = _wrapped(kind, model, tmp_path)
        assert probe.list_layers(wrapped) == probe.list_layers(model)
        cap = probe.capture(wrapped, data, probes=probes, layers="stages.*.0")
    finally:
        if kind == "distributed":
            torch.distributed.destroy_process_group()
    assert cap.layers == ref.layers == ["stages.0.0", "stages.1.0", "stages.2.0"]
    for layer in ref.layers:
        for q in ref.quantities(layer):
            assert np.array_equal(cap.read(layer, q), ref.read(layer, q)), (layer, q)
    assert not [w for w in recwarn if "dynamo" in str(w.message).lower()]
    assert not wrapped._forward_hooks and not any(m._forward_hooks for m in model.modules())


class _Returns(nn.Module):
    """A model returning its logits inside another structure."""

    def __init__(self, net, form):
        super().__init__()
        self.net, self.form = net, form

    def forward(self, x):
        logits = self.net(x)
        if self.form == "mapping":  # HuggingFace-style outputs
            return {"hidden": x.flatten(1), "logits": logits}
        if self.form == "named":  # torchvision's InceptionOutputs(logits, aux_logits)
            return _Named(logits, torch.zeros(len(x), 3))
        return x.flatten(1), logits  # a plain tuple: which element is the logits is unknown


_Named = namedtuple("_Named", "logits aux_logits")


@pytest.mark.parametrize("form", ["mapping", "named"])
def test_logits_inside_a_mapping_or_output_object_are_found(form):
    """Gradient probes take the loss of the ``logits`` a mapping or output object holds: the
    same numbers as the bare model's capture (it failed: "'dict' object has no attribute")."""
    net, data = _model(), _batches(2)
    ref = probe.capture(net, data, probes=["residual", "grad"])
    cap = probe.capture(_Returns(net, form), data, probes=["residual", "grad"])
    assert cap.layers == ["net." + layer for layer in ref.layers]
    for layer in ref.layers:
        for q in ref.quantities(layer):
            assert np.array_equal(cap.read("net." + layer, q), ref.read(layer, q)), (layer, q)


def test_a_plain_tuple_output_needs_a_loss_of_ones_own_for_gradients():
    """A tuple does not say which element is the logits: forward probes need none, gradient
    probes refuse with what to do (a raw AttributeError before), and a loss_fn that takes the
    tuple gives the bare model's numbers."""
    from probe.losses import exact_cross_entropy

    net, data = _model(), _batches(2)
    model = _Returns(net, "tuple")
    ref = probe.capture(net, data, probes=["residual", "grad"])
    fwd = probe.capture(model, data, probes=["residual"])
    assert np.array_equal(fwd.read("net.stages.0.0", "y_norm"), ref.read("stages.0.0", "y_norm"))
    with pytest.raises(ProbeError, match="returned a tuple, where the capture needs its logits"):
        probe.capture(model, data, probes=["grad"])
    cap = probe.capture(
        model, data, probes=["grad"], loss_fn=lambda out, y: exact_cross_entropy(out[1], y)
    )
    for q in cap.quantities("net.stages.0.0"):
        assert np.array_equal(cap.read("net.stages.0.0", q), ref.read("stages.0.0", q)), q


@pytest.mark.parametrize("name", ["shattered", "param_grads"])
def test_model_level_probes_find_the_logits_of_a_mapping(name):
    """Model-level probes run the model themselves and take the logits of what it returns as
    the session does (``probe.probes.base.logits_of``): the bare model's numbers (they failed
    with "'dict' object has no attribute 'argmax'" / "'ndim'")."""
    net, data = _model(), _batches(2)
    ref = probe.capture(net, data, probes=[name])
    cap = probe.capture(_Returns(net, "mapping"), data, probes=[name])
    # parameters are named from the wrapper: net.<name>
    renamed = {q.replace("grad_norm.net.", "grad_norm."): q for q in cap.quantities("model")}
    assert sorted(renamed) == sorted(ref.quantities("model"))
    for q in ref.quantities("model"):
        assert np.array_equal(cap.read("model", renamed[q]), ref.read("model", q)), q
    with pytest.raises(ProbeError, match="returned a tuple, where the capture needs its logits"):
        probe.capture(_Returns(net, "tuple"), data, probes=[name])


def test_a_probe_that_records_nothing_is_named_in_a_warning():
    """'segments' needs a chain of modules: on a wrapper it silently gave a capture without its
    quantities. The capture now names every probe that recorded nothing, and stays quiet when
    each one recorded something."""
    net, data = _model(), _batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", probe.NothingRecordedWarning)
        ref = probe.capture(net, data, probes=["residual", "segments"])
    assert "seg_in_msv" in ref.quantities("model")
    with pytest.warns(probe.NothingRecordedWarning, match=r"Probe\(s\) segments recorded nothing"):
        cap = probe.capture(_Returns(net, "mapping"), data, probes=["residual", "segments"])
    assert cap.layers == ["net." + k for k in ref.layers if k != "model"]


def test_a_zoo_checkpoint_is_captured_on_channels_last_batches_with_the_standard_numbers(
    tmp_path, monkeypatch
):
    """Checkpoint captures feed the zoo's nets channels-last batches, as the trainer does (the
    faster layout on a CPU); their statistics are those of standard batches up to rounding."""
    from probe.data import ImageArrays
    from probe.loading import capture_checkpoint
    from probe.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = probe.zoo.create("resnet8", width=4).eval()  # three channels
    ck = save_checkpoint(tmp_path / "ck", net, {"model": net.config.to_dict(), "epoch": 0})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8)
    data = ImageArrays("toy", images, np.arange(24) % 10, images, np.arange(24) % 10,
                       [str(c) for c in range(10)])  # fmt: skip
    from probe import loading

    made = []
    real = loading.capture_loader
    monkeypatch.setattr(
        loading, "capture_loader", lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    )
    probes = [ResidualNorms(), ChannelStats(), GradNorms()]
    capture_checkpoint(ck, data, batch_size=8, probes=probes, out=tmp_path / "cl.h5").close()
    first = next(iter(made[0]))[0]
    assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    x = torch.from_numpy(images).float() / 255 - torch.tensor(data.mean).float().view(1, 3, 1, 1)
    x = x / torch.tensor(data.std).float().view(1, 3, 1, 1)
    batches = [(x[i : i + 8], torch.arange(i, i + 8) % 10) for i in range(0, 24, 8)]
    probe.capture(net, batches, probes=probes, out=tmp_path / "std.h5").close()
    with probe.open(tmp_path / "cl.h5") as cl, probe.open(tmp_path / "std.h5") as std:
        assert cl.layers == std.layers
        for layer in std.layers:
            for q in ("y_norm", "cos_ys", "channel_var", "grad_x_norm"):
                np.testing.assert_allclose(
                    cl.read(layer, q), std.read(layer, q), rtol=2e-5, atol=1e-7
                )
