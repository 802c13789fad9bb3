"""Measures against numpy references and hand-computable cases."""

import numpy as np
import pytest
import torch

import analyses
import probe
from analyses.cka import MinibatchCKA, cka_matrix, gram, hsic_unbiased, linear_cka


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_zero_branch_gives_ratio_zero_and_closeness_zero():
    """A zero-initialised preact block is exactly S(x): ||F|| = 0 and y = S(x)."""
    model = probe.zoo.create("preresnet8", in_channels=1, width=4, zero_init=True).eval()
    cap = probe.capture(model, [torch.randn(6, 1, 8, 8)], probes=[probe.ResidualNorms()])
    ratio = analyses.residual_magnitude(cap).query("quantity == 'residual_ratio'")["value"]
    close = analyses.identity_closeness(cap).query("quantity == 'closeness'")["value"]
    assert (ratio == 0).all() and (close == 0).all()


def test_zero_branch_postact_closeness_is_relu_gap():
    model = probe.zoo.create("resnet8", in_channels=1, width=4, zero_init=True).eval()
    cap = probe.capture(
        model, [torch.rand(6, 1, 8, 8) + 0.1], layers="stages.0.0", probes=[probe.ResidualNorms()]
    )
    # the block input is post-ReLU (>= 0), so y = relu(x) = x = S(x): closeness exactly 0.
    assert (
        analyses.closeness(
            cap.read("stages.0.0", "dev_norm"), cap.read("stages.0.0", "s_norm")
        ).max()
        == 0
    )


def test_closeness_and_ratio_match_numpy(rng):
    f, s, y = rng.normal(size=(3, 50, 20))
    ref_d = np.linalg.norm(y - s, axis=1) / np.linalg.norm(s, axis=1)
    assert np.allclose(
        analyses.closeness(np.linalg.norm(y - s, axis=1), np.linalg.norm(s, axis=1)), ref_d
    )
    ref_r = np.linalg.norm(f, axis=1) / np.linalg.norm(s, axis=1)
    assert np.allclose(
        analyses.residual_ratio(np.linalg.norm(f, axis=1), np.linalg.norm(s, axis=1)), ref_r
    )
    share = analyses.residual_share(np.linalg.norm(f, axis=1), np.linalg.norm(y, axis=1))
    assert share == pytest.approx((f**2).sum() / (y**2).sum())


def test_jacobian_deviation_of_identity_is_zero():
    assert analyses.jacobian_deviation(np.zeros(3), np.full(3, 10.0)).tolist() == [0, 0, 0]


def test_cka_of_x_with_itself_is_one(rng):
    x = rng.normal(size=(40, 30))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x, unbiased=True) == pytest.approx(1.0)


def test_cka_invariant_to_isotropic_scaling_and_orthogonal_transforms(rng):
    x, y = rng.normal(size=(60, 12)), rng.normal(size=(60, 7))
    y = y + x[:, :7]
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    for unbiased in (False, True):
        ref = linear_cka(x, y, unbiased)
        assert linear_cka(3.7 * x, y, unbiased) == pytest.approx(ref)
        assert linear_cka(x @ q, y, unbiased) == pytest.approx(ref)


def test_biased_cka_matches_feature_space_formula(rng):
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 5))
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(ref)


def test_unbiased_hsic_matches_naive_u_statistic(rng):
    """HSIC_1 equals the U-statistic definition computed by brute force (Song et al. 2012)."""
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    k, l = gram(x), gram(y)
    n = 8
    kt, lt = k * (1 - np.eye(n)), l * (1 - np.eye(n))
    ref = (
        np.trace(kt @ lt)
        + kt.sum() * lt.sum() / ((n - 1) * (n - 2))
        - 2 / (n - 2) * kt.sum(0) @ lt.sum(0)
    ) / (n * (n - 3))
    assert hsic_unbiased(k, l) == pytest.approx(ref)


