"""The one-pass CPU kernels (probe.probes.onepass): every quantity against numpy in float64, in
both memory layouts and both precisions, rows whose one-pass variance would cancel, NaN rows,
what they refuse, and what a capture records with them on and off."""

import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import probe
from probe.conformance import RawSites
from probe.probes import onepass, statistics
from probe.probes.statistics import ChannelStats, ResidualNorms

pytestmark = pytest.mark.skipif(not onepass.available(), reason="needs numba")

# float32 results are float64 sums rounded once: within 2 float32 ulps of numpy's float64 values
F32 = 2 * 2**-24
F64 = 1e-12


def _block(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64).relu().to(dtype)
    f = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    y = (f + s).relu()
    if channels_last:
        f, s, y = (t.contiguous(memory_format=torch.channels_last) for t in (f, s, y))
    return f, s, y


def _named(found):
    sample, channel = found
    return {
        **dict(zip(statistics._ONEPASS_NAMES, sample)),
        **dict(zip(statistics._CHANNEL_NAMES, channel)),
    }


_KEYS = {
    "channel_mean": "channel_mean",
    "channel_var": "channel_var",
    "f_channel_mean": "f_channel_mean",
    "f_channel_var": "f_channel_var",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, axis, channels_last",
    [
        ((5, 3, 7, 6), 1, False),  # rows: channel-first, positions contiguous
        ((5, 3, 7, 6), 1, True),  # columns: a channels-last map
        ((4, 9, 16), 2, False),  # columns: [N, T, C] tokens, channel last
        ((4, 9, 16), 1, False),  # rows: the same tokens read with T as the channel
        ((1, 1, 1, 1), 1, False),  # one sample, one channel, one position
        ((2, 5, 1, 1), 1, False),  # one position per channel: variance 0
    ],
)
def test_block_sums_match_numpy_in_float64(shape, axis, channels_last, dtype, block_reference):
    f, s, y = _block(shape, dtype, channels_last)
    got = _named(onepass.block_sums(f, s, y, axis))
    want = block_reference(f, s, y, axis)
    rtol = F32 if dtype == torch.float32 else F64
    assert set(got) == set(want)
    for q, w in want.items():
        assert got[q].dtype == dtype, q
        # a variance of 0 (one position) and a cosine of 0 are absolute: atol at the floor
        np.testing.assert_allclose(got[q].numpy(), w, rtol=rtol, atol=1e-30, err_msg=q)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variances_of_every_condition_match_numpy(dtype, channels_last):
    """Rows of mean^2/var from 0 to 1e12, constant and all-zero rows side by side: the rows whose
    one-pass sums would cancel take the two-pass formula, the others keep theirs."""
    g = torch.Generator().manual_seed(2)
    ratios = [0.0, 1.0, 1e2, 1e4, 1e6, 1e8, 1e12]
    base = torch.randn(3, len(ratios) + 2, 9, 9, generator=g, dtype=torch.float64)
    for j, r in enumerate(ratios):
        base[:, j] += r**0.5  # unit variance around a mean of sqrt(r)
    base[:, len(ratios)] = 3.25  # constant
    base[:, len(ratios) + 1] = 0.0
    t = base.to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    mean, var = onepass.moments(t, 1)
    rows = t.double().numpy().reshape(3, len(ratios) + 2, -1)
    rtol = F32 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(mean.numpy(), rows.mean(2), rtol=rtol)
    np.testing.assert_allclose(var.numpy(), rows.var(2), rtol=rtol, atol=0)
    # the block kernel's moments of the same map are the same to the bit or one rounding apart
    f, s = torch.zeros_like(t), torch.ones_like(t)
    block = _named(onepass.block_sums(f, s, t, 1))
    np.testing.assert_allclose(block["channel_var"].numpy(), var.numpy(), rtol=rtol, atol=0)


