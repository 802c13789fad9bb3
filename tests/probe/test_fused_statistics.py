"""Fused (compiled) statistics give the eager probes' numbers and numpy's float64 ones; where
torch.compile fails they warn and compute eagerly."""

import collections
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probe
from probe.cli.main import cli
from probe.conformance import RawSites
from probe.probes import fused as fused_module
from probe.probes import onepass, statistics
from probe.probes.base import Call
from probe.probes.fused import Fused, FusedStatsWarning, identity_quantities, residual_quantities
from probe.probes.statistics import ChannelStats, ResidualNorms


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval().to(dtype)


def _batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)  # two batch sizes: the compiled kernels are dynamic
    return [
        (torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))
        for n in (5, 3)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_statistics_equal_eager_and_numpy_float64(dtype, statistics_reference):
    model, batches = _net(dtype), _batches(dtype)
    kinds = {
        "eager": [ResidualNorms(), ChannelStats()],
        "fused": [ResidualNorms(fused=True), ChannelStats(fused=True), RawSites()],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedStatsWarning)  # it must really compile
        got = {k: probe.capture(model, batches, probes=p) for k, p in kinds.items()}
    rtol = 1e-10 if dtype == torch.float64 else 1e-5  # bf16 values are exact in float32
    n_blocks = 0
    for layer in got["fused"].layers:
        if "F" not in got["fused"].quantities(layer):
            continue
        n_blocks += 1
        raw = {k: torch.from_numpy(got["fused"].read(layer, k)) for k in "XFSY"}
        for q, want in statistics_reference(raw).items():
            have = got["fused"].read(layer, q)
            np.testing.assert_allclose(have, want, rtol=rtol, atol=rtol, err_msg=f"{layer} {q}")
            np.testing.assert_allclose(have, got["eager"].read(layer, q), rtol=rtol, atol=rtol)
    assert n_blocks == 3


@pytest.mark.slow
def test_fused_channel_moments_of_a_channels_last_view_equal_numpy():
    t = torch.randn(4, 6, 5, 3).add_(3.0)  # [N, H, W, C]-like view: channel last, strided
    got = ChannelStats(layout="NHWC", fused=True).forward(
        Call("l", torch.nn.Identity(), None, t, 0)
    )
    mean, var = got["channel_mean"], got["channel_var"]
    ref = t.double().numpy().transpose(0, 3, 1, 2).reshape(4, 3, -1)
    np.testing.assert_allclose(mean.numpy(), ref.mean(2), rtol=1e-5)
    np.testing.assert_allclose(var.numpy(), ref.var(2), rtol=1e-5)


@pytest.mark.slow
def test_the_cli_takes_fused_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    args = ["capture", "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--model-arg",
            "width=4", "--data", "digits", "--limit", "40", "--batch-size", "16"]  # fmt: skip
    for name, extra in (("eager.h5", ""), ("fused.h5", ":fused=true")):
        res = CliRunner().invoke(
            cli,
            [
                *args,
                "--probe",
                f"residual{extra}",
                "--probe",
                f"channel{extra}",
                "--out",
                str(tmp_path / name),
            ],  # fmt: skip
        )
        assert res.exit_code == 0, res.output
        # a first batch that compiles is said to, not left to look like a hang
        assert ("first batch of each input shape compiles" in res.output) == bool(extra)
    eager, fused_cap = probe.open(tmp_path / "eager.h5"), probe.open(tmp_path / "fused.h5")
    assert {"probe": "residual", "fused": True} in fused_cap.config["probes"]
    for layer in eager.layers:
        for q in eager.quantities(layer):
            np.testing.assert_allclose(
                fused_cap.read(layer, q), eager.read(layer, q), rtol=1e-5, atol=1e-6
            )


def _fresh_fused(monkeypatch):
    """Every compiled statistic of the probes, not yet compiled."""
    monkeypatch.setattr(statistics, "_FUSED_RESIDUAL", Fused(residual_quantities))
    monkeypatch.setattr(statistics, "_FUSED_IDENTITY", Fused(identity_quantities))
    monkeypatch.setattr(statistics, "_FUSED_MOMENTS", Fused(statistics.moments))
    monkeypatch.setattr(statistics, "_FUSED_MOMENTS_OF_TWO", Fused(statistics.moments_of_two))
    monkeypatch.setattr(statistics, "_FUSED_BLOCK", Fused(statistics.block_statistics))
    monkeypatch.setattr(
        statistics, "_FUSED_IDENTITY_BLOCK", Fused(statistics.identity_block_statistics)
    )


