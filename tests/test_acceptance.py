"""Acceptance checks that take minutes (``-m slow``) or need a CUDA device (``-m gpu``)."""

import numpy as np
import pytest
import torch

import probe
from probe.train import TrainConfig, train


@pytest.mark.slow
def test_digits_degradation_over_three_seeds(tmp_path):
    """plain-32 ends with higher training error than plain-8; resnet-32 does not exceed resnet-8."""
    err = {}
    for seed in (0, 1, 2):
        for model in ("plain8", "plain32", "resnet8", "resnet32"):
            res = train(
                TrainConfig(
                    model=model, seed=seed, save_at="last", out=str(tmp_path / f"{model}-{seed}")
                )
            )
            err[model, seed] = res.final["train_error"]
    for seed in (0, 1, 2):
        assert err["plain32", seed] > err["plain8", seed], err
        assert err["resnet32", seed] <= err["resnet8", seed], err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_with_pinned_copies_equals_cpu(tmp_path):
    model = probe.zoo.create("resnet20").eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    probes = [
        probe.ResidualNorms(),
        probe.ChannelStats(),
        probe.GradNorms(),
        probe.Activations(dtype="bf16"),
    ]
    cpu = probe.capture(model, [(x, y)], probes=probes)
    gpu = probe.capture(model.cuda(), [(x, y)], probes=probes, out=tmp_path / "c.h5")
    for layer in cpu.layers:
        for q in cpu.quantities(layer):
            assert np.allclose(gpu.read(layer, q), cpu.read(layer, q), rtol=2e-2, atol=2e-2), (
                layer,
                q,
            )