def test_a_nan_row_gives_nan_statistics_and_leaves_the_others_alone(block_reference):
    f, s, y = _block((3, 4, 5, 5), torch.float32)
    y = y.clone()
    y[1, 2, 0, 0] = float("nan")
    y[2, 0, 1, 1] = float("inf")
    got = _named(onepass.block_sums(f, s, y, 1))
    assert torch.isnan(got["channel_var"][1, 2]) and torch.isnan(got["y_norm"][1])
    assert torch.isinf(got["y_norm"][2]) and torch.isinf(got["channel_mean"][2, 0])
    assert torch.isnan(got["channel_var"][2, 0])  # inf - inf
    with np.errstate(invalid="ignore"):
        want = block_reference(f, s, y, 1)
    np.testing.assert_allclose(got["y_norm"][0].numpy(), want["y_norm"][0], rtol=F32)
    ok = torch.ones(3, 4, dtype=torch.bool)
    ok[1, 2] = ok[2, 0] = False
    np.testing.assert_allclose(
        got["channel_var"][ok].numpy(), want["channel_var"][ok.numpy()], rtol=F32
    )


@pytest.mark.parametrize(
    "case",
    [
        "bf16",
        "fp16",
        "mixed dtypes",
        "shapes differ",
        "strided",
        "meta",
        "complex",
        "2-D",
        "empty",
        "negated view",
        "sparse",
    ],
)
def test_what_the_kernels_do_not_serve_is_left_to_torch(case):
    f, s, y = _block((2, 3, 4, 4), torch.float32)
    if case == "bf16":
        f, s, y = (t.bfloat16() for t in (f, s, y))
    elif case == "fp16":
        f, s, y = (t.half() for t in (f, s, y))
    elif case == "mixed dtypes":
        s = s.double()
    elif case == "shapes differ":
        s = s[:, :2]
    elif case == "strided":
        f, s, y = (t[..., ::2] for t in (f, s, y))
    elif case == "meta":
        f, s, y = (t.to("meta") for t in (f, s, y))
    elif case == "complex":
        f, s, y = (t.to(torch.complex64) for t in (f, s, y))
    elif case == "2-D":
        f, s, y = (t.flatten(1) for t in (f, s, y))
    elif case == "empty":
        f, s, y = (t[:, :, :0] for t in (f, s, y))
    elif case == "negated view":  # memory that holds -y: read as it lies, it would give y's sums
        f, s, y = (t._neg_view() for t in (f, s, y))
    elif case == "sparse":
        f, s, y = (t.to_sparse() for t in (f, s, y))
    assert onepass.block_sums(f, s, y, 1) is None
    if case not in ("mixed dtypes", "shapes differ"):  # y alone is served there
        assert onepass.moments(y, 1) is None


def test_tensors_without_memory_of_their_own_are_left_to_torch():
    """Inside torch.func's transforms a tensor wraps others: no address to read."""
    t = torch.randn(3, 2, 4, 5)
    seen = []
    torch.func.vmap(lambda u: seen.append(onepass.moments(u[None], 1)) or u.sum())(t)
    assert seen == [None]
    assert onepass.norm(torch.randn(2, 6)) is not None  # the same call outside


def test_tensors_that_need_a_gradient_or_come_from_inference_mode_are_read_as_they_are():
    f, s, y = _block((2, 3, 4, 4), torch.float32)
    want = _named(onepass.block_sums(f, s, y, 1))
    with torch.inference_mode():
        fi, si, yi = (t.clone() for t in (f, s, y))
    leaf = y.clone().requires_grad_(True)
    for args in ((fi, si, yi), (f, s, leaf)):
        got = _named(onepass.block_sums(*args, 1))
        for q in want:
            torch.testing.assert_close(got[q], want[q], rtol=0, atol=0)


def test_the_environment_turns_them_off_and_a_capture_records_which_ran(monkeypatch, tmp_path):
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batches = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    on = probe.capture(model, batches, probes=[ResidualNorms()], out=tmp_path / "on.h5")
    assert on.provenance["runtime"]["cpu_statistics"] == "one-pass"
    monkeypatch.setenv(onepass.ENV, "0")
    assert (
        onepass.mode() == "torch"
        and onepass.block_sums(*_block((1, 1, 2, 2), torch.float32), 1) is None
    )
    off = probe.capture(model, batches, probes=[ResidualNorms()], out=tmp_path / "off.h5")
    assert off.provenance["runtime"]["cpu_statistics"] == "torch"
    for layer in on.layers:
        for q in on.quantities(layer):
            np.testing.assert_allclose(on.read(layer, q), off.read(layer, q), rtol=2e-6)