def test_a_whole_resnet_compiles_each_statistic_once_whatever_its_sizes(monkeypatch):
    """The dynamically shaped path (off the CPU, or past STATIC_SIGNATURES): a batch the size of
    a block's width (16 and 16, 64 and 64), identity and projection shortcuts, a gradient pass:
    one compiled graph per function. Sizes that happen to be equal made Dynamo guard on the
    coincidence and compile again, up to its limit of 8, after which the remaining blocks ran
    eagerly."""
    monkeypatch.setattr(fused_module, "STATIC_SIGNATURES", 0)  # every call takes that path
    graphs = collections.Counter()
    compile_ = torch.compile

    def counting(fn, **kwargs):
        def backend(gm, inputs):
            graphs[fn.__name__] += 1
            return gm.forward

        return compile_(fn, **kwargs, backend=backend)

    torch._dynamo.reset()  # compiled code is cached per function, across Fused objects
    monkeypatch.setattr(torch, "compile", counting)
    _fresh_fused(monkeypatch)
    torch.manual_seed(0)
    model = probe.zoo.create("resnet20").eval()  # widths 16, 32, 64; option A and identity blocks
    pairs = {  # each probe alone, and both: one kernel for the two
        "residual": [ResidualNorms(fused=True)],
        "channel": [ChannelStats(fused=True)],
        "both": [ResidualNorms(fused=True), ChannelStats(fused=True)],
    }
    for probes in pairs.values():
        for n, more in ((16, []), (64, [probe.GradNorms()]), (7, [])):
            x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
            with warnings.catch_warnings():
                warnings.simplefilter("error", FusedStatsWarning)
                probe.capture(model, [(x, y)], probes=probes + more)
    torch._dynamo.reset()
    assert graphs == {
        "identity_quantities": 1,
        "residual_quantities": 1,
        "moments_of_two": 1,
        "identity_block_statistics": 1,
        "block_statistics": 1,
    }


def _static_compiles(monkeypatch):
    """The signatures compiled for fixed shapes, counted per function; each "compiled" to the
    eager function itself (the dispatch is under test here, not Inductor)."""
    compiled = collections.Counter()

    def counting(fn, args):
        compiled[fn.__name__] += 1

        def run(*tensors):
            given = iter(tensors)
            return fn(*(next(given) if isinstance(a, torch.Tensor) else a for a in args))

        return run

    monkeypatch.setattr(fused_module, "_compile_static", counting)
    return compiled


def test_on_the_cpu_each_signature_is_compiled_once_for_its_shapes(monkeypatch):
    """ResNet-20 at three batch sizes: one static compilation per block kind, width and batch
    size, none again for a second capture of the same shapes; past STATIC_SIGNATURES the rest go
    to one dynamically shaped function."""
    compiled = _static_compiles(monkeypatch)
    _fresh_fused(monkeypatch)
    torch.manual_seed(0)
    model = probe.zoo.create("resnet20", width=4).eval()
    probes = [ResidualNorms(fused=True), ChannelStats(fused=True)]
    batches = [(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))) for n in (4, 6, 3)]
    want = probe.capture(model, batches, probes=[ResidualNorms(), ChannelStats()])
    for _ in range(2):
        _assert_same(probe.capture(model, batches, probes=probes), want)
    # identity blocks in 3 stages, projection blocks in 2, at 3 batch sizes: compiled once each
    assert compiled == {"identity_block_statistics": 9, "block_statistics": 6}

    graphs = collections.Counter()
    compile_ = torch.compile

    def dynamic(fn, **kwargs):
        graphs[fn.__name__] += 1
        return compile_(fn, **kwargs, backend=lambda gm, inputs: gm.forward)

    monkeypatch.setattr(torch, "compile", dynamic)
    monkeypatch.setattr(fused_module, "STATIC_SIGNATURES", 2)
    compiled.clear()
    _fresh_fused(monkeypatch)
    torch._dynamo.reset()
    _assert_same(probe.capture(model, batches, probes=probes), want)
    torch._dynamo.reset()
    assert compiled == {"identity_block_statistics": 2, "block_statistics": 2}
    assert graphs == {"identity_block_statistics": 1, "block_statistics": 1}


