"""Jacobian estimators against exact jacrev in float64, with tolerances from the estimator variance."""

import math

import pytest
import torch

from probe.jacobian import (
    autocorrelation,
    exact_jacobian,
    hutchinson,
    lanczos_spectrum,
    segment_spectrum,
    top_singular_values,
)
from probe.zoo import BasicBlock, create

M = 64  # probe vectors


def _block(c_in, c_out, stride, residual, preact=False, shortcut="A"):
    torch.manual_seed(1)
    b = (
        BasicBlock(c_in, c_out, stride, residual=residual, preact=preact, shortcut=shortcut)
        .double()
        .eval()
    )
    for m in b.modules():  # non-trivial eval-mode BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return b


def _rademacher_var(sym):
    """Var(v^T S v) for symmetric S and Rademacher v: 2 (||S||_F^2 - sum_i S_ii^2)."""
    return 2 * ((sym**2).sum((-2, -1)) - (sym.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1))


CASES = [(4, 4, 1, True), (4, 4, 1, False), (4, 8, 2, True), (4, 8, 2, False)]


@pytest.mark.parametrize("c_in,c_out,stride,residual", CASES)
def test_hutchinson_within_four_standard_errors_of_exact(c_in, c_out, stride, residual):
    block = _block(c_in, c_out, stride, residual)
    x = torch.randn(3, c_in, 6, 6, dtype=torch.float64)
    J = exact_jacobian(block, x).detach()
    P = exact_jacobian(block.shortcut, x).detach()
    identity = stride == 1 and c_in == c_out
    with torch.no_grad():
        r = hutchinson(
            block, x, M, shortcut=None if identity else block.shortcut, identity_shortcut=identity
        )
    checks = [(r.fro2, J.mT @ J), (r.dev2, (J - P).mT @ (J - P))]
    if J.shape[1] == J.shape[2]:
        checks.append((r.trace, (J + J.mT) / 2))
    for est, sym in checks:
        exact = sym.diagonal(dim1=-2, dim2=-1).sum(-1)
        se = torch.sqrt(_rademacher_var(sym) / M)
        assert torch.all((est - exact).abs() <= 4 * se + 1e-9), (est, exact, se)
    assert torch.allclose(r.p_fro2, (P**2).sum((1, 2)))  # exact: Pv only selects entries of v


def test_reported_standard_error_matches_the_exact_one():
    block = _block(4, 4, 1, True)
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    J = exact_jacobian(block, x).detach()
    with torch.no_grad():
        r = hutchinson(block, x, 256, identity_shortcut=True)
    exact_se = torch.sqrt(_rademacher_var(J.mT @ J) / 256)
    ratio = r.fro2_se / exact_se
    assert torch.all((ratio > 0.7) & (ratio < 1.3)), ratio


@pytest.mark.parametrize("c_in,c_out,stride,residual", CASES)
def test_top_singular_value_within_one_percent(c_in, c_out, stride, residual):
    block = _block(c_in, c_out, stride, residual)
    x = torch.randn(2, c_in, 6, 6, dtype=torch.float64)
    exact = torch.linalg.svdvals(exact_jacobian(block, x).detach())[:, :2]
    with torch.no_grad():
        est = top_singular_values(block, x, k=2, iters=30)
    assert torch.all((est[:, 0] - exact[:, 0]).abs() / exact[:, 0] < 0.01), (est, exact)


