"""The one-pass CUDA kernels (probe.probes.onepass_cuda): every quantity against numpy in float64
for float32, bf16 and fp16 maps in both memory layouts, rows long enough to span tiles and pieces,
rows whose one-pass variance would cancel, NaN and inf, what they refuse, a failing kernel, and
a capture whose statistics they compute.

Without a GPU the kernels run on triton's interpreter, CPU tensors and the same programs tile by
tile in numpy: ``TRITON_INTERPRET=1 pytest tests/probe/test_onepass_cuda.py`` (triton reads the
switch when it is imported, so it is set for the process). ``-m gpu`` runs the same checks
compiled on a CUDA device.
"""

import os
import warnings

import numpy as np
import pytest
import torch

import probe
from probe.conformance import RawSites
from probe.probes import onepass, onepass_cuda, statistics
from probe.probes.statistics import ChannelStats, GradNorms, ResidualNorms
from probe.runtime import runtime_settings

pytest.importorskip("triton")

U32 = 2.0**-24
# Per-sample sums are float64 sums of exact products, rounded once: 2 float32 units bound a norm
# and a cosine. A channel's moments are a tile's float32 tree (at most log2(2048) = 11 roundings
# of float32's unit, relative to its values' magnitudes) combined in float64: 16 units bound them.
EXACT = 2 * U32
SUM = 16 * U32


# triton reads its switch once, when it is imported: the interpreted tests need it set for the
# whole process (.ci/run runs this file so; a GPU run leaves it unset and takes the -m gpu tests)
INTERPRETED = os.environ.get(onepass_cuda.INTERPRET_ENV, "0").strip() == "1"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """The module's state as at import: kernels on, none failed."""
    onepass_cuda._module.cache_clear()
    monkeypatch.setattr(onepass_cuda, "_failed", False)
    monkeypatch.delenv(onepass.ENV, raising=False)


@pytest.fixture
def device():
    """The CPU, the kernels interpreted."""
    if not INTERPRETED:
        pytest.skip(f"runs with {onepass_cuda.INTERPRET_ENV}=1 set before triton is imported")
    return torch.device("cpu")


@pytest.fixture
def gpu():
    """A CUDA device, the kernels compiled."""
    if INTERPRETED or not torch.cuda.is_available():
        pytest.skip("needs a CUDA device, the kernels compiled")
    return torch.device("cuda")


def _scales(f, y, axis):
    """Each channel's mean |value| and mean square of y and F: what a mean's and a variance's
    rounding is relative to."""
    out = {}
    for prefix, a in (("", y), ("f_", f)):
        a = a.double().cpu().numpy()
        rows = np.moveaxis(a, axis, 1).reshape(a.shape[0], a.shape[axis], -1)
        out[f"{prefix}channel_scale"] = np.abs(rows).mean(2)
        out[f"{prefix}channel_square"] = (rows**2).mean(2)
    return out


def _named(found):
    sample, channel = found
    names = (*statistics._ONEPASS_NAMES, *statistics._CHANNEL_NAMES)
    return {k: v.cpu().double().numpy() for k, v in zip(names, (*sample, *channel))}


def _block(shape, dtype, device, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64).relu()
    f = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.1
    f, s = f.to(dtype), s.to(dtype)
    y = (f.double() + s.double()).relu().to(dtype)
    if channels_last:
        f, s, y = (t.contiguous(memory_format=torch.channels_last) for t in (f, s, y))
    return tuple(t.to(device) for t in (f, s, y))


def _assert_block(got, want, scales):
    """``got`` within the kernels' rounding of numpy's float64 numbers ``want``: norms relative,
    cosines absolutely (|y.S| <= ||y|| ||S||), a mean relative to its
    row's mean magnitude, a variance relative to its row's mean square (``scales``, the scale a
    rounding of the values is taken against)."""
    for q in ("f_norm", "s_norm", "y_norm", "dev_norm"):
        np.testing.assert_allclose(got[q], want[q], rtol=EXACT, atol=0, err_msg=q)
    for q in ("cos_ys", "cos_fs"):
        np.testing.assert_allclose(got[q], want[q], rtol=0, atol=EXACT, err_msg=q)
    for p in ("", "f_"):
        err = np.abs(got[f"{p}channel_mean"] - want[f"{p}channel_mean"])
        assert (err <= SUM * scales[f"{p}channel_scale"]).all(), f"{p}channel_mean"
        err = np.abs(got[f"{p}channel_var"] - want[f"{p}channel_var"])
        assert (err <= SUM * scales[f"{p}channel_square"]).all(), f"{p}channel_var"


