"""Numerics are data: NaN/inf results are counted per layer, warned about, and never drawn as
empty figures; fp16 activations never turn large values into inf, nor a genuine inf into a
number."""

import math
import warnings

import numpy as np
import pytest
import torch

import analyses
import probe


def _overflowing_model():
    m = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    with torch.no_grad():
        m.stages[1][0].branch.conv1.weight.mul_(1e38)  # float32 overflow from stage 1 on
    return m


def _batch():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))]


def test_nonfinite_results_are_counted_per_layer_and_warned(tmp_path):
    with pytest.warns(probe.NonFiniteWarning, match="NaN or infinite probe results in"):
        cap = probe.capture(
            _overflowing_model(), _batch(), probes=["residual"], out=tmp_path / "c.h5"
        )
    counts = {l: cap.layer_attrs(l).get("nonfinite_samples", 0) for l in cap.layers}
    # forward only: the blocks before the overflow stay finite
    assert counts["stages.0.0"] == 0 and counts["stages.1.0"] == 4 and counts["stages.2.0"] == 4
    assert cap.attrs["nonfinite_layers"] == 2


def test_a_finite_capture_records_no_counts():
    cap = probe.capture(
        probe.zoo.create("resnet8", in_channels=1, width=4), _batch(), probes=["residual"]
    )
    assert cap.attrs["nonfinite_layers"] == 0
    assert all("nonfinite_samples" not in cap.layer_attrs(l) for l in cap.layers)


def test_figures_of_all_nonfinite_measures_are_skipped_with_a_reason(tmp_path):
    with pytest.warns(probe.NonFiniteWarning):
        cap = probe.capture(_overflowing_model(), _batch(), probes=["residual", "grad"])
    res = analyses.analyze([cap], tmp_path / "fig", lesions=False)
    assert "NaN or infinite" in res.skipped["gradient_norms"]
    assert not (tmp_path / "fig" / "gradient_norms.png").exists()


def test_fp16_activations_clip_and_count_instead_of_storing_inf():
    m = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    x = torch.randn(3, 1, 8, 8) * 1e6  # block outputs far beyond fp16's 65504
    cap = probe.capture(m, [x], probes=[probe.Activations(dtype="fp16")], layers=["stages.0.0"])
    out = cap.read("stages.0.0", "output")
    with torch.no_grad():
        ref = m.stages[0][0](m.stem(x)).numpy()
    assert np.isfinite(out).all()
    assert np.array_equal(
        cap.read("stages.0.0", "output_clipped"), (np.abs(ref) > 65504).reshape(3, -1).sum(1)
    )
    assert cap.read("stages.0.0", "output_clipped").min() > 0


def test_the_cli_shows_a_warning_as_one_line(capsys):
    from probe.cli.main import _show_warning

    _show_warning(probe.NonFiniteWarning("NaN in 2 layers"), probe.NonFiniteWarning, "x.py", 1)
    err = capsys.readouterr().err
    assert err == "warning: NaN in 2 layers\n"