def test_a_compiler_failure_warns_once_and_gives_the_eager_numbers(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    def broken_static(fn, args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused_module, "_compile_static", broken_static)
    _fresh_fused(monkeypatch)
    model, batches = _net(), _batches()
    with pytest.warns(FusedStatsWarning, match="no working C.. compiler") as seen:
        got = probe.capture(
            model, batches, probes=[ResidualNorms(fused=True), ChannelStats(fused=True)]
        )
    # once per compiled function, not per call: the two probes share one kernel per block kind
    # (identity and projection shortcuts)
    assert len(seen) == 2
    # the torch formulas computed eagerly (the one-pass kernels take their sums in float64)
    monkeypatch.setenv(onepass.ENV, "0")
    want = probe.capture(model, batches, probes=[ResidualNorms(), ChannelStats()])
    # the same formulas but for the eager channel variance on the CPU, E[x^2] - E[x]^2 where it
    # keeps its digits: up to ONE_PASS_MAX_RATIO float32 roundings of the two-pass one's
    rtol = statistics.ONE_PASS_MAX_RATIO * 8 * 2**-24
    for layer in want.layers:
        for q in want.quantities(layer):
            np.testing.assert_allclose(got.read(layer, q), want.read(layer, q), rtol=rtol)
    assert statistics._FUSED_BLOCK.failed.startswith("RuntimeError: InvalidCxxCompiler")
    assert statistics._FUSED_BLOCK.static_failed.startswith("RuntimeError: InvalidCxxCompiler")


def _counted(monkeypatch):
    """Every fused statistic computed eagerly (the same formulas), its calls counted by name."""
    calls = collections.Counter()
    fns = {
        "_FUSED_RESIDUAL": residual_quantities,
        "_FUSED_IDENTITY": identity_quantities,
        "_FUSED_MOMENTS": statistics.moments,
        "_FUSED_MOMENTS_OF_TWO": statistics.moments_of_two,
        "_FUSED_BLOCK": statistics.block_statistics,
        "_FUSED_IDENTITY_BLOCK": statistics.identity_block_statistics,
    }
    for attr, fn in fns.items():

        def counting(*args, fn=fn):
            calls[fn.__name__] += 1
            return fn(*args)

        monkeypatch.setattr(statistics, attr, counting)
    return calls


def _assert_same(got, want, rtol=1e-5):
    assert got.layers == want.layers
    for layer in want.layers:
        assert set(got.quantities(layer)) >= set(want.quantities(layer))
        for q in want.quantities(layer):
            np.testing.assert_allclose(
                got.read(layer, q),
                want.read(layer, q),
                rtol=rtol,
                atol=1e-6,
                err_msg=f"{layer} {q}",
            )


@pytest.mark.parametrize("grouped", [False, True])
def test_the_two_fused_probes_read_each_block_in_one_kernel(monkeypatch, grouped):
    """ResidualNorms and ChannelStats, both fused, in either order: one shared kernel per block
    (per group of equal blocks when grouped), none of their own, and the eager probes' numbers."""
    calls = _counted(monkeypatch)
    torch.manual_seed(0)
    model = probe.zoo.create("resnet20", width=4).eval()  # identity and option-A blocks
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    want = probe.capture(model, [(x, y)], probes=[ResidualNorms(), ChannelStats()])
    for order in (1, -1):
        calls.clear()
        probes = [ResidualNorms(fused=True), ChannelStats(fused=True)][::order]
        got = probe.capture(model, [(x, y)], probes=probes, grouped=grouped)
        _assert_same(got, want)
        kernels = calls["identity_block_statistics"] + calls["block_statistics"]
        assert set(calls) == {"identity_block_statistics", "block_statistics"}
        # 9 blocks: 7 identity, 2 downsampling; grouped: the runs of equal blocks of 3 stages
        assert kernels == (5 if grouped else 9), calls


def test_the_shared_kernel_reads_the_channel_axis_of_the_layout_given(monkeypatch):
    """ChannelStats(layout="NHWC") on [N, C, H, W] maps reads W as the channel axis: the shared
    kernel moves that axis, and both probes keep the eager numbers."""
    calls = _counted(monkeypatch)
    model, batch = _net(), _batches()[:1]
    got = probe.capture(
        model, batch, probes=[ResidualNorms(fused=True), ChannelStats(layout="NHWC", fused=True)]
    )
    want = probe.capture(model, batch, probes=[ResidualNorms(), ChannelStats(layout="NHWC")])
    _assert_same(got, want)
    assert set(calls) == {"identity_block_statistics", "block_statistics"}


def test_a_subclass_is_not_paired(monkeypatch):
    """A subclass of ChannelStats may compute something else: the fused ResidualNorms beside it
    computes its own kernel, and the subclass its own."""

    @dataclass
    class Mine(ChannelStats):
        name: ClassVar[str] = "mine"

    calls = _counted(monkeypatch)
    model, batch = _net(), _batches()[:1]
    got = probe.capture(model, batch, probes=[ResidualNorms(fused=True), Mine(fused=True)])
    want = probe.capture(model, batch, probes=[ResidualNorms(), Mine()])
    _assert_same(got, want)
    assert set(calls) == {"identity_quantities", "residual_quantities", "moments_of_two"}


class _TokenBlock(torch.nn.Module):
    """x + MLP(LayerNorm(x)) on [N, T, C] tokens: a residual site found by tracing."""

    def __init__(self, d=6):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 12), torch.nn.GELU(), torch.nn.Linear(12, d)
        )

    def forward(self, x):
        return x + self.mlp(self.ln(x))