@pytest.fixture
def entries_made_again():
    """Entries compiled anew for the test and after it (the test may replace how they are)."""
    onepass._entry.cache_clear()
    yield
    onepass._entry.cache_clear()


def test_a_failing_kernel_warns_once_and_the_torch_formulas_serve(monkeypatch, entries_made_again):
    def broken(*args):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(onepass, "_failed", False)
    monkeypatch.setattr(onepass._module(), "entry", broken)
    f, s, y = _block((2, 3, 4, 4), torch.float32)
    with pytest.warns(onepass.OnePassWarning, match="out of registers"):
        assert onepass.block_sums(f, s, y, 1) is None
    assert onepass.mode() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls are quietly torch's
        assert onepass.block_sums(f, s, y, 1) is None
        model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
        batch = [(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))]
        cap = probe.capture(model, batch, probes=[ResidualNorms(), ChannelStats()])
    assert np.isfinite(cap.read("stages.0.0", "channel_var")).all()


@pytest.mark.parametrize("out", ["h5", "memory"])
def test_a_kernel_failing_during_a_capture_is_recorded_as_a_change_of_formulas(
    out, monkeypatch, tmp_path
):
    """The provenance is read when a capture starts; a kernel that fails at its second batch
    turns the kernels off for the rest of it. The capture records both formulas, in order, and
    its numbers are torch's formulas' (within float32 rounding) for every batch."""
    monkeypatch.setattr(onepass, "_failed", False)
    entry, broken = onepass._entry, []

    def breaks_at_the_second_batch(*key):
        if broken:
            raise RuntimeError("LLVM ERROR: out of registers")
        return entry(*key)

    monkeypatch.setattr(onepass, "_entry", breaks_at_the_second_batch)
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batches = [(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)) for _ in range(2)]

    def data():
        yield batches[0]
        broken.append(True)
        yield batches[1]

    probes = [ResidualNorms(), ChannelStats()]
    path = tmp_path / "x.h5" if out == "h5" else None
    with pytest.warns(onepass.OnePassWarning, match="out of registers"):
        cap = probe.capture(model, data(), probes=probes, out=path)
    if path is not None:
        cap.close()
        cap = probe.open(path)  # its attributes' digest covers the provenance written last
    assert cap.provenance["runtime"]["cpu_statistics"] == "one-pass, then torch"
    assert onepass.mode() == "torch"
    torchs = probe.capture(model, batches, probes=probes)
    assert torchs.provenance["runtime"]["cpu_statistics"] == "torch"
    for layer in torchs.layers:
        for q in torchs.quantities(layer):
            want = torchs.read(layer, q)
            # float32 sums of 64 positions: a mean near zero is within rounding of its values'
            # scale, not of itself
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(cap.read(layer, q), want, rtol=2e-6, atol=1e-6 * scale)


def test_a_capture_whose_kernels_never_fail_records_one_formula(tmp_path):
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batches = [(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))] * 2
    cap = probe.capture(model, batches, probes=[ResidualNorms()], out=tmp_path / "x.h5")
    assert cap.provenance["runtime"]["cpu_statistics"] == "one-pass"
    assert not onepass._failed


def _every_kernel(dtype=torch.float32):
    """Each entry point on inputs of both layouts: name -> a call returning its tensors."""
    f, s, y = _block((6, 5, 9, 7), dtype)
    fl, sl, yl = _block((6, 5, 9, 7), dtype, channels_last=True)
    big = torch.randn(2, 3 * 16384 + 5, dtype=dtype)  # four pieces a row
    return {
        "block rows": lambda: _flat(onepass.block_sums(f, s, y, 1)),
        "block columns": lambda: _flat(onepass.block_sums(fl, sl, yl, 1)),
        "moments rows": lambda: onepass.moments(y, 1),
        "moments columns": lambda: onepass.moments(yl, 1),
        "dot": lambda: (onepass.dot(big, big.flip(1).contiguous()),),
        "norm": lambda: (onepass.norm(big),),
    }