@pytest.mark.parametrize("pick_rows", [True, False], ids=["cpu-way", "accelerator-way"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rows_with_nan_or_inf_are_found_as_an_element_by_element_check_finds_them(dtype, pick_rows):
    from probe.nonfinite import nonfinite_rows

    big = torch.finfo(dtype).max
    t = torch.full((6, 3, 4), big, dtype=dtype)  # finite rows whose sum overflows the dtype
    t[1, 0, 0] = float("nan")
    t[2, 2, 3] = float("inf")
    t[3, 1, 1], t[3, 1, 2] = float("inf"), float("-inf")
    t[4] = -big
    t[5, 0, 0] = float("-inf")
    want = ~torch.isfinite(t.reshape(6, -1)).all(1)
    got = nonfinite_rows(t, pick_rows=pick_rows)
    assert got.tolist() == want.tolist() == [False, True, True, True, False, True]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pick_rows", [True, False], ids=["cpu-way", "accelerator-way"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_planted_values_in_large_rows_are_found_wherever_they_are(dtype, pick_rows, layout):
    """Rows of a block output's size, some holding NaN, +-inf or values whose sum overflows the
    accumulator, at random places: the same rows an element-by-element check finds, in either
    memory layout (a channels-last map is reduced as it lies, not reshaped into a copy)."""
    from probe.nonfinite import NonFiniteCounter, nonfinite_rows

    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 16, 32, 32, generator=g).to(dtype)
    flat = t.view(32, -1)
    big = torch.finfo(dtype).max
    for row in range(32):
        col = int(torch.randint(flat.shape[1], (1,), generator=g))
        kind = row % 5
        if kind == 1:
            flat[row, col] = float("nan")
        elif kind == 2:
            flat[row, col] = float("inf") if row % 2 else float("-inf")
        elif kind == 3:
            flat[row, : flat.shape[1] // 2] = big / 4  # finite, but the sum overflows
        elif kind == 4:
            flat[row, col], flat[row, -1] = float("inf"), float("-inf")
    want = ~torch.isfinite(flat).all(1)
    assert want.sum() == 19  # kinds 1, 2 and 4; kind 3 is finite
    t = t.contiguous(memory_format=layout)
    assert nonfinite_rows(t, pick_rows=pick_rows).tolist() == want.tolist()
    counter = NonFiniteCounter(pick_rows=pick_rows)
    counter.add("block", t)
    counter.end_batch()
    assert counter.counts == {"block": 19}


def test_a_layers_count_is_the_samples_with_a_nan_or_inf_in_any_of_its_results():
    """Small results are checked together, large, capped and float64 ones alone; the count per
    layer is the number of samples with any non-finite value, as an element-by-element check
    counts them."""
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class Planted(probe.Probe):
        name: ClassVar[str] = "planted"
        forward_grad: ClassVar[bool] = False

        def forward(self, call):
            n = call.batch_size
            small = torch.zeros(n)
            small[1] = float("nan")
            half = torch.zeros(n, 3, dtype=torch.float16)
            half[2, 1] = float("inf")
            capped = torch.zeros(2, dtype=torch.float64)
            capped[0] = float("-inf")
            large = torch.zeros(n, 5000)  # not copied into the batch's block: checked alone
            large[3, 4999] = float("nan")
            large[1, 0] = float("inf")  # sample 1 again: counted once
            huge = torch.full((n, 4), 3e38)  # finite, though its sum overflows float32
            return {"small": small, "half": half, "capped": capped, "large": large, "huge": huge}

    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    with pytest.warns(probe.NonFiniteWarning):
        cap = probe.capture(
            model, [torch.randn(6, 1, 8, 8)], layers=["stages.0.0"], probes=[Planted()]
        )
    assert cap.layer_attrs("stages.0.0")["nonfinite_samples"] == 4  # samples 0, 1, 2 and 3


@pytest.mark.parametrize("pick_rows", [True, False], ids=["cpu-way", "accelerator-way"])
def test_the_counter_agrees_with_an_element_by_element_count_over_many_batches(pick_rows):
    """Random batches of results per layer (several dtypes and ranks, capped rows, a tensor kept
    under two keys, finite rows whose sums overflow, layers that come and go, results added one
    by one or copied into a block per dtype as a session does): every layer's count is the
    samples that numpy finds a NaN or an inf in, summed over the batches."""
    from probe.nonfinite import NonFiniteCounter

    g = np.random.default_rng(0)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

    def planted(rows: int) -> torch.Tensor:
        shape = (rows, *[int(s) for s in g.integers(1, 5, size=int(g.integers(0, 3)))])
        dtype = dtypes[int(g.integers(len(dtypes)))]
        t = torch.randn(shape, dtype=torch.float64).to(dtype)
        for r in range(rows):
            flat = t.view(rows, -1)
            kind = int(g.integers(6))
            if kind in (1, 2):
                flat[r, int(g.integers(flat.shape[1]))] = float("nan" if kind == 1 else "-inf")
            elif kind == 3:  # finite, but a sum in the dtype would overflow
                flat[r] = torch.finfo(dtype).max
        return t

    counter, bad, blocks = NonFiniteCounter(pick_rows=pick_rows), {}, {}
    for batch in range(6):
        n = int(g.integers(1, 9))
        for key in ["a", "b", "c"] + (["d"] if batch % 2 else []):
            for _ in range(int(g.integers(1, 4))):
                rows = int(g.integers(0, n + 1)) if g.random() < 0.3 else n  # a capped result
                t = planted(rows)
                names = [key, "c"] if key == "b" else [key]  # one tensor kept under two keys
                for name in names:
                    if g.random() < 0.5:
                        counter.add(name, t)
                    else:  # checked in its dtype's block below
                        blocks.setdefault(t.dtype, []).append((name, t))
                    hit = bad.setdefault((name, batch), np.zeros(n, bool))
                    if rows:
                        hit[:rows] |= ~np.isfinite(t.reshape(rows, -1).double().numpy()).all(1)
        for pieces in blocks.values():
            block = torch.cat([t.reshape(-1) for _, t in pieces])
            views = block.split([t.numel() for _, t in pieces])
            counter.add_block(block, [(k, v.view(t.shape)) for (k, t), v in zip(pieces, views)])
        blocks.clear()
        counter.end_batch()
    expected = {}
    for (key, _), hit in bad.items():  # a sample counts once per batch, whatever holds it
        expected[key] = expected.get(key, 0) + int(hit.sum())
    assert counter.counts == {k: v for k, v in expected.items() if v}
    assert sum(expected.values()) > 10  # planted values were found, not vacuously none


def test_a_discarded_batch_is_not_counted():
    from probe.nonfinite import NonFiniteCounter

    counter = NonFiniteCounter()
    counter.add("a", torch.tensor([float("nan"), 0.0]))
    counter.discard_batch()
    counter.add("a", torch.tensor([0.0, float("inf")]))
    counter.end_batch()
    assert counter.counts == {"a": 1}


class _Scales(torch.nn.Module):
    """y = x * w with w = [1, inf, -inf, nan, 1e6, -1e6, 65504, 7e4] on sample 0 only: genuine
    non-finite values, finite overflows of fp16, and fp16's largest value itself."""

    def forward(self, x):
        w = torch.tensor([1.0, math.inf, -math.inf, math.nan, 1e6, -1e6, 65504.0, 7e4])
        scale = torch.ones(len(x), 8)
        scale[0] = w
        return x * scale


@pytest.mark.parametrize("to_disk", [True, False], ids=["hdf5", "memory"])
def test_fp16_storage_keeps_genuine_inf_and_nan_and_counts_them_as_nonfinite(tmp_path, to_disk):
    """Only finite values beyond 65504 are clipped (and counted as clipped); an inf or NaN the
    model produced is stored as itself, so the sample is counted as non-finite and warned about.
    Clamping turned inf into 65504: the sample then looked finite."""
    model = torch.nn.Sequential(torch.nn.Identity(), _Scales(), torch.nn.Identity()).eval()
    x = torch.ones(3, 8)
    with pytest.warns(probe.NonFiniteWarning):
        cap = probe.capture(
            model,
            [x],
            layers=["1"],
            probes=[probe.Activations(dtype="fp16")],
            out=tmp_path / "c.h5" if to_disk else None,
        )
    out = cap.read("1", "output")
    want = np.array([1.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 65504.0, 65504.0])
    np.testing.assert_array_equal(out[0], want)  # NaN positions must match too
    np.testing.assert_array_equal(out[1:], np.ones((2, 8)))
    assert cap.read("1", "output_clipped").tolist() == [3, 0, 0]  # 1e6, -1e6, 7e4
    assert cap.layer_attrs("1")["nonfinite_samples"] == 1


def test_fp16_gradients_keep_a_genuine_inf():
    """The same for stored gradients: an inf in dL/dy stays inf and the sample is non-finite."""

    class Inf(torch.nn.Module):
        def forward(self, x):
            return x

    class Blow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            g[0, 0] = math.inf
            return g

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inf, self.fc = Inf(), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(Blow.apply(self.inf(x)))

    torch.manual_seed(0)
    with pytest.warns(probe.NonFiniteWarning):
        cap = probe.capture(
            Net().eval(),
            [(torch.randn(2, 4), torch.tensor([0, 1]))],
            layers=["inf"],
            probes=[probe.Gradients(dtype="fp16")],
        )
    g = cap.read("inf", "grad_output")
    assert g[0, 0] == np.inf and np.isfinite(g[1]).all()
    assert cap.read("inf", "grad_output_clipped").tolist() == [0, 0]
    assert cap.layer_attrs("inf")["nonfinite_samples"] == 1


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64],
    ids=["bf16", "fp16", "fp32", "fp64"],
)
def test_fp16_storage_clips_exactly_the_values_fp16_cannot_hold_in_every_float_dtype(dtype):
    """Against numpy: a finite value (as ``dtype`` holds it) beyond 65504 is stored as +-65504 and
    counted, anything else is numpy's float16 of it. bfloat16 holds no value between 65280 and
    65536, and rounds the number 65504 up to 65536: compared with it, 65536 passed as in range
    and was stored as inf (a finite activation counted as non-finite). A second capture, of
    in-range values only, takes the CPU's one-pass way."""
    values = [65280.0, 65504.0, 65536.0, 7e4, -1e6, 1.0, -3.5, math.inf, math.nan]
    w = torch.tensor(values, dtype=torch.float64).to(dtype)  # what the model's dtype holds
    held = w.double().numpy()
    big = np.isfinite(held) & (np.abs(held) > 65504)
    want = np.where(big, np.sign(held) * 65504, held).astype(np.float16)

    class Emit(torch.nn.Module):
        def __init__(self, row):
            super().__init__()
            self.row = row

        def forward(self, x):
            return x * self.row

    inside = [0, 5, 6]  # 65280, 1, -3.5: in range in every dtype
    rows = ((w, want, int(big.sum()), held), (w[inside], want[inside], 0, held[inside]))
    for row, expect, clipped, row_held in rows:
        model = torch.nn.Sequential(torch.nn.Identity(), Emit(row)).eval()
        x = torch.ones(2, len(row), dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", probe.NonFiniteWarning)  # the NaN and inf are real
            cap = probe.capture(model, [x], layers=["1"], probes=[probe.Activations(dtype="fp16")])
        np.testing.assert_array_equal(cap.read("1", "output"), np.stack([expect, expect]))
        assert cap.read("1", "output_clipped").tolist() == [clipped, clipped]
        nonfinite = 0 if np.isfinite(row_held).all() else 2  # fp16 itself holds 7e4 as inf
        assert cap.layer_attrs("1").get("nonfinite_samples", 0) == nonfinite


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3,), torch.contiguous_format),
        ((3, 5), torch.contiguous_format),
        ((3, 4, 6, 6), torch.contiguous_format),
        ((3, 4, 6, 6), torch.channels_last),
    ],
    ids=["[N]", "[N, D]", "map", "channels-last map"],
)
def test_fp16_clips_are_counted_per_sample_in_every_rank_and_layout(shape, layout):
    from probe.probes.activations import _to_fp16

    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g) * 4e4  # about a tenth beyond fp16's range
    want = (t.abs() > 65504).reshape(3, -1).sum(1)
    clipped, stored = _to_fp16(t.contiguous(memory_format=layout))
    assert clipped.tolist() == want.tolist() and want.sum() > 0
    assert torch.equal(stored, t.clamp(-65504, 65504).to(torch.float16))
