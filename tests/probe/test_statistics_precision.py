"""The fast statistics are as exact as the slow ones: numpy float64 is the reference, on inputs
where the shortcut formulas (E[x^2] - E[x]^2, ||a||^2 + ||b||^2 - 2ab) lose every digit."""

import numpy as np
import pytest
import torch

from probe.probes.statistics import channel_moments, per_sample_cos, per_sample_dot, per_sample_norm


@pytest.mark.parametrize("shape", [(4, 197, 384), (2, 64, 56, 56), (3, 16, 32, 32), (2, 512, 7, 7)])
def test_a_row_whose_mass_sits_in_a_few_values_keeps_its_small_ones(shape):
    """A ViT's gradient holds ~99.99 % of each row's squares in the class token: torch's CPU norm,
    one running sum per vector lane, rounds the rest away, by up to ~(values per lane) x eps
    relative: 1.3e-5 on [8, 197, 384], 2.7e-5 on [2, 64, 56, 56]. per_sample_norm takes a long
    contiguous row piece by piece (a two-level cascade): within 1e-6 of numpy there; shorter
    rows (<= 2^15 values, or pieces of < 128) and strided ones within 1e-5."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(shape, generator=g) * 1e-3
    t.view(shape[0], -1)[:, : t[0].numel() // shape[1]] *= 300  # one token's or channel's mass
    ref = np.linalg.norm(t.double().numpy().reshape(shape[0], -1), axis=1)
    cascaded = t[0].numel() >= 2**15 and t[0, 0].numel() >= 128
    np.testing.assert_allclose(per_sample_norm(t).numpy(), ref, rtol=1e-6 if cascaded else 1e-5)
    strided = t.transpose(1, -1).contiguous().transpose(1, -1)
    np.testing.assert_allclose(per_sample_norm(strided).numpy(), ref, rtol=1e-5)


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


def test_a_remembered_norm_is_reused_only_for_the_same_unchanged_tensor():
    from probe.probes.statistics import NormMemo, per_sample_norm

    memo, t = NormMemo(), torch.randn(3, 5)
    first = memo.norm(t)
    assert memo.norm(t) is first  # the same object, unchanged: reused
    same_values = t.clone()
    assert memo.norm(same_values) is not first  # another tensor: computed again
    t.mul_(2)  # changed in place: the version counter moved, so the norm is computed again
    torch.testing.assert_close(memo.norm(t), per_sample_norm(t), rtol=0, atol=0)
    torch.testing.assert_close(memo.norm(t), 2 * first)


@pytest.mark.parametrize("kernels", ["one-pass", "torch"])
def test_block_and_gradient_norms_equal_norms_computed_afresh(kernels, monkeypatch):
    """The memo reuses a block's output norm as the next block's input norm and one gradient's
    norm at both hooks that see it: every value equals a norm of the tensor itself, taken afresh
    in float64 (a stale norm of another tensor would be off by far more than float32's
    rounding), and a reused one equals its source to the bit."""
    import probe
    from probe.conformance import RawSites
    from probe.probes import onepass

    monkeypatch.setenv(onepass.ENV, "1" if kernels == "one-pass" else "0")
    torch.manual_seed(0)
    net = probe.zoo.create("resnet20").eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    probes = [probe.ResidualNorms(), probe.GradNorms(), RawSites(), probe.Gradients(dtype="fp32")]

    def fresh(t):  # float64 norms rounded to float32
        return t.double().flatten(1).norm(dim=1).float()

    rtol = 1e-5  # float32 norms of 16384 values; another tensor's would be off by >= 1e-2

    with probe.HookSession(net, probes=probes) as s:
        for _ in range(2):
            res, _ = s.run_batch(x, y)
            for r in res.values():
                for q, raw in (("x_norm", "X"), ("s_norm", "S"), ("y_norm", "Y"), ("f_norm", "F")):
                    torch.testing.assert_close(r[q], fresh(r[raw]), rtol=rtol, atol=0)
                torch.testing.assert_close(
                    r["grad_y_norm"], fresh(r["grad_output"]), rtol=rtol, atol=0
                )
            keys = list(res)
            for before, after in zip(keys, keys[1:]):  # dL/dx of a block is dL/dy of the one before
                torch.testing.assert_close(
                    res[after]["grad_x_norm"], res[before]["grad_y_norm"], rtol=0, atol=0
                )
                if res[after]["X"].shape == res[after]["S"].shape:  # x is the block before's y
                    torch.testing.assert_close(
                        res[after]["x_norm"], res[before]["y_norm"], rtol=0, atol=0
                    )


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_variance_matches_numpy_for_rows_of_every_condition(dtype, layout):
    """Rows of every mean^2/var from 0 to 1e12 side by side, constant rows and all-zero rows:
    each matches numpy in float64, in either memory layout (a channels-last map's sums of
    squares are taken by a product and a sum, the norm kernel being slow on strided rows)."""
    g = torch.Generator().manual_seed(2)
    ratios = [0.0, 1.0, 1e3, 1e4, 1e6, 1e9, 1e12]
    noise = torch.randn(3, len(ratios), 9, 9, generator=g, dtype=torch.float64)
    noise = (noise - noise.mean((2, 3), keepdim=True)) / noise.std((2, 3), keepdim=True)
    x = (noise + torch.tensor(ratios, dtype=torch.float64).sqrt()[:, None, None]).to(dtype)
    x = torch.cat([x, torch.full_like(x[:1], 0.1), torch.zeros_like(x[:1])])
    x = x.contiguous(memory_format=layout)
    mean, var = channel_moments(x)
    ref = x.double().numpy().reshape(*x.shape[:2], -1)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(mean.numpy(), ref.mean(2), rtol=rtol, atol=rtol)  # spread 1
    np.testing.assert_allclose(var.numpy(), ref.var(2), rtol=rtol, atol=1e-30)


def test_the_deviation_of_a_bf16_block_is_taken_in_float32():
    """||y - S|| of bf16 tensors equals float64's on the same values: the difference is not
    rounded to bf16 first (which cost 2-4e-4 relative on a bf16 ResNet-8)."""
    import probe
    from probe.conformance import RawSites

    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval().to(torch.bfloat16)
    x = torch.randn(6, 1, 8, 8).bfloat16()
    cap = probe.capture(model, [x], probes=[probe.ResidualNorms(), RawSites()])
    for layer in cap.layers:
        y, s = (cap.read(layer, k).astype(np.float64).reshape(6, -1) for k in "YS")
        ref = np.linalg.norm(y - s, axis=1)
        np.testing.assert_allclose(cap.read(layer, "dev_norm"), ref, rtol=1e-6, err_msg=layer)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_statistic_of_a_half_precision_block_is_float64s_on_its_values(
    dtype, channels_last, statistics_reference
):
    """Half-precision maps are read as they are (promoted element by element, not copied into
    float32): every block quantity and channel moment equals numpy's float64 on the same values,
    to float32 accumulation over the per-sample (or per-channel) elements."""
    import probe
    from probe.conformance import RawSites

    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval().to(dtype)
    x = torch.randn(6, 1, 8, 8).to(dtype)
    if channels_last:
        model, x = (t.to(memory_format=torch.channels_last) for t in (model, x))
    probes = [probe.ResidualNorms(), probe.ChannelStats(), RawSites()]
    with probe.HookSession(model, "auto", probes) as session:
        results, _ = session.run_batch(x)
    for layer, qs in results.items():
        for q, want in statistics_reference(qs).items():
            got = qs[q]
            assert got.dtype == torch.float32, (layer, q)
            # float32 sums of <= 256 exact products: relative error <= 256 * 2^-24 ~ 1.5e-5
            np.testing.assert_allclose(
                got.double().numpy(), want, rtol=2e-5, atol=1e-6, err_msg=f"{layer}/{q}"
            )


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 6), (5, 8, 4, 4), (5, 2, 3, 4, 4)])
def test_per_sample_reductions_match_numpy_for_every_rank_and_memory_layout(shape):
    """Reductions over every axis but the first, on contiguous, channels-last and transposed
    tensors alike (no flattened copy is taken), and a clear error for [N] tensors, where
    reducing over "every other axis" would silently reduce over the batch."""
    import probe

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    A, B = a.double().numpy().reshape(5, -1), b.double().numpy().reshape(5, -1)
    layouts = [lambda t: t, lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)]
    if len(shape) == 4:
        layouts.append(lambda t: t.contiguous(memory_format=torch.channels_last))
    for layout in layouts:
        x, y = layout(a), layout(b)
        assert torch.equal(x, a)
        np.testing.assert_allclose(per_sample_norm(x).numpy(), np.linalg.norm(A, axis=1), rtol=1e-6)
        np.testing.assert_allclose(
            per_sample_dot(x, y).numpy(), (A * B).sum(1), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(probe.ProbeError, match=r"got shape \(5,\)"):
        per_sample_norm(torch.ones(5))


def test_a_bf16_block_is_cast_to_float32_once():
    """Only S is cast to float32 per block (it takes part in all three quantities); y and F are
    promoted element by element inside the difference and the products. A cast of a bf16 map is
    a kernel launch and a whole float32 copy: on a GPU, launches bound an eager probed pass and
    copies a recorded one."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    import probe

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[func] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval().to(torch.bfloat16)
    x, labels = torch.randn(6, 1, 8, 8).bfloat16(), torch.zeros(6, dtype=torch.long)
    with probe.HookSession(model, "auto", [probe.ResidualNorms()]) as session:
        session.run_batch(x, labels)  # the first batch resolves the layers
        with Casts() as seen:
            session.run_batch(x, labels)
    assert seen.n[torch.ops.aten._to_copy.default] == len(model.blocks())


