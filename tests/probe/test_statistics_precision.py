"""The fast statistics are as exact as the slow ones: numpy float64 is the reference, on inputs
where the shortcut formulas (E[x^2] - E[x]^2, ||a||^2 + ||b||^2 - 2ab) lose every digit."""

import numpy as np
import torch

from probe.probes.statistics import channel_moments, per_sample_cos, per_sample_dot, per_sample_norm


def test_channel_variance_of_a_large_mean_input_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(4, 3, 16, 16, generator=g)  # mean^2 / var = 1e12
    mean, var = channel_moments(x)
    ref = x.double().numpy().reshape(4, 3, -1)
    np.testing.assert_allclose(mean.numpy(), ref.mean(2), rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), ref.var(2), rtol=1e-5)
    naive = (x * x).mean((2, 3)) - x.mean((2, 3)) ** 2
    assert not np.allclose(naive.numpy(), ref.var(2), rtol=0.5)  # the cancellation it avoids


def test_dot_norm_and_cosine_match_numpy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 8, 4, 4, generator=g), torch.randn(5, 8, 4, 4, generator=g)
    A, B = a.double().numpy().reshape(5, -1), b.double().numpy().reshape(5, -1)
    np.testing.assert_allclose(per_sample_dot(a, b).numpy(), (A * B).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_sample_norm(a).numpy(), np.linalg.norm(A, axis=1), rtol=1e-6)
    cos = (A * B).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(B, axis=1)
    np.testing.assert_allclose(per_sample_cos(a, b).numpy(), cos, rtol=1e-5, atol=1e-6)
    norms = (per_sample_norm(a), per_sample_norm(b))
    assert torch.equal(per_sample_cos(a, b, norms=norms), per_sample_cos(a, b))