def test_streaming_and_one_shot_minibatch_cka_agree(rng):
    a = rng.normal(size=(96, 10))
    b = a @ rng.normal(size=(10, 6)) + 0.5 * rng.normal(size=(96, 6))
    stream = MinibatchCKA(2)
    for part in np.split(np.arange(96), 3):
        stream.update([a[part], b[part]])
    hsic = [
        [
            np.mean([hsic_unbiased(gram(p[i]), gram(q[i])) for i in np.split(np.arange(96), 3)])
            for q in (a, b)
        ]
        for p in (a, b)
    ]
    one_shot = hsic[0][1] / np.sqrt(hsic[0][0] * hsic[1][1])
    assert stream.matrix()[0, 1] == pytest.approx(one_shot)
    assert cka_matrix([a, b], batch_size=32)[0, 1] == pytest.approx(one_shot)


def test_response_std_pooled_and_per_channel_match_numpy(rng):
    x = rng.normal(loc=[1, -2, 0.5], scale=[1, 3, 0.2], size=(500, 3))
    pooled, per_channel = probe.response_std(x.mean(0), x.var(0))
    assert pooled == pytest.approx(x.std())
    assert per_channel == pytest.approx(x.std(0).mean())


def test_spp_statistics(rng):
    m = probe.Moments.empty(2)
    x = rng.normal(loc=[2.0, -1.0], size=(1000, 2))
    m.update_from_data(x)
    asm, av = analyses.spp(m)
    assert asm == pytest.approx(np.mean(x.mean(0) ** 2)) and av == pytest.approx(np.mean(x.var(0)))


def test_gsc_of_identity_map_is_one():
    assert analyses.gsc(np.array([16.0]), 16, np.array([2.0]), np.array([2.0]))[0] == pytest.approx(
        1.0
    )


def test_bootstrap_interval_covers_the_mean(rng):
    est, lo, hi = analyses.mean_ci(rng.normal(1.0, 1.0, size=400))
    assert lo < 1.0 < hi and lo < est < hi


def test_seed_interval_is_student_t():
    m, lo, hi = analyses.seed_ci(np.array([1.0, 3.0]))
    assert m == 2 and hi - m == pytest.approx(12.706 * 1.0, rel=1e-3)


class _TwoSiteBlock(torch.nn.Module):
    """A transformer-like block: two residual adds, so the block's own map x -> y is a whole
    block (kind 'block'), and its sites, inside it, have no map of their own."""

    def __init__(self, d=6):
        super().__init__()
        self.a = torch.nn.Linear(d, d)
        self.b = torch.nn.Linear(d, d)

    def forward(self, x):
        h = x + torch.tanh(self.a(x))
        return h + torch.tanh(self.b(h))


def test_a_whole_block_of_two_sites_has_its_jacobian_deviation_from_identity():
    torch.manual_seed(0)
    block = _TwoSiteBlock()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), block, torch.nn.Linear(6, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    cap = probe.capture(model, [x], layers=["1"], probes=[probe.JacobianNorms(n_probes=2048)])
    assert cap.layer_attrs("1")["kind"] == "block" and not cap.layer_attrs("1")["is_block"]
    got = analyses.identity_closeness(cap).query("quantity == 'jac_rel_dev'")
    assert list(got["layer"]) == ["1"]  # the whole block: before, left out as no residual unit
    # independent: ||J - I||_F^2 and ||I||_F^2 = d per sample from torch.func.jacrev, float64
    with torch.no_grad():
        h = model[0](x)
    dev2 = [
        float(
            ((torch.func.jacrev(block)(h[i]) - torch.eye(6, dtype=torch.float64)) ** 2)
            .sum()
            .detach()
        )
        for i in range(len(h))
    ]
    want = np.sqrt(np.mean(dev2) / 6.0)
    # Hutchinson with m Rademacher probes: relative s.e. of a squared norm <= sqrt(2/m) = 3.1 %
    # per sample at m = 2048, 1.1 % over 8 samples, ~0.6 % for the root: 3 % is ~5 s.e.
    assert abs(got["value"].iloc[0] - want) < 0.03 * want
