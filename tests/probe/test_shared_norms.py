"""The eager ResidualNorms and ChannelStats share their passes over a block's y and F(x): the
per-sample norms come from ChannelStats' per-channel sums of squares, and GradNorms takes the
forward pass's ||F||. The numbers stay those of each probe alone and of numpy in float64.

These are the torch formulas' passes: the one-pass kernels are off here (they share one read of
each tensor instead: tests/probe/test_onepass.py)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import probe
from probe.conformance import RawSites
from probe.probes import onepass, statistics
from probe.probes.base import BlockTensors, Call
from probe.probes.statistics import ChannelStats, GradNorms, ResidualNorms


@pytest.fixture(autouse=True)
def _torch_formulas(monkeypatch):
    monkeypatch.setenv(onepass.ENV, "0")


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval().to(dtype)


def _batches(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g))
        for n in (5, 3)
    ]


def _capture(probes, dtype=torch.float32, grouped=False):
    return probe.capture(_net(dtype), _batches(dtype), probes=probes, grouped=grouped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("order", ["residual first", "channel first"])
def test_shared_sums_give_each_probes_numbers_and_numpys(dtype, order, statistics_reference):
    pair = [ResidualNorms(), ChannelStats()]
    shared = _capture([*(pair if order == "residual first" else pair[::-1]), RawSites()], dtype)
    alone = {kind: _capture([kind()], dtype) for kind in (ResidualNorms, ChannelStats)}
    rtol = 1e-10 if dtype == torch.float64 else 1e-5  # bf16 values are exact in float32
    blocks = 0
    for layer in shared.layers:
        if "F" not in shared.quantities(layer):
            continue
        blocks += 1
        raw = {k: torch.from_numpy(shared.read(layer, k)) for k in "XFSY"}
        for q, want in statistics_reference(raw).items():
            have = shared.read(layer, q)
            np.testing.assert_allclose(have, want, rtol=rtol, atol=rtol, err_msg=f"{layer} {q}")
        for q in ("channel_mean", "channel_var", "f_channel_mean", "f_channel_var"):
            # the very sums ChannelStats takes alone: equal to the bit
            np.testing.assert_array_equal(
                shared.read(layer, q), alone[ChannelStats].read(layer, q), err_msg=q
            )
        for q in ("x_norm", "f_norm", "s_norm", "y_norm", "dev_norm", "cos_ys", "cos_fs"):
            # the same sums added in another order
            np.testing.assert_allclose(
                shared.read(layer, q), alone[ResidualNorms].read(layer, q), rtol=rtol, err_msg=q
            )
    assert blocks == 3


def _norm_calls(monkeypatch, probes, grouped=False) -> int:
    calls = []
    real = statistics.per_sample_norm

    def counted(t):
        calls.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(statistics, "per_sample_norm", counted)
    _capture(probes, grouped=grouped)
    monkeypatch.setattr(statistics, "per_sample_norm", real)
    return len(calls)


@dataclass
class _OwnChannelStats(ChannelStats):
    """A subclass may compute other moments: it is never paired."""


def test_the_pair_takes_no_pass_of_its_own_over_y_and_f(monkeypatch):
    blocks, batches = 3, 2
    alone = _norm_calls(monkeypatch, [ResidualNorms()])
    assert (
        _norm_calls(monkeypatch, [ResidualNorms(), ChannelStats()]) == alone - 2 * blocks * batches
    )
    assert (
        _norm_calls(monkeypatch, [ChannelStats(), ResidualNorms()]) == alone - 2 * blocks * batches
    )
    # not shared: with a subclass, or with a fused partner
    assert _norm_calls(monkeypatch, [ResidualNorms(), _OwnChannelStats()]) == alone
    assert _norm_calls(monkeypatch, [ResidualNorms(), ChannelStats(fused=True)]) == alone


def test_a_channels_last_layout_shares_its_sums():
    model = _net().to(memory_format=torch.channels_last)
    batches = [(x.to(memory_format=torch.channels_last), y) for x, y in _batches()]
    shared = probe.capture(
        model, batches, probes=[ResidualNorms(), ChannelStats(layout="NCHW")], grouped=False
    )
    alone = probe.capture(model, batches, probes=[ChannelStats(layout="NCHW")], grouped=False)
    norms = probe.capture(model, batches, probes=[ResidualNorms()], grouped=False)
    for layer in alone.layers:
        for q in alone.quantities(layer):
            np.testing.assert_array_equal(shared.read(layer, q), alone.read(layer, q))
        for q in norms.quantities(layer):
            np.testing.assert_allclose(shared.read(layer, q), norms.read(layer, q), rtol=1e-5)


def _block_call(f: torch.Tensor) -> Call:
    torch.manual_seed(3)
    x = torch.randn_like(f)
    y = torch.relu(x + f)
    call = Call("b", torch.nn.Identity(), x, y, 0, BlockTensors(x=x, f=f, s=x, y=y, residual=True))
    call.grad_input = torch.randn_like(f)
    return call


def test_grad_norms_take_the_forward_norm_of_f_unless_f_changed_since():
    f = torch.randn(4, 3, 5, 5)
    call = _block_call(f)
    ResidualNorms().forward(call)
    want = statistics.per_sample_cos(f, call.grad_input)
    torch.testing.assert_close(GradNorms().backward(call)["cos_f_grad"], want)
    f.mul_(-2)  # in place after the forward pass: the kept norm no longer holds
    want = statistics.per_sample_cos(f, call.grad_input)
    torch.testing.assert_close(GradNorms().backward(call)["cos_f_grad"], want)


def test_grad_norms_reuse_the_kept_norm(monkeypatch):
    call = _block_call(torch.randn(4, 3, 5, 5))
    ResidualNorms().forward(call)
    normed = []
    real = statistics.per_sample_norm
    monkeypatch.setattr(statistics, "per_sample_norm", lambda t: normed.append(t) or real(t))
    GradNorms().backward(call)
    assert not any(t is call.block.f for t in normed)
