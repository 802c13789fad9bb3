"""Jacobian and per-sample gradient probes under autocast: the block (or model) is differentiated
in its parameters' precision with autocast off, at the input the (low-precision) pass produced.
They failed outright before (a convolution met functorch's float32 dual input and autocast's bf16
weights)."""

import copy

import numpy as np
import torch
from torch.func import jacrev

import probe
from probe.conformance import RawSites


def _model():
    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval()


def _capture(model, x, probes, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return probe.capture(model, [x], probes=probes)


def test_a_block_jacobian_under_autocast_matches_float64_at_the_pass_input():
    """||J - I||^2 of an identity block, estimated under bf16 autocast, against jacrev in float64
    at the block input the autocast pass produced: within five of the estimator's own standard
    errors for every sample."""
    model, x = _model(), torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    probes = [probe.JacobianNorms(n_probes=64, top_k=0), RawSites()]
    cap = _capture(model, x, probes, autocast=True)
    block = copy.deepcopy(model.stages[0][0]).double().requires_grad_(False)
    inputs = torch.from_numpy(cap.read("stages.0.0", "X")).double()
    est, se = cap.read("stages.0.0", "jac_dev2"), cap.read("stages.0.0", "jac_dev2_se")
    for n, xn in enumerate(inputs):
        jac = jacrev(lambda z: block(z[None])[0])(xn).reshape(xn.numel(), xn.numel())
        exact = float(((jac - torch.eye(xn.numel(), dtype=torch.float64)) ** 2).sum())
        assert abs(est[n] - exact) <= 5 * se[n], (n, est[n], exact, se[n])


def test_model_level_jacobian_probes_under_autocast_equal_the_float32_capture():
    """Segment Jacobians and shattered gradients start from the model input (float32): with
    autocast off inside the probes, they are the float32 capture's numbers exactly."""
    model, x = _model(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    probes = [probe.SegmentJacobians(), probe.ShatteredGradients(n_points=8, max_lag=4)]
    plain, mixed = (_capture(model, x, probes, autocast=a) for a in (False, True))
    for q in plain.quantities("model"):
        np.testing.assert_array_equal(mixed.read("model", q), plain.read("model", q), err_msg=q)


def test_per_sample_parameter_gradients_under_autocast_equal_the_float32_capture():
    """vmap(grad) over the model input (float32) failed under autocast; with autocast off inside
    the probe it gives the float32 capture's numbers exactly."""
    model, x = _model(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 3, 5, 9])
    probes = [probe.ParamGradNorms(max_samples=4)]
    plain, mixed = (_capture_labelled(model, x, y, probes, autocast=a) for a in (False, True))
    assert plain.quantities("model")
    for q in plain.quantities("model"):
        np.testing.assert_array_equal(mixed.read("model", q), plain.read("model", q), err_msg=q)


def _capture_labelled(model, x, y, probes, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return probe.capture(model, [(x, y)], probes=probes)