def _rows_redone(monkeypatch, name, rows):
    """Spy on ``probe.probes.statistics.<name>``, the formula a guard hands its failed rows:
    the list it returns gets ``rows(*args)`` of each call."""
    from probe.probes import statistics

    real, seen = getattr(statistics, name), []

    def spy(*args):
        seen.append(rows(*args))
        return real(*args)

    monkeypatch.setattr(statistics, name, spy)
    return seen


def _rows_of_ratio(ratios, positions, rows=64, seed=3):
    """[rows, len(ratios), positions] float32 rows with E[x^2]/var = ratio exactly in float64
    (each row standardised, then shifted by sqrt(ratio - 1))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, len(ratios), positions, generator=g, dtype=torch.float64)
    z = (z - z.mean(2, keepdim=True)) / z.std(2, keepdim=True, unbiased=False)
    shift = (torch.tensor(ratios, dtype=torch.float64) - 1).sqrt()[:, None]
    return (z + shift).float()


@pytest.mark.parametrize("strided", [False, True], ids=["rows", "channels-last"])
@pytest.mark.parametrize("positions", [64, 1024, 12544])
def test_one_pass_rows_stay_within_their_bound_and_the_others_are_redone(
    positions, strided, monkeypatch
):
    """sum_moments keeps E[x^2] - E[x]^2 only for rows with E[x^2] <= ONE_PASS_MAX_RATIO * var,
    where its relative error is at most ~that ratio times float32 accumulation's (here 16 u per
    sum, the most measured on rows of up to 12544 positions), and hands every other row, and only
    those, to the two-pass formula."""
    from probe.probes import statistics

    ratios = [1.5, 4.0, 12.0, 20.0, 1e4]
    x = _rows_of_ratio(ratios, positions, rows=64 if positions <= 1024 else 8)
    if strided:  # the positions strided, the channels contiguous: a channels-last map's rows
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    redone = _rows_redone(monkeypatch, "moments", lambda t, dtype: t.shape[1])
    mean, var = statistics.sum_moments(x, torch.float32)
    ref = x.double().var(2, unbiased=False)
    assert redone == [2 * x.shape[0]]  # the rows of ratios 20 and 1e4, in one call
    rel = ((var.double() - ref).abs() / ref).numpy()
    bound = statistics.ONE_PASS_MAX_RATIO * 16 * 2**-24
    assert rel.max() <= bound, rel.max(axis=0)
    assert rel[:, 3:].max() <= 1e-6  # the two-pass rows: no cancellation at any ratio
    np.testing.assert_allclose(mean.numpy(), x.double().mean(2).numpy(), rtol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_rows_whose_sums_overflow_or_hold_nan_or_inf_get_numpys_variance(layout):
    """A finite row whose sum of squares overflows float32 (|x| ~ 1e20) is redone by the
    two-pass formula instead of reading inf - inf; NaN and inf rows stay non-finite, as numpy's."""
    big = 1e20
    x = torch.tensor(
        [
            [big, big, big, big],
            [big, big, big, big * (1 + 2**-20)],
            [float("nan"), 1, 1, 1],
            [float("inf"), 1, 1, 1],
            [0.0, 0.0, 0.0, 0.0],
        ]
    ).view(5, 1, 2, 2)
    x = torch.cat([x, x.flip(0)], 1).contiguous(memory_format=layout)  # two channels
    mean, var = channel_moments(x)
    with np.errstate(invalid="ignore"):
        want = x.double().numpy().reshape(5, 2, 4).var(2)
    np.testing.assert_allclose(var.double().numpy(), want, rtol=1e-5)
    assert torch.isnan(var[2:4, 0]).all() and var[4, 0] == 0


