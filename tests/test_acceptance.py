"""Acceptance checks that take minutes (``-m slow``) or need a CUDA device (``-m gpu``)."""

import contextlib

import numpy as np
import pytest
import torch

import probe
from probe.train import TrainConfig, train


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 12 trainings: 240 s alone on a slow 2-core CPU, more beside others
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


@contextlib.contextmanager
def _float32_convolutions():
    """TF32 off for the block: CUDA's default TF32 convolutions differ from the CPU's float32 at
    ~1e-3 relative per layer, which compounds with depth into differences of the model, not of
    the probes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("to_disk", [True, False], ids=["hdf5", "memory"])
def test_cuda_capture_equals_a_reference_on_the_same_device(tmp_path, to_disk):
    """Pinned, non-blocking copies (to the writer thread, or into memory at the end of each
    batch) deliver exactly the block outputs a hand-written hook sees on the GPU (same device,
    same kernels, same bf16 rounding)."""
    torch.manual_seed(0)
    model = probe.zoo.create("resnet20").eval().cuda()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]  # two batches: buffers are reused
    seen: dict[str, list[torch.Tensor]] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        b.register_forward_hook(
            lambda m, a, o: seen.setdefault(names[m], []).append(o.detach().bfloat16().float())
        )
        for b in model.blocks()
    ]
    try:
        with torch.no_grad():
            for xb, _ in batches:  # the capture's batch shapes, so cuDNN picks the same kernels
                model(xb.cuda())
    finally:
        for h in hooks:
            h.remove()
    cap = probe.capture(
        model,
        batches,
        probes=[probe.Activations(dtype="bf16")],
        out=tmp_path / "a.h5" if to_disk else None,
    )
    assert sorted(cap.layers) == sorted(seen)
    for layer, ref in seen.items():
        np.testing.assert_array_equal(
            cap.read(layer, "output"), torch.cat(ref).cpu().numpy(), err_msg=layer
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_with_pinned_copies_equals_cpu(tmp_path):
    """Every quantity of a GPU capture equals the CPU's, with float32 convolutions on both."""
    model = probe.zoo.create("resnet20").eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    probes = [
        probe.ResidualNorms(),
        probe.ChannelStats(),
        probe.GradNorms(),
        probe.Activations(dtype="bf16"),
    ]
    cpu = probe.capture(model, [(x, y)], probes=probes)
    with _float32_convolutions():
        gpu = probe.capture(model.cuda(), [(x, y)], probes=probes, out=tmp_path / "c.h5")
    worse = []
    for layer in cpu.layers:
        for q in cpu.quantities(layer):
            g, c = gpu.read(layer, q), cpu.read(layer, q)
            rel, floor = _cross_device_tolerance(q)
            bound = rel * np.maximum(np.abs(g), np.abs(c)) + floor * np.abs(c).max()
            if q.startswith("cos"):
                bound = np.full_like(c, floor)
            excess = float((np.abs(g - c) / np.maximum(bound, 1e-30)).max())
            if excess > 1:
                worse.append((layer, q, float(np.abs(g - c).max()), excess))
    assert not worse, worse


def _cross_device_tolerance(quantity: str) -> tuple[float, float]:
    """(relative, floor) for one quantity of a float32 GPU capture against the CPU's; a cosine's
    floor is absolute (a cosine is a dot product that cancels, bounded by 1)."""
    if quantity == "output":
        # a bf16 value may round to a neighbour of the CPU's, one unit in its last place away
        return 2**-7, 1e-6
    if "grad" in quantity:
        # gradients reach the first block through every layer's backward, where a pre-activation
        # within float32 error of zero can pass its ReLU on one device and not the other: on an
        # H200 one sample's cos_f_grad differed by 4.2e-4, the others' by ~1e-8
        return 2e-3, 2e-3
    # forward statistics: float32 kernels that differ in summation order (~1e-6 relative)
    return 1e-4, 1e-5