def test_the_shared_kernel_reads_tokens_channel_last(monkeypatch):
    """[N, T, C] tokens ("auto" layout: the channel axis is the last): the shared kernel moves it
    first and both probes keep the eager numbers, channel moments over the tokens."""
    calls = _counted(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(_TokenBlock() for _ in range(3))).eval()
    batch = [(torch.randn(5, 4, 6).add_(2.0), torch.zeros(5, 6))]
    loss = torch.nn.MSELoss(reduction="none")
    kinds = {
        "fused": [ResidualNorms(fused=True), ChannelStats(fused=True)],
        "eager": [ResidualNorms(), ChannelStats()],
    }
    got, want = (
        probe.capture(model, batch, probes=p, loss_fn=loss, grouped=False)  # a kernel per block
        for p in kinds.values()
    )
    _assert_same(got, want)
    assert calls["identity_block_statistics"] == 3 and set(calls) == {"identity_block_statistics"}
    assert got.read(got.layers[0], "channel_mean").shape == (5, 6)


@pytest.mark.slow
def test_the_compiled_shared_kernel_on_a_channels_last_net_equals_eager():
    """Channels-last memory (NCHW shapes, NHWC strides): the compiled kernel reads the strides
    it is given and gives the eager probes' numbers."""
    model = _net().to(memory_format=torch.channels_last)
    batches = [(x.to(memory_format=torch.channels_last), y) for x, y in _batches()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedStatsWarning)
        got = probe.capture(
            model, batches, probes=[ResidualNorms(fused=True), ChannelStats(fused=True)]
        )
    want = probe.capture(model, batches, probes=[ResidualNorms(), ChannelStats()])
    _assert_same(got, want)


@pytest.mark.slow
def test_the_compiled_shared_kernel_under_cpu_autocast_equals_eager():
    """Inside the user's bf16 autocast (a signature of its own: the graph is traced under it)
    the compiled kernel gives the eager probes' numbers of the same pass."""
    model, batches = _net(), _batches()
    kinds = {
        "fused": [ResidualNorms(fused=True), ChannelStats(fused=True)],
        "eager": [ResidualNorms(), ChannelStats()],
    }
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error", FusedStatsWarning)
        got, want = (probe.capture(model, batches, probes=p) for p in kinds.values())
    _assert_same(got, want)