def test_an_accelerators_maps_take_the_two_pass_formula(monkeypatch):
    """Off the CPU the one-pass guard's check would wait for the device on every call: such maps
    go to the two-pass formula (a meta tensor stands for one here)."""
    from probe.probes import onepass, statistics

    seen = []
    monkeypatch.setattr(statistics, "sum_moments", lambda t, dtype: seen.append("one-pass"))
    monkeypatch.setattr(onepass, "moments", lambda t, axis: seen.append("kernel"))
    mean, var = statistics.channel_moments(torch.empty(4, 3, 8, 8, device="meta"))
    assert seen == [] and var.shape == (4, 3) and var.device.type == "meta"
    statistics.channel_moments(torch.empty(4, 3, 8, 8))
    # on the CPU the one-pass kernel first; where it does not serve (here: it returns None), sums
    assert seen == ["kernel", "one-pass"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_and_boolean_maps_get_numpys_moments(dtype):
    """A layer may give indices or masks: their moments are taken as float32, as numpy's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 2 if dtype == torch.bool else 7, (3, 4, 5, 5), generator=g).to(dtype)
    mean, var = channel_moments(x)
    ref = x.double().numpy().reshape(3, 4, -1)
    np.testing.assert_allclose(mean.numpy(), ref.mean(2), rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), ref.var(2), rtol=1e-5, atol=1e-7)


def test_a_complex_map_is_refused_rather_than_given_a_complex_variance():
    import probe

    with pytest.raises(probe.ProbeError, match=r"need a real tensor; got torch.complex64"):
        channel_moments(torch.randn(2, 3, 4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_norms_and_cosines_of_integer_boolean_and_complex_tensors_match_numpy(dtype):
    """Integer and boolean tensors are normed as float32; complex ones as real vectors of their
    real and imaginary parts, so that cos(a, a) = 1 (a plain product would give a complex
    "cosine")."""
    g = torch.Generator().manual_seed(5)
    if dtype == torch.complex64:
        a, b = (torch.randn(4, 3, 5, dtype=dtype, generator=g) for _ in range(2))
        A, B = (np.stack([t.real.numpy(), t.imag.numpy()], -1).reshape(4, -1) for t in (a, b))
    else:
        a, b = (
            torch.randint(0, 2 if dtype == torch.bool else 9, (4, 3, 5), generator=g) for _ in "ab"
        )
        a, b = a.to(dtype), b.to(dtype)
        A, B = (t.double().numpy().reshape(4, -1) for t in (a, b))
    A, B = A.astype(np.float64), B.astype(np.float64)
    na, nb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=1)
    np.testing.assert_allclose(per_sample_norm(a).numpy(), na, rtol=1e-6)
    np.testing.assert_allclose(per_sample_dot(a, b).numpy(), (A * B).sum(1), rtol=1e-5, atol=1e-5)
    cos = per_sample_cos(a, b)
    assert not cos.is_complex()
    np.testing.assert_allclose(
        cos.numpy(), (A * B).sum(1) / np.maximum(na * nb, 1e-12), rtol=1e-5, atol=1e-6
    )
    if dtype == torch.complex64:
        np.testing.assert_allclose(per_sample_cos(a, a).numpy(), 1.0, rtol=1e-6)


def _pairs_of_cos(cosines, positions, rows, seed=5):
    """float32 a, b of shape [rows * len(cosines), 1, positions] whose rows have the given
    cosines (in float64, before rounding) and equal norms: b = c a + sqrt(1 - c^2) u, u a unit
    vector orthogonal to a."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, len(cosines), positions)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    a = a / a.norm(dim=2, keepdim=True)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    u = u - (u * a).sum(2, keepdim=True) * a
    u = u / u.norm(dim=2, keepdim=True)
    c = torch.tensor(cosines, dtype=torch.float64)[:, None]
    b = c * a + (1 - c**2).sqrt() * u
    return (t.reshape(-1, 1, positions).float() for t in (a, b))


def _polarized(a, b):
    from probe.probes.statistics import polarized_dot

    return polarized_dot(a, b, tuple(per_sample_norm(t) for t in (a, b, a - b)))


@pytest.mark.parametrize("positions", [64, 1024, 12544])
def test_a_polarized_dot_stays_within_its_bound_and_cancelling_rows_are_redone(
    positions, monkeypatch
):
    """y.S from ||y||, ||S|| and ||y - S|| is kept only where (||y||^2 + ||S||^2 + ||y - S||^2)
    <= ONE_PASS_MAX_RATIO |2 y.S| -- cosines >= 2/17 or <= -2/15 for equal norms -- where its
    relative error is at most that ratio times float32 accumulation's (16 u, as for the channel
    moments); every other row, and only those, is taken by the product, in one call."""
    from probe.probes import statistics

    cosines = [1.0, 0.9, 0.5, 0.2, -0.5, 0.05, 0.0, -0.05]
    rows = 32 if positions <= 1024 else 4
    a, b = _pairs_of_cos(cosines, positions, rows)
    scale = torch.linspace(0.25, 4.0, a.shape[0])[:, None, None]  # unequal norms too
    redone = _rows_redone(monkeypatch, "per_sample_dot", lambda x, y: x.shape[0])
    got = _polarized(a, b).view(rows, len(cosines))
    assert redone == [3 * rows]  # the cosines 0.05, 0 and -0.05
    ref = (a.double() * b.double()).sum((1, 2)).view(rows, len(cosines))
    rel = ((got.double() - ref).abs() / ref.abs()).numpy()
    bound = statistics.ONE_PASS_MAX_RATIO * 16 * 2**-24
    assert rel[:, :5].max() <= bound, rel.max(axis=0)
    kept = _polarized(a * scale, b).double().view(rows, len(cosines))
    ref = (a.double() * scale * b.double()).sum((1, 2)).view(rows, len(cosines))
    rows_kept = ref.abs() > 0.2 * (a.double() * scale).norm(dim=(1, 2)).view(rows, -1)
    rel = ((kept - ref).abs() / ref.abs())[rows_kept]
    assert rel.max() <= bound, rel.max()


def test_a_polarized_dot_of_nan_inf_zero_or_overflowing_rows_is_the_products():
    """Rows whose norms are NaN, inf or overflow float32 (inf - inf), and zero rows, are taken by
    the product, bit for bit: the identity is only used where it is exact to its bound."""
    big = 3e19
    a = torch.tensor(
        [[big, big, big, big], [float("nan"), 1, 1, 1], [float("inf"), 1, 1, 1], [0.0] * 4]
    )
    b = torch.tensor([[big, big, big, -big], [1.0] * 4, [1.0] * 4, [1.0, 2, 3, 4]])
    got = _polarized(a, b)
    want = per_sample_dot(a, b)
    assert torch.equal(got.isnan(), want.isnan())
    np.testing.assert_array_equal(got[~got.isnan()].numpy(), want[~want.isnan()].numpy())
    assert got[3] == 0


class _Turn(torch.nn.Module):
    """y = F + x, with F a per-sample tensor set by the test (to choose the angle of y to S)."""

    def __init__(self, f):
        super().__init__()
        self.branch = torch.nn.Identity()
        self.f = f

    def forward(self, x):
        return self.branch(self.f) + x


def test_cos_ys_of_blocks_at_every_angle_to_their_shortcut_match_numpy():
    """ResidualNorms' cos(y, S) on the CPU (the polarization identity, guarded) against numpy's
    float64 for a block whose output ranges from S itself to orthogonal and opposite to it:
    within float32 accumulation of the product's at every angle."""
    import probe
    from probe.conformance import RawSites

    probe.register_residual(_Turn, probe.ResidualSpec(branch="branch"))
    s, y = _pairs_of_cos([1.0, 0.9, 0.3, 0.1, 0.0, -0.1, -0.7], 256, rows=2)
    model = torch.nn.Sequential(_Turn(y - s)).eval()
    cap = probe.capture(model, [s], probes=[probe.ResidualNorms(), RawSites()], layers=["0"])
    Y, S = (cap.read("0", k).astype(np.float64).reshape(len(s), -1) for k in "YS")
    want = (Y * S).sum(1) / (np.linalg.norm(Y, axis=1) * np.linalg.norm(S, axis=1))
    np.testing.assert_allclose(cap.read("0", "cos_ys"), want, rtol=1e-5, atol=1e-7)


def test_a_shortcut_broadcast_over_the_batch_keeps_the_product():
    """A shortcut of one row for the whole batch (a learned constant, say) broadcasts in y - S
    and y * S; its cosines stay the product's, also for rows nearly orthogonal to it, where the
    guard would hand rows of S it does not have to the product."""
    from probe.probes import statistics

    s = torch.tensor([[[1.0, 0.0, 0.0]]])
    y = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 1.0, 0.0]], [[1e-4, 0.0, 3.0]]])
    x = f = y - s
    norms = tuple(per_sample_norm(t) for t in (x, f, s, y))
    got = statistics._block_quantities(x, f, s, y, norms)["cos_ys"]
    Y, S = y.double().reshape(3, -1).numpy(), s.double().reshape(1, -1).numpy()
    want = (Y * S).sum(1) / (np.linalg.norm(Y, axis=1) * np.linalg.norm(S))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)