def test_lanczos_quadrature_matches_moments_of_the_spectrum():
    block = _block(4, 4, 1, True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ev = torch.linalg.svdvals(exact_jacobian(block, x).detach()) ** 2
    with torch.no_grad():
        nodes, weights = lanczos_spectrum(block, x, steps=40, n_vectors=8)
    assert torch.allclose(weights.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose((nodes * weights).sum(-1), ev.mean(-1), rtol=0.1)
    assert torch.allclose(nodes.max(-1).values, ev.max(-1).values, rtol=1e-3)


@pytest.mark.parametrize("stride,c_out", [(1, 4), (2, 8)])
def test_zero_branch_preact_block_has_jacobian_exactly_p(stride, c_out):
    block = _block(4, c_out, stride, True, preact=True)
    block.zero_init_()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        r = hutchinson(block, x, 8, shortcut=block.shortcut, identity_shortcut=stride == 1)
    assert torch.equal(r.dev2, torch.zeros_like(r.dev2))
    J, P = exact_jacobian(block, x), exact_jacobian(block.shortcut, x)
    assert torch.equal(J, P)


@pytest.mark.parametrize("stride,c_out", [(1, 4), (2, 8)])
def test_zero_branch_postact_block_has_jacobian_diag_relu_mask_times_p(stride, c_out):
    block = _block(4, c_out, stride, True)
    block.zero_init_()
    block.branch.bn2.bias.data.zero_()  # F(x) = 0 exactly (zero_init_ zeroes gamma; beta starts at 0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    J, P = exact_jacobian(block, x), exact_jacobian(block.shortcut, x)
    mask = (block.shortcut(x) > 0).flatten(1).double()  # [N, dout]
    assert torch.equal(J, mask[:, :, None] * P)


def test_segment_spectrum_matches_exact_input_to_logit_jacobian():
    torch.manual_seed(0)
    model = create("resnet8", in_channels=1, width=2, num_classes=3).double().eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    J = exact_jacobian(model, x).detach()
    out = segment_spectrum(model, x, None, None, n_probes=256, top_k=1, iters=40)
    # The mean over the min(d_in, d_out) = 3 singular values of the 3 x 16 Jacobian.
    exact_msv = (torch.linalg.svdvals(J) ** 2).mean(1)
    assert torch.all((out["msv"] - exact_msv).abs() <= 4 * out["msv_se"] + 1e-12)
    assert torch.allclose(out["top_sv"][:, 0], torch.linalg.svdvals(J)[:, 0], rtol=1e-3)


def test_autocorrelation_of_known_series():
    t = torch.arange(200, dtype=torch.float64)
    acf = autocorrelation(torch.cos(2 * math.pi * t / 20), 11)
    assert acf[0] == pytest.approx(1.0) and acf[10] == pytest.approx(-0.95, abs=0.05)


def test_segment_probe_matches_exact_jacobians():
    import probe
    from probe.jacobian import SegmentJacobians, segment

    torch.manual_seed(0)
    model = create("resnet8", in_channels=1, width=2, num_classes=3).double().eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    cap = probe.capture(model, [x], probes=[SegmentJacobians(n_probes=256, max_samples=None)])
    j_in = exact_jacobian(segment(model, None, "stages.1.0"), x).detach()
    with torch.no_grad():
        h = segment(model, None, "stages.1.0")(x)
    j_out = exact_jacobian(segment(model, "stages.1.0", None), h).detach()
    # Mean squared singular value: over the min(d_in, d_out) singular values of each Jacobian.
    exact_in = (torch.linalg.svdvals(j_in) ** 2).mean(1)
    exact_out = (torch.linalg.svdvals(j_out) ** 2).mean(1)
    k = 2  # boundaries: stem, stages.0.0, stages.1.0, stages.2.0
    assert torch.allclose(
        torch.from_numpy(cap.read("model", "seg_in_msv")[:, k]).double(), exact_in, rtol=0.2
    )
    assert torch.allclose(
        torch.from_numpy(cap.read("model", "seg_out_msv")[:, k]).double(), exact_out, rtol=0.2
    )


def test_param_grad_probe_matches_per_sample_autograd():
    import probe
    from probe.probes.params import ParamGradNorms

    model = create("resnet8", in_channels=1, width=4).eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    cap = probe.capture(model, [(x, y)], probes=[ParamGradNorms(max_samples=None)])
    for n in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        for name, p in model.named_parameters():
            assert cap.read("model", f"grad_norm.{name}")[n] == pytest.approx(
                p.grad.norm().item(), rel=1e-4
            )