def _check(found, f, s, y, axis, reference):
    """``found`` (block_sums of f, s, y) against ``reference`` (the block_reference fixture)."""
    _assert_block(_named(found), reference(f, s, y, axis), _scales(f, y, axis))


CASES = [
    ((5, 3, 7, 6), 1, False),  # channel-first: positions contiguous
    ((5, 3, 7, 6), 1, True),  # a channels-last map
    ((4, 9, 16), 2, False),  # [N, T, C] tokens, channel last
    ((2, 3, 50, 50), 1, False),  # 2500 positions: a row spans two tiles
    ((2, 200, 3, 3), 1, True),  # 200 channels contiguous: two runs of 128
    ((3, 40, 4, 4), 1, False),  # 40 channels of 16 positions: several runs of channels
    ((1, 1, 1, 1), 1, False),  # one sample, one channel, one position
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, axis, channels_last", CASES)
def test_block_sums_match_numpy_in_float64(
    shape, axis, channels_last, dtype, device, block_reference
):
    f, s, y = _block(shape, dtype, device, channels_last)
    found = onepass_cuda.block_sums(f, s, y, axis)
    assert all(t.dtype == torch.float32 for part in found for t in part)
    _check(found, f, s, y, axis, block_reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_dtypes_are_each_read_in_their_own(dtype, device, block_reference):
    """Under autocast a block's F may be bf16 and its S float32 (one shape and strides)."""
    f, s, y = _block((3, 4, 5, 5), torch.float32, device)
    f, y = f.to(dtype), y.to(dtype)
    _check(onepass_cuda.block_sums(f, s, y, 1), f, s, y, 1, block_reference)


@pytest.mark.parametrize("channels_last", [False, True])
def test_variances_of_every_condition_match_numpy(channels_last, device):
    """Rows of mean^2/var from 0 to 1e12 spanning two tiles, constant and all-zero rows: the
    variance within a few float32 units of the variance itself, where a one-pass float32 formula
    would have lost every digit past mean^2/var = 1e7."""
    g = torch.Generator().manual_seed(2)
    ratios = [0.0, 1.0, 1e2, 1e4, 1e6, 1e8, 1e12]
    base = torch.randn(2, len(ratios) + 2, 48, 48, generator=g, dtype=torch.float64)
    for j, r in enumerate(ratios):
        base[:, j] += r**0.5
    base[:, len(ratios)] = 3.25
    base[:, len(ratios) + 1] = 0.0
    t = base.float()
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    mean, var = onepass_cuda.moments(t.to(device), 1)
    rows = t.double().numpy().reshape(2, len(ratios) + 2, -1)
    err = np.abs(mean.cpu().numpy() - rows.mean(2))
    assert (err <= SUM * np.abs(rows).mean(2)).all()  # relative to the values' magnitude
    # relative to the variance: a mean's rounding (u |mean|) enters squared, and is corrected
    np.testing.assert_allclose(var.cpu().numpy(), rows.var(2), rtol=SUM, atol=0)


def test_a_nan_or_inf_gives_nan_or_inf_statistics_and_leaves_the_others_alone(
    device, block_reference
):
    f, s, y = _block((3, 4, 5, 5), torch.float32, device)
    y = y.clone()
    y[1, 2, 0, 0] = float("nan")
    y[2, 0, 1, 1] = float("inf")
    with np.errstate(invalid="ignore"):  # the interpreter's numpy meets inf - inf
        got = _named(onepass_cuda.block_sums(f, s, y, 1))
    assert np.isnan(got["channel_var"][1, 2]) and np.isnan(got["y_norm"][1])
    assert np.isnan(got["cos_ys"][1]) and np.isnan(got["dev_norm"][1])
    assert np.isinf(got["y_norm"][2]) and np.isinf(got["channel_mean"][2, 0])
    assert np.isnan(got["channel_var"][2, 0])  # inf - inf
    with np.errstate(invalid="ignore"):
        want = block_reference(f, s, y, 1)
    np.testing.assert_allclose(got["y_norm"][0], want["y_norm"][0], rtol=EXACT)
    ok = np.ones((3, 4), dtype=bool)
    ok[1, 2] = ok[2, 0] = False
    np.testing.assert_allclose(got["channel_var"][ok], want["channel_var"][ok], rtol=SUM)
    # a row of two tiles with an infinity in the first: its mean stays infinite
    long = torch.ones(1, 1, 50, 50, device=device)
    long[0, 0, 0, 0] = float("inf")
    with np.errstate(invalid="ignore"):
        mean, var = onepass_cuda.moments(long, 1)
    assert torch.isinf(mean).all() and torch.isnan(var).all()
    nan = torch.tensor(float("nan"))
    assert torch.isnan(onepass_cuda.norm(torch.stack([f[0], f[1].clone().fill_(nan)]))[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((5, 3, 7, 6), False), ((5, 3, 7, 6), True), ((4, 33), False), ((2, 3, 150, 150), False)],
)
def test_dot_and_norm_match_numpy_in_float64(shape, channels_last, dtype, device):
    """[2, 3, 150, 150] is a row of 67500 values: two pieces, added by the finishing kernel."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    got = onepass_cuda.dot(a.to(device), b.to(device)).cpu().double().numpy()
    fa, fb = (t.double().numpy().reshape(shape[0], -1) for t in (a, b))
    # float64 sums of float32 products: an error relative to sum |a b| (the sum itself cancels)
    err = np.abs(got - (fa * fb).sum(1))
    np.testing.assert_array_less(err, EXACT * np.abs(fa * fb).sum(1) + 1e-300)
    norm = onepass_cuda.norm(a.to(device))
    assert norm.dtype == torch.float32 and norm.shape == (shape[0],)
    np.testing.assert_allclose(norm.cpu().numpy(), np.linalg.norm(fa, axis=1), rtol=EXACT)


def test_rows_of_a_larger_tensor_are_read_in_place(device):
    """A sample stride past the row (a view of every sample's first half) is read as it is."""
    g = torch.Generator().manual_seed(6)
    whole = torch.randn(4, 2, 300, generator=g)
    half = whole[:, 0]
    assert half.stride(0) == 600
    want = np.linalg.norm(half.double().numpy(), axis=1)
    np.testing.assert_allclose(onepass_cuda.norm(half.to(device)).cpu(), want, rtol=EXACT)


@pytest.mark.parametrize(
    "case", ["float64", "shapes differ", "strides differ", "strided", "negated view", "2-D"]
)
def test_what_the_kernels_do_not_serve_is_left_to_torch(case, device):
    f, s, y = _block((2, 3, 4, 4), torch.float32, device)
    if case == "float64":
        f, s, y = (t.double() for t in (f, s, y))
    elif case == "shapes differ":
        s = s[:1]
    elif case == "strides differ":
        s = s.contiguous(memory_format=torch.channels_last)
    elif case == "strided":
        f, s, y = (t[..., ::2] for t in (f, s, y))
    elif case == "negated view":
        s = s.clone()._neg_view()
    elif case == "2-D":
        f, s, y = (t.flatten(1) for t in (f, s, y))
    assert onepass_cuda.block_sums(f, s, y, 1) is None
    if case in ("float64", "negated view"):
        assert onepass_cuda.norm(s) is None and onepass_cuda.dot(f, s) is None


def test_a_sample_past_32_bit_offsets_is_left_to_torch(monkeypatch, device):
    """The map kernel addresses a sample's values with 32-bit offsets: a sample of more values
    (2^31, a 4 GiB bf16 map: stood for by a lower bound here) would wrap them."""
    f, s, y = _block((2, 3, 4, 4), torch.float32, device)
    monkeypatch.setattr(onepass_cuda, "_SAMPLE_VALUES", 3 * 16 - 1)
    assert onepass_cuda.block_sums(f, s, y, 1) is None and onepass_cuda.moments(y, 1) is None
    monkeypatch.setattr(onepass_cuda, "_SAMPLE_VALUES", 3 * 16)
    assert onepass_cuda.block_sums(f, s, y, 1) is not None


def test_cpu_tensors_are_never_taken_without_the_interpreter(monkeypatch):
    monkeypatch.delenv(onepass_cuda.INTERPRET_ENV, raising=False)
    f, s, y = _block((2, 3, 4, 4), torch.float32, "cpu")
    assert onepass_cuda.block_sums(f, s, y, 1) is None
    assert onepass_cuda.norm(f) is None and onepass_cuda.moments(f, 1) is None
    assert statistics._one_read(f) is onepass  # the CPU's own kernels serve CPU tensors


def test_every_launch_runs_with_the_tensors_device_current(monkeypatch, device):
    """triton launches on the current CUDA device: each call makes its tensors' current first
    (on the GPU with two devices: test_a_tensor_on_another_device_than_the_current_one_...)."""
    import contextlib

    seen = []
    monkeypatch.setattr(onepass_cuda, "_on", lambda d: seen.append(d) or contextlib.nullcontext())
    f, s, y = _block((2, 3, 4, 4), torch.float32, device)
    onepass_cuda.block_sums(f, s, y, 1)
    onepass_cuda.moments(y, 1)
    onepass_cuda.dot(f, s)
    onepass_cuda.norm(f)
    assert seen == [device] * 4


def test_the_environment_turns_them_off(monkeypatch, device):
    f, s, y = _block((2, 3, 4, 4), torch.float32, device)
    monkeypatch.setenv(onepass.ENV, "0")
    assert onepass_cuda.block_sums(f, s, y, 1) is None
    assert onepass_cuda.mode() == "torch" and not onepass_cuda.available()
    monkeypatch.setenv(onepass.ENV, "1")
    assert onepass_cuda.block_sums(f, s, y, 1) is not None
    assert onepass_cuda.mode() == "one-pass"
    cuda = "one-pass" if torch.cuda.is_available() else "none"  # no CUDA statistics without one
    assert runtime_settings()["cuda_statistics"] == cuda


def test_a_failing_kernel_warns_once_and_torchs_formulas_serve(monkeypatch, device):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no kernel image for this device")

            return launch

    kernels = onepass_cuda._module()
    monkeypatch.setattr(kernels, "channels", Broken())
    f, s, y = _block((2, 3, 4, 4), torch.float32, device)
    with pytest.warns(onepass.OnePassWarning, match="no kernel image"):
        assert onepass_cuda.block_sums(f, s, y, 1) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls go to torch without a word
        assert onepass_cuda.block_sums(f, s, y, 1) is None
        assert onepass_cuda.norm(f) is None
    assert onepass_cuda.mode() == "torch"


@pytest.fixture
def counted(monkeypatch, device):
    """Route the statistics' CPU tensors to the CUDA kernels (interpreted), counting calls."""
    calls = []
    monkeypatch.setattr(statistics, "_one_read", lambda t: onepass_cuda)
    for name in ("block_sums", "moments", "dot", "norm"):
        real = getattr(onepass_cuda, name)
        monkeypatch.setattr(
            onepass_cuda, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a)
        )
    return calls


@pytest.mark.parametrize("grouped", [False, True])
def test_a_capture_gives_numpys_numbers_through_the_kernels(
    grouped, counted, statistics_reference, small_net, two_batches
):
    """The statistics probes' numbers, per call and grouped, with every one-read call going to
    the kernels: numpy's float64 numbers from the recorded x, F, S and y."""
    cap = probe.capture(
        small_net("resnet20"),
        two_batches,
        probes=[ResidualNorms(), ChannelStats(), RawSites()],
        grouped=grouped,
    )
    assert "block_sums" in counted
    blocks = [layer for layer in cap.layers if "F" in cap.quantities(layer)]
    assert len(blocks) == 9
    for layer in blocks:
        raw = {k: torch.from_numpy(cap.read(layer, k)) for k in "XFSY"}
        want = statistics_reference(raw)
        names = [q for q in cap.quantities(layer) if q in want]
        assert {"dev_norm", "cos_ys", "channel_var", "f_channel_var"} <= set(names), layer
        for q in names:
            np.testing.assert_allclose(
                cap.read(layer, q), want[q], rtol=SUM, atol=4 * SUM, err_msg=f"{layer} {q}"
            )


def test_grouped_and_per_call_statistics_are_the_same_bit_for_bit(counted, small_net, two_batches):
    """A sample's programs read the same values in the same order whether its block's tensors
    were stacked with others of the group or not: equal numbers, not merely close."""
    probes = lambda: [ResidualNorms(), ChannelStats(), GradNorms()]  # noqa: E731
    caps = [
        probe.capture(small_net("resnet20"), two_batches, probes=probes(), grouped=g)
        for g in (False, True)
    ]
    assert {"block_sums", "norm", "dot"} <= set(counted)
    layers = caps[0].layers
    assert layers == caps[1].layers
    compared = 0
    for layer in layers:
        for q in caps[0].quantities(layer):
            np.testing.assert_array_equal(caps[0].read(layer, q), caps[1].read(layer, q), q)
            compared += 1
    assert compared > 9 * 10


@pytest.mark.parametrize("grouped", [False, True])
def test_gradient_statistics_match_autograd_through_the_kernels(
    grouped, counted, small_net, two_batches, gradient_statistics_check
):
    """GradNorms' norms and cos(F, dL/dx) with F.dL/dx and every norm from the kernels, against
    the gradients of the same model in float64."""
    x, y = two_batches[0]
    cap = probe.capture(
        small_net("resnet20"), [(x, y)], probes=[GradNorms(), RawSites()], grouped=grouped
    )
    assert {"dot", "norm"} <= set(counted)
    gradient_statistics_check(cap, "resnet20", x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, axis, channels_last", CASES[:5])
def test_compiled_kernels_match_numpy_on_a_gpu(
    shape, axis, channels_last, dtype, gpu, block_reference
):
    f, s, y = _block(shape, dtype, gpu, channels_last)
    _check(onepass_cuda.block_sums(f, s, y, axis), f, s, y, axis, block_reference)
    mean, var = onepass_cuda.moments(y, axis)
    want = block_reference(f, s, y, axis)
    np.testing.assert_allclose(var.cpu().double(), want["channel_var"], rtol=SUM, atol=1e-30)
    fa = f.double().cpu().flatten(1)
    np.testing.assert_allclose(onepass_cuda.norm(f).cpu(), fa.norm(dim=1), rtol=EXACT)


@pytest.mark.gpu
def test_kernels_record_into_a_cuda_graph_and_replay_new_values(gpu, block_reference):
    """Recorded once, replayed on new values in the same memory: the new values' numbers."""
    f, s, y = _block((64, 16, 32, 32), torch.bfloat16, gpu, channels_last=True)
    onepass_cuda.block_sums(f, s, y, 1)  # compiled before the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        found = onepass_cuda.block_sums(f, s, y, 1)
    f2, s2, y2 = _block((64, 16, 32, 32), torch.bfloat16, gpu, channels_last=True, seed=3)
    for t, new in zip((f, s, y), (f2, s2, y2)):
        t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    _check(found, f2, s2, y2, 1, block_reference)


def _compiled(fn, signature: dict, constexprs: dict, arch: int, values: dict | None = None):
    """``fn`` compiled ahead of time for an NVIDIA GPU of compute capability ``arch`` (no GPU
    needed: triton's own ptxas), specialised as a launch specialises it: pointers and the sample
    stride 16-byte aligned, and each integer of ``values`` that 16 divides marked so."""
    compiler = pytest.importorskip("triton.compiler")
    target = pytest.importorskip("triton.backends.compiler").GPUTarget("cuda", arch, 32)
    names = list(signature)
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, k in enumerate(names)
        if signature[k].startswith("*") or k == "stride_n" or (values or {}).get(k, 1) % 16 == 0
    }
    source = compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    return compiler.compile(source, target=target, options={"num_warps": onepass_cuda._WARPS})


def _registers(cubin: bytes, tmp_path) -> str:
    """cuobjdump's resource line of a kernel (registers, stack), or "" without cuobjdump."""
    import subprocess
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    return next((line for line in out.stdout.splitlines() if "REG:" in line), "")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(
    "channels, positions, columns",
    [(16, 1024, False), (16, 1024, True), (64, 64, False), (256, 3136, True), (2048, 49, False)],
)
def test_the_map_kernel_compiles_for_a_gpu_without_spilling(
    channels, positions, columns, arch, tmp_path
):
    """Every tile :func:`~probe.probes.onepass_cuda._tile` picks for ResNet-56's and ResNet-50's
    maps, compiled for Ampere and Hopper: a kernel that does not compile would only show on a
    GPU (as a warning, and torch's formulas). Loads of 16 bytes (vectorised along the contiguous
    axis) and no spilled registers, both of which a streaming kernel needs to keep up with memory."""
    if INTERPRETED:
        pytest.skip("compiles kernels: triton's interpreter is on")
    from probe.probes import _triton_kernels

    block_c, block_p = onepass_cuda._tile(channels, positions, columns)
    signature = {
        **dict.fromkeys(["y_ptr", "f_ptr", "s_ptr"], "*bf16"),
        "moments_ptr": "*fp32",
        "partial_ptr": "*fp64",
        **dict.fromkeys(["n_samples", "n_channels", "n_positions", "stride_n"], "i32"),
        **dict.fromkeys(["BLOCK", "COLUMNS", "BLOCK_C", "BLOCK_P"], "constexpr"),
    }
    for block in (True, False):
        constexprs = {"BLOCK": block, "COLUMNS": columns, "BLOCK_C": block_c, "BLOCK_P": block_p}
        values = {"n_channels": channels, "n_positions": positions}
        kernel = _compiled(_triton_kernels.channels, signature, constexprs, arch, values)
        assert kernel.asm["cubin"]
        if (channels if columns else positions) % 8 == 0:  # rows of whole 16-byte words
            assert "ld.global.v4" in kernel.asm["ptx"]
        usage = _registers(kernel.asm["cubin"], tmp_path)
        assert "STACK:0 " in usage or not usage, usage


@pytest.mark.parametrize("arch", [80, 90])
def test_the_finishing_and_row_kernels_compile_for_a_gpu(arch, tmp_path):
    if INTERPRETED:
        pytest.skip("compiles kernels: triton's interpreter is on")
    from probe.probes import _triton_kernels as k

    rows = {"partial_ptr": "*fp64", "out_ptr": "*fp32"}
    finish = {**rows, "n_samples": "i32", "n_parts": "i32", "BLOCK_R": "constexpr"}
    assert _compiled(k.finish_block, finish, {"BLOCK_R": 8}, arch).asm["cubin"]
    for root in (True, False):
        signature = {**rows, "n_parts": "i32", "ROOT": "constexpr", "BLOCK_R": "constexpr"}
        assert _compiled(k.finish_rows, signature, {"ROOT": root, "BLOCK_R": 4}, arch).asm["cubin"]
    for same in (True, False):
        signature = {
            "a_ptr": "*bf16",
            "b_ptr": "*fp32",
            "partial_ptr": "*fp64",
            **dict.fromkeys(["n_values", "stride_n", "piece"], "i32"),
            **dict.fromkeys(["SAME", "BLOCK"], "constexpr"),
        }
        kernel = _compiled(k.products, signature, {"SAME": same, "BLOCK": 1024}, arch)
        usage = _registers(kernel.asm["cubin"], tmp_path)
        assert "STACK:0 " in usage or not usage, usage


@pytest.mark.gpu
def test_a_tensor_on_another_device_than_the_current_one_is_read_there(gpu, block_reference):
    """triton launches on the current device: the kernels make the tensors' device current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    other = torch.device("cuda", 1 - torch.cuda.current_device())
    f, s, y = _block((4, 8, 16, 16), torch.bfloat16, other)
    _check(onepass_cuda.block_sums(f, s, y, 1), f, s, y, 1, block_reference)


def test_the_kernels_benchmark_runs_and_every_tile_gives_the_same_numbers(
    device, monkeypatch, capsys
):
    """benchmarks/bench_onepass_cuda.py's smoke run: each layout, each tile and warp count, the
    numbers of the default tile (the GPU session's timings depend on it running as written)."""
    import sys

    from benchmarks import bench_onepass_cuda

    monkeypatch.setattr(sys, "argv", ["bench_onepass_cuda", "--smoke", "--tiles", "16,2048"])
    bench_onepass_cuda.main()
    out = capsys.readouterr().out
    assert "channel-first" in out and "channels-last" in out
    assert out.count("tile ") == 2 * 2 * 3 and "NUMBERS DIFFER" not in out