class _Roll(torch.nn.Module):
    def forward(self, x):
        return x.roll(1, dims=1)


class _Mask(torch.nn.Module):
    """A block of masks: y = F + x on bool tensors (torch adds bools as a logical or)."""

    def __init__(self):
        super().__init__()
        self.branch = _Roll()

    def forward(self, x):
        return self.branch(x) + x


def test_a_block_of_masks_gets_numpys_quantities_on_its_zeros_and_ones():
    """Bool maps are read as 0 / 1, as the norms of integer and boolean tensors are: y - S would
    otherwise raise torch's own error (no difference of bools) from inside the capture."""
    import probe
    from probe.conformance import RawSites

    probe.register_residual(_Mask, probe.ResidualSpec(branch="branch"))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)) > 0
    model = torch.nn.Sequential(_Mask()).eval()
    cap = probe.capture(model, [x], probes=[probe.ResidualNorms(), RawSites()], layers=["0"])
    F, S = x.roll(1, dims=1).double().numpy(), x.double().numpy()
    Y = np.maximum(F, S)
    norm = lambda a: np.linalg.norm(a, axis=1)  # noqa: E731
    want = {
        "y_norm": norm(Y),
        "f_norm": norm(F),
        "dev_norm": norm(Y - S),
        "cos_ys": (Y * S).sum(1) / np.maximum(norm(Y) * norm(S), 1e-12),
        "cos_fs": (F * S).sum(1) / np.maximum(norm(F) * norm(S), 1e-12),
    }
    for q, w in want.items():
        np.testing.assert_allclose(cap.read("0", q), w, rtol=1e-6, atol=1e-7, err_msg=q)
