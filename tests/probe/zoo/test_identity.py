"""The identity constructions are exact where they claim to be, and their train-mode error is the
sampling error of batch statistics (it vanishes on the batch they were measured on)."""

import pytest
import torch
from torch import nn

from probe.errors import ProbeError
from probe.zoo import create
from probe.zoo.identity import construct_deeper_, dirac_, identity_blocks_


def _trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """A net whose BNs are far from their init (scale, shift and running statistics random), so
    that copying them matters and no test passes because everything is 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def _batches(n: int, batch: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(n)]


def _block_io(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    io = []
    hooks = [b.register_forward_hook(lambda m, i, o: io.append((i[0], o))) for b in net.blocks()]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return io


def test_dirac_kernels_pass_the_input_and_copy_channels_when_widening():
    net = dirac_(create("plain8", in_channels=1, width=4))
    x = torch.rand(3, 4, 8, 8)
    square = net.stages[0][0].branch.conv1
    torch.testing.assert_close(square(x), x, rtol=0, atol=1e-6)
    widening = net.stages[1][0].branch.conv1  # 4 -> 8 channels, stride 2
    y = widening(x)
    expected = x[:, [0, 1, 2, 3, 0, 1, 2, 3], ::2, ::2]  # channel j reads j mod 4, subsampled
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_identity_blocks_make_every_plain_block_the_identity_in_eval_mode():
    torch.manual_seed(0)
    net = create("plain20", in_channels=1, width=4)
    identity_blocks_(net, net.blocks(), _batches(8))
    net.eval()
    io = _block_io(net, _batches(1, seed=7)[0])
    assert len(io) == 9
    for x, y in io:
        c = x.shape[1]
        if y.shape == x.shape:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
        else:  # the downsampling blocks: subsample and copy channels
            idx = [j % c for j in range(y.shape[1])]
            torch.testing.assert_close(y, x[:, idx, ::2, ::2], rtol=1e-5, atol=1e-5)
        assert x.abs().sum() > 0  # not trivially zero


@pytest.mark.parametrize("family", ["plain", "resnet"])
def test_constructed_deep_net_equals_the_shallow_one_in_eval_mode(family):
    torch.manual_seed(0)
    shallow = _trained_like(create(f"{family}8", in_channels=1, width=4))
    deep = create(f"{family}20", in_channels=1, width=4)
    built = construct_deeper_(deep, shallow, _batches(6))
    assert built.copied == ("stages.0.0", "stages.1.0", "stages.2.0")
    assert len(built.extra) == 6 and built.eval_max_abs_diff < 1e-5
    x = _batches(1, seed=9)[0]
    deep.eval()
    torch.testing.assert_close(deep(x), shallow(x), rtol=1e-5, atol=1e-5)
    assert shallow(x).abs().max() > 0.1  # the logits are not trivially zero


def test_residual_construction_is_exact_in_train_mode_too():
    """Extra branches are zero in both modes (last BN scale 0), so the batch statistics of the
    copied layers are the shallow net's own: train-mode outputs agree to rounding."""
    torch.manual_seed(0)
    shallow = _trained_like(create("resnet8", in_channels=1, width=4))
    deep = create("resnet20", in_channels=1, width=4)
    built = construct_deeper_(deep, shallow, _batches(4))
    assert built.train_rel_diff < 1e-5
    x = _batches(1, seed=3)[0]
    deep.train(), shallow.train()
    torch.testing.assert_close(deep(x), shallow(x), rtol=1e-5, atol=1e-5)


def test_plain_construction_in_train_mode_is_exact_on_its_measured_batch():
    """With one batch, the measured statistics are that batch's: train mode is then exact too --
    the train-mode deviation is the sampling error of the statistics, nothing else."""
    torch.manual_seed(0)
    shallow = _trained_like(create("plain8", in_channels=1, width=4))
    deep = create("plain20", in_channels=1, width=4)
    (x,) = _batches(1, batch=64)
    built = construct_deeper_(deep, shallow, [x])
    assert built.train_rel_diff < 1e-4


def test_plain_train_mode_deviation_shrinks_with_the_batch_size():
    """The relative deviation of batch statistics from the measured ones scales as
    1/sqrt(batch x H x W); a batch 16x larger must cut it by well over half (4x in theory)."""
    dev = {}
    for batch in (8, 128):
        torch.manual_seed(0)
        shallow = _trained_like(create("plain8", in_channels=1, width=4))
        deep = create("plain20", in_channels=1, width=4)
        dev[batch] = construct_deeper_(deep, shallow, _batches(16, batch=batch)).train_rel_diff
    assert 0 < dev[128] < dev[8] / 2


def test_bad_constructions_are_clear_errors():
    shallow = create("plain8", in_channels=1, width=4)
    with pytest.raises(ProbeError, match="deeper"):
        construct_deeper_(create("plain8", in_channels=1, width=4), shallow, _batches(1))
    with pytest.raises(ProbeError, match="width"):
        construct_deeper_(create("plain20", in_channels=1, width=8), shallow, _batches(1))
    with pytest.raises(ProbeError, match="pre-activation"):
        identity_blocks_(
            create("preplain8", in_channels=1), create("preplain8", in_channels=1).blocks(), []
        )
    with pytest.raises(ProbeError, match="at least one batch"):
        construct_deeper_(create("plain20", in_channels=1, width=4), shallow, [])


@pytest.mark.parametrize("scale,family", [(0.0, "plain"), (1.0, "resnet")])
def test_scaled_shortcut_at_0_and_1_is_the_plain_and_the_residual_net(scale, family):
    """lambda = 0 is the plain net and lambda = 1 the ResNet (He et al. 2016b, Table 1), with the
    same seed giving the same weights."""
    torch.manual_seed(0)
    scaled = create("resnet20", in_channels=1, width=4, shortcut_scale=scale).eval()
    torch.manual_seed(0)
    ref = create(f"{family}20", in_channels=1, width=4).eval()
    x = _batches(1)[0]
    torch.testing.assert_close(scaled(x), ref(x), rtol=0, atol=0)
    torch.manual_seed(0)
    half = create("resnet20", in_channels=1, width=4, shortcut_scale=0.5).eval()
    assert not torch.allclose(half(x), ref(x))