def _flat(found):
    return (*found[0], *found[1])


@pytest.fixture
def threads():
    """``threads(n)``: torch's intra-op count for the test (restored after it)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _team_serves() -> bool:
    return onepass._TEAM.serves()


@pytest.fixture(params=["team", "pool"])
def place(request, monkeypatch):
    """Where a split call's other spans run: torch's OpenMP team (from any size on) or resprobe's
    pool (the team off); yields the list each call that went there appends to."""
    used = []
    if request.param == "team":
        if not _team_serves():
            pytest.skip("torch's OpenMP team does not serve this process")
        monkeypatch.setattr(onepass, "TEAM_VALUES", 0)
        run = onepass._TEAM.run
        monkeypatch.setattr(onepass._TEAM, "run", lambda *a: used.append(a[2]) or run(*a))
    else:
        monkeypatch.setattr(onepass, "TEAM_VALUES", 1 << 62)
        monkeypatch.setattr(onepass, "MIN_VALUES", 1)
        get = onepass._POOL.get
        monkeypatch.setattr(onepass._POOL, "get", lambda n: used.append(n + 1) or get(n))
    yield used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", list(_every_kernel()))
def test_a_call_split_across_threads_gives_one_threads_numbers_bit_for_bit(
    kernel, dtype, threads, place
):
    """A row is summed by one thread whatever the split, so the thread count changes no bit."""
    call = _every_kernel(dtype)[kernel]
    threads(1)
    want = call()
    assert not place  # one thread: no split
    threads(3)
    got = call()
    assert place and place[0] == 3  # the calling thread and two others
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's team is used on Linux with torch's OpenMP backend",
)
def test_torchs_openmp_team_serves_where_torch_runs_on_openmp():
    assert _team_serves()
    runtime = onepass._openmp_runtime()
    assert runtime is not None
    assert runtime.omp_get_max_threads() == torch.get_num_threads()  # torch's own runtime


def test_a_call_takes_a_thread_per_team_values_or_min_values_it_reads(threads, monkeypatch):
    """On torch's team one thread per TEAM_VALUES values, at most torch's count and one per item;
    without the team, one of the pool's per MIN_VALUES; one thread's worth stays on the calling
    thread."""
    k, m = onepass.TEAM_VALUES, onepass.MIN_VALUES
    threads(4)
    monkeypatch.setattr(onepass._TEAM, "serves", lambda: True)
    assert onepass._place(32, 2 * k - 1) == ("thread", 1)
    assert onepass._place(32, 3 * k) == ("team", 3)
    assert onepass._place(32, 100 * k) == ("team", 4)  # <= torch's count
    assert onepass._place(2, 100 * k) == ("team", 2)  # <= items
    assert onepass._place(1, 100 * k) == ("thread", 1)
    threads(1)
    assert onepass._place(32, 100 * m) == ("thread", 1)
    threads(4)
    monkeypatch.setattr(onepass._TEAM, "serves", lambda: False)
    assert onepass._place(100, 2 * m - 1) == ("thread", 1)
    assert onepass._place(100, 2 * m) == ("pool", 2)
    assert onepass._place(3, 100 * m) == ("pool", 3)  # <= items
    assert onepass._place(10**6, 100 * m) == ("pool", 4)  # <= torch's count


def test_the_descriptor_is_laid_out_as_the_entries_read_it():
    kernels = onepass._module()
    assert (onepass._WORDS, onepass._ARRAYS) == (kernels.WORDS, kernels.ARRAYS)
    assert onepass._ARRAYS + 6 <= onepass._WORDS  # block_rows' six arrays fit
    with pytest.raises(KeyError):  # no other kernel's entry for a name or precision it lacks
        kernels.entry("block_sums", np.float32)
    with pytest.raises(KeyError):
        kernels.entry("block_rows", np.float16)


def test_the_runtime_is_the_one_loaded_or_torchs_own_copy():
    home = "/env/site-packages/torch"
    ours, system = f"{home}/lib/libgomp-a34b3233.so.1", "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    other = "/usr/lib/libfoo.so"
    assert onepass._torchs_runtime({system, other}, home) == system
    assert onepass._torchs_runtime({ours, system, other}, home) == ours
    assert onepass._torchs_runtime({system, "/opt/libiomp5.so"}, home) is None  # which one?
    assert onepass._torchs_runtime({other}, home) is None
    assert onepass._torchs_runtime({f"{home}2/lib/libgomp.so.1", system}, home) is None


def test_the_environment_keeps_the_kernels_off_torchs_team(monkeypatch):
    monkeypatch.setenv(onepass.TEAM_ENV, "0")
    assert not onepass._Team().serves()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_torchs_openmp_settings_are_left_as_they_were(threads, monkeypatch):
    """Only GOMP_parallel is called, with the count given per call: the runtime's thread count,
    nesting and active levels stay as torch (or the user) set them."""
    if not _team_serves():
        pytest.skip("torch's OpenMP team does not serve this process")
    runtime = onepass._openmp_runtime()
    monkeypatch.setattr(onepass, "TEAM_VALUES", 0)
    for count in (3, 1, 2):
        threads(count)
        levels, nested = runtime.omp_get_max_active_levels(), runtime.omp_get_nested()
        for call in _every_kernel().values():
            call()
        assert torch.get_num_threads() == runtime.omp_get_max_threads() == count
        assert runtime.omp_get_max_active_levels() == levels
        assert runtime.omp_get_nested() == nested


def test_torchs_thread_count_is_left_as_it_was_set(threads, monkeypatch):
    """The kernels start no OpenMP team: torch.set_num_threads(1) still holds after them (numba's
    OpenMP layer set torch's runtime to every core when it started)."""
    monkeypatch.setattr(onepass, "MIN_VALUES", 1)
    threads(1)
    for call in _every_kernel().values():
        call()
    assert torch.get_num_threads() == 1
    threads(2)
    for call in _every_kernel().values():
        call()
    assert torch.get_num_threads() == 2


def test_a_call_too_small_to_repay_a_hand_off_stays_on_the_calling_thread(threads, monkeypatch):
    threads(4)
    monkeypatch.setattr(onepass._POOL, "get", lambda n: pytest.fail("small calls split"))
    monkeypatch.setattr(onepass._TEAM, "run", lambda *a: pytest.fail("small calls split"))
    f, s, y = _block((2, 3, 4, 4), torch.float32)
    assert onepass.block_sums(f, s, y, 1) is not None


def test_calls_from_several_threads_at_once_give_the_same_numbers(threads, place):
    threads(2)
    calls = _every_kernel()
    want = {k: call() for k, call in calls.items()}
    results, errors = [], []

    def work():
        try:
            for _ in range(10):
                results.extend((k, call()) for k, call in calls.items())
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors and len(results) == 3 * 10 * len(calls)
    assert len(place) == (3 * 10 + 1) * len(calls)  # every call split
    for k, got in results:
        for g, w in zip(got, want[k], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_thread_of_the_pool_failing_warns_once_and_torch_serves(threads, monkeypatch):
    address, call, compiled = onepass._entry("moments_rows", np.dtype(np.float32))
    caller = threading.get_ident()

    def fails_off_the_calling_thread(data):
        if threading.get_ident() != caller:
            raise RuntimeError("a pool thread broke")
        call(data)

    monkeypatch.setattr(onepass, "_failed", False)
    failing = (address, fails_off_the_calling_thread, compiled)
    monkeypatch.setattr(onepass, "_entry", lambda *key: failing)
    monkeypatch.setattr(onepass, "MIN_VALUES", 1)
    monkeypatch.setattr(onepass, "TEAM_VALUES", 1 << 62)  # the pool's threads, not the team's
    threads(2)
    with pytest.warns(onepass.OnePassWarning, match="a pool thread broke"):
        assert onepass.moments(torch.randn(4, 3, 5), 1) is None
    assert onepass.mode() == "torch"


@pytest.mark.parametrize("where", ["thread", "team"])
def test_a_call_whose_chunks_were_not_all_done_is_not_taken_for_a_result(
    where, threads, monkeypatch
):
    """A failure inside an entry cannot raise through the foreign call that ran it (numba prints
    it and the entry returns): its outputs would be whatever memory held. The count of chunks
    done is checked instead, and the torch formulas serve from then on."""
    monkeypatch.setattr(onepass, "_failed", False)
    if where == "team":
        if not _team_serves():
            pytest.skip("torch's OpenMP team does not serve this process")
        monkeypatch.setattr(onepass, "TEAM_VALUES", 0)
        monkeypatch.setattr(onepass._TEAM, "run", lambda *a: None)  # no thread entered
        threads(2)
    else:
        address, _, compiled = onepass._entry("block_rows", np.dtype(np.float32))
        monkeypatch.setattr(onepass, "_entry", lambda *key: (address, lambda data: None, compiled))
    f, s, y = _block((2, 3, 4, 4), torch.float32)
    with pytest.warns(onepass.OnePassWarning, match="did 0 of its"):
        assert onepass.block_sums(f, s, y, 1) is None
    assert onepass.mode() == "torch"


def test_a_pool_grown_for_one_call_still_takes_the_spans_of_another():
    """Growing the pool for a call on one thread (torch's count raised) leaves the executor that a
    call on another thread is handing spans to open: a closed one would refuse them and turn the
    kernels off for the process."""
    pool = onepass._Pool()
    first = pool.get(1)
    grown = pool.get(2)
    assert grown is not first
    assert first.submit(lambda: 7).result(timeout=60) == 7
    assert pool.get(2) is grown and pool.get(1) is grown


def _child_norm(queue, t) -> None:
    out = onepass.norm(t)
    queue.put((None if out is None else out.tolist(), onepass._TEAM.serves()))


def test_a_forked_child_splits_its_calls_on_threads_of_its_own(threads, monkeypatch):
    """A fork keeps the parent's pool and OpenMP team but not their threads: the child must hand
    its spans neither to a queue no thread empties nor to a team that is gone (torch's own
    parallel operations hang in such a child). The child runs no torch op of its own."""
    import multiprocessing

    monkeypatch.setattr(onepass, "MIN_VALUES", 1)
    monkeypatch.setattr(onepass, "TEAM_VALUES", 0)
    threads(2)
    t = torch.randn(4, 3 * 16384, generator=torch.Generator().manual_seed(3))
    want = onepass.norm(t).tolist()  # on the parent's team, where it serves
    monkeypatch.setattr(onepass, "TEAM_VALUES", 1 << 62)
    assert onepass.norm(t).tolist() == want  # the parent's pool exists now
    monkeypatch.setattr(onepass, "TEAM_VALUES", 0)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_norm, args=(queue, t))
    child.start()
    try:
        got, team = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert got == want and not team and child.exitcode == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_no_second_openmp_runtime_joins_torchs():
    """numba's threading layers are not started: on Linux the first it tries is GNU OpenMP's,
    whose module loads the system's libgomp beside the one torch ships."""
    script = (
        "import torch\n"
        "from probe.probes import onepass\n"
        "torch.set_num_threads(2); onepass.MIN_VALUES = 1\n"
        "torch.randn(256, 256) @ torch.randn(256, 256)\n"
        "assert onepass.block_sums(*(torch.randn(4, 8, 16, 16) for _ in range(3)), 1)\n"
        "assert onepass.norm(torch.randn(4, 40000)) is not None\n"
        "libs = {l.split()[-1] for l in open('/proc/self/maps') if '/' in l}\n"
        "print('\\n'.join(sorted(libs)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    libs = out.stdout.split()
    assert not [lib for lib in libs if "omppool" in lib or "tbbpool" in lib or "workqueue" in lib]
    assert len([lib for lib in libs if "libgomp" in Path(lib).name]) <= 1, libs


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(
    "probes", [("residual", "channel"), ("channel", "residual"), ("residual",), ("channel",)]
)
def test_a_capture_gives_numpys_numbers_with_one_kernel_call_per_block(
    probes, grouped, monkeypatch, statistics_reference, small_net, two_batches
):
    """Each probe alone and the pair in either order, per call and grouped: numpy's float64
    numbers to float32's rounding, and a block's tensors read by one kernel call that the pair
    shares (the moments kernel only for ChannelStats alone)."""
    calls = []
    block_sums, moments = onepass.block_sums, onepass.moments
    monkeypatch.setattr(onepass, "block_sums", lambda *a: calls.append("block") or block_sums(*a))
    monkeypatch.setattr(onepass, "moments", lambda *a: calls.append("moments") or moments(*a))
    kinds = {"residual": ResidualNorms, "channel": ChannelStats}
    cap = probe.capture(
        small_net("resnet8"),
        two_batches,
        probes=[*(kinds[p]() for p in probes), RawSites()],
        grouped=grouped,
    )
    blocks = [layer for layer in cap.layers if "F" in cap.quantities(layer)]
    assert len(blocks) == 3
    for layer in blocks:
        raw = {k: torch.from_numpy(cap.read(layer, k)) for k in "XFSY"}
        want = statistics_reference(raw)
        names = [q for q in cap.quantities(layer) if q in want]
        assert names, layer
        for q in names:
            np.testing.assert_allclose(
                cap.read(layer, q), want[q], rtol=4 * 2**-24, atol=1e-7, err_msg=f"{layer} {q}"
            )
    # per call: one kernel call per block and batch; grouped, per group of equal shapes
    kernel = "moments" if probes == ("channel",) else "block"
    assert set(calls) == {kernel}
    n_calls = len(calls) // (2 if probes == ("channel",) else 1)  # y and F: two moments calls
    assert n_calls == (3 * 2 if not grouped else n_calls) and n_calls <= 3 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((5, 3, 7, 6), False), ((5, 3, 7, 6), True), ((4, 33), False), ((1, 3, 150, 150), False)],
)
def test_dot_matches_numpy_in_float64(shape, channels_last, dtype):
    """[1, 3, 150, 150] is a row of 67500 values, taken in five pieces in parallel."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    got = onepass.dot(a, b)
    fa, fb = (t.double().numpy().reshape(shape[0], -1) for t in (a, b))
    # float64 sums of exact float32 products, rounded once: an error relative to sum |a b|
    # (the sum itself cancels), at most one rounding of the result's dtype
    rtol = F32 if dtype == torch.float32 else F64
    err = np.abs(got.numpy() - (fa * fb).sum(1))
    np.testing.assert_array_less(err, rtol * np.abs(fa * fb).sum(1) + 1e-300)
    assert got.dtype == dtype and got.shape == (shape[0],)


def test_dot_refuses_tensors_in_different_orders_of_memory():
    a = torch.randn(2, 3, 4, 4)
    assert onepass.dot(a, a.contiguous(memory_format=torch.channels_last)) is None
    assert onepass.dot(a, a[..., ::2].contiguous()) is None  # shapes differ
    assert onepass.dot(a.bfloat16(), a.bfloat16()) is None


@pytest.mark.parametrize("grouped", [False, True])
def test_gradient_statistics_match_autograd_in_float64(
    grouped, monkeypatch, small_net, two_batches, gradient_statistics_check
):
    """GradNorms' norms and cos(F, dL/dx), F.dL/dx from one read by the kernel, against the
    gradients of the same model in float64."""
    calls = []
    real = onepass.dot
    monkeypatch.setattr(onepass, "dot", lambda *a: calls.append(1) or real(*a))
    x, y = two_batches[0]
    cap = probe.capture(
        small_net("resnet20"), [(x, y)],
        probes=[probe.GradNorms(), RawSites(), probe.Gradients(dtype="fp32")], grouped=grouped,
    )  # fmt: skip
    assert calls
    gradient_statistics_check(cap, "resnet20", x, y)
