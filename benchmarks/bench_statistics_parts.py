"""Where the eager statistics' time goes inside a probed pass, and what the alternatives cost.

Part 1, inside the pass: ResNet-56 (batch 64) with ResidualNorms + ChannelStats, each variant in
its own session on its own copy of the model, every pass paired with an unprobed twin timed
right before it; printed is the median ratio. "eager" is the default: the one-pass CPU kernels
(probe.probes.onepass); "kernel, results unused" calls them and keeps zeros (what the Python
around the kernel costs), "kernel skipped" does all but run the kernel (zeros: what the kernel's
arithmetic costs in the pass), "kernel reads y alone" gives the kernel y in place of F and S (its
arithmetic, a third of its reads: what reading F and S costs), "kernel skipped, one result a
probe" hands the session each probe's first result alone (what its handling of the others
costs); "torch formulas" turns them off, as without numba, and so do the
variants after it, which take one part of torch's arithmetic out
(stubbed with zeros or a mean, so their numbers are wrong on purpose): what a variant saves
against ``eager`` bounds what any faster formula for that part could save; "two-pass moments"
puts back the channel-moment formula that the CPU used before the one-pass sums, "product y.S" the
product and sum that cos(y, S) took before the polarization identity, "norms of y, F alone" the
passes ResidualNorms took over y and F before it read their norms from ChannelStats' sums (the
variants that replace the channel moments take those passes too, and are compared with it);
"hooks, no arithmetic" reads each block's split and computes nothing: the floor of any eager
statistic in a session.

Part 2, alone: a block's statistics by the one-pass kernel and by torch's formulas, then each
candidate formula for the per-sample, per-channel moments and the per-sample dot products on one
stage's tensors, with the caches flushed before each call (a model's pass leaves them cold), and
its largest relative error against float64; then the
per-sample norm, resprobe's against one norm of each row, on ResNet-56's, resnet50's and a ViT
gradient's shapes (``--norms``: only these).

Part 3: the one-pass and two-pass variances' largest relative error on rows of a given
E[x^2]/var and length, the table behind the one-pass formula's bound; and the same for cos(y, S)
taken by the polarization identity.

Part 4 (``--profile``, alone): the probes' ops by self CPU time per pass (torch.profiler), eager
or ``--fused``; on a GPU their kernels by GPU time (batch 512, bf16, channels-last, grouped).
``--welford``: eager, the channel moments by ``torch.var_mean`` of a float32 copy (one read)
instead of the two-pass formula's float32 deviations: the accelerator's candidate.

Part 5 (``--batch-sizes 1,8,64``, alone): the statistics pass per call (``grouped=False``), with
the session's default grouping (on the CPU: the statistics of blocks with small tensors) and with
every block grouped (``grouped=True``), and the hand-written statistics hooks of compare.py, each
paired with the unprobed twin, at each batch size: where grouping pays on the CPU. ``--grad``
adds GradNorms, forward and backward.

Part 6 (``--kernel-time team,thread,pool``, alone): the time inside the one-pass kernels' calls
per pass and the pass against its unprobed twin, with the kernels on torch's OpenMP team (the
default), all on the calling thread, or split on resprobe's pool from 2^18 values a thread
(:data:`PLACES`); ``--batch`` may exceed 64 here.

Part 7 (``--cold kernel|skipped``, alone): each block's ``ResidualNorms.forward`` (the one-pass
kernel's call and the Python around it) as the pass runs it, against the same call made again
right after it: what coming after the block's convolutions costs that call, Python's code and data
evicted by the model's tensors; ``skipped``: the Python alone.

Part 8 (``--steps``, alone): each step of a block's kernel call (``onepass.block_sums``) as the
pass runs it, per block, each timed around the helper of probe.probes.onepass that takes it (the
tensors' checks, the call's memory, its descriptor, the launch with the OpenMP team's run of the
kernel apart, the result tensors), then the same call hot with its arithmetic skipped: what each
step costs cold against warm.

Part 1 with ``--channels-last`` (alone): the model fed channels-last inputs, the eager statistics
against their channel sums of squares taken by the norm kernel on strided rows, and block outputs
kept in memory against non-finite row sums of a [N, -1] reshape (a copy of a channels-last map):
the ways both were taken before that layout had a path of its own.

Usage: python -m benchmarks.bench_statistics_parts [--rounds 40] [--threads 2] [--batch 64]
       [--variants 'eager;torch formulas'] [--alone | --norms]
       [--profile [--fused | --welford]] [--batch-sizes 1,8,16,32,64 [--grad]]
       [--channels-last] [--kernel-time team,thread,pool [--batch 256]] [--cold kernel|skipped]
       [--steps]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

import probe
from benchmarks.compare import _stat_hooks, build, ratio_ci, unprobed_pass
from probe import nonfinite
from probe.probes import onepass
from probe.probes import statistics as st
from probe.probes.layout import channel_axis

_BLOCK_QUANTITIES = st._block_quantities  # the original, for a variant that calls it


def _owner(name: str) -> tuple[object, str]:
    """(module, attribute) of a stub's name: probe.probes.statistics's, "nonfinite.NAME",
    "onepass.NAME", "onepass._Team.NAME" (a method of the kernels' OpenMP team), or
    "HookSession.NAME" / "ResidualNorms.NAME" (a method of the session, of the probe)."""
    module, _, attr = name.rpartition(".")
    owners = {
        "nonfinite": nonfinite,
        "onepass": onepass,
        "onepass._Team": onepass._Team,
        "HookSession": probe.HookSession,
        "ResidualNorms": probe.ResidualNorms,
    }
    return owners.get(module, st), attr


@contextlib.contextmanager
def _stubbed(stubs: tuple[tuple[str, Callable], ...]):
    """Functions of probe.probes.statistics (or, named "nonfinite.NAME", of probe.nonfinite)
    replaced by ``stubs`` ((name, function) pairs) for the duration, and put back after,
    whatever happens."""
    saved = [(name, getattr(*_owner(name))) for name, _ in stubs]
    for name, fn in stubs:
        setattr(*_owner(name), fn)
    try:
        yield
    finally:
        for name, fn in saved:
            setattr(*_owner(name), fn)


def _without_cosines(x, f, s, y, norms):
    out = _BLOCK_QUANTITIES(x, f[:, :0], s[:, :0], y[:, :0], norms)  # empty dot products
    out["dev_norm"] = st.per_sample_norm(y - s)
    return out


def _two_pass(t, layout="auto"):
    """Every row by the two-pass formula, as eager ChannelStats computed them before the
    one-pass sums (and as it still does on an accelerator)."""
    t = t.movedim(channel_axis(layout, t), 1)
    return st.moments(t, st.accumulation_dtype(t))


def _product_dot(a, b, norms):
    """y.S by its product and sum, as ResidualNorms computed it before the polarization
    identity (and as it still does on an accelerator)."""
    return st.per_sample_dot(a, b)


def _welford(t, dtype):
    """:func:`probe.probes.statistics.moments` by ``torch.var_mean`` (Welford: one read of the
    map) of a copy in ``dtype``, since var_mean returns its input's dtype (a bf16 map's moments
    would be rounded to bf16). The accelerator's candidate: on a CPU var_mean is ~3 x slower
    than the two-pass formula (part 2), and ChannelStats takes the guarded one-read sums there."""
    var, mean = torch.var_mean(t.flatten(2).to(dtype), dim=2, correction=0)
    return mean, var


def _means_only(t, layout="auto"):
    m = t.mean(tuple(range(2, t.ndim)))
    return m, m


def _reductions_only(x, f, s, y, norms):
    """The block's map-sized reductions (||y - S||, F.S) and none of the small arithmetic on
    their [N] results (the polarized y.S and its guard, the cosines)."""
    dev = st.per_sample_norm(y - s)
    fs = st.per_sample_dot(f, s)
    return dict(zip(st._BLOCK_NAMES, (*norms, dev, dev, fs)))


def _sums_only(t, layout="auto"):
    """A map's channel sums and sums of squares, none of the small arithmetic on them."""
    flat = t.flatten(2)
    return flat.sum(2), torch.linalg.vector_norm(flat, dim=2)


def _norm_of_rows(flat, dtype):
    """Channel sums of squares by the norm kernel whatever the layout, as before channels-last
    maps took a product and a sum (its strided rows are ~10 x slower)."""
    return torch.linalg.vector_norm(flat, dim=2, dtype=dtype).square_()


def _reshaped_row_sums(t, pick_rows):
    """Non-finite row sums of a [N, -1] reshape, as before they reduced a tensor where it lies
    (a channels-last map's reshape is a copy of it)."""
    if t.ndim == 1:
        return t
    rows = t if t.ndim == 2 else t.reshape(t.shape[0], -1)
    return rows.sum(1, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _unshared(asker, call):
    """No work shared by the pair: ResidualNorms takes ||y|| and ||F|| in passes of their own,
    as before it read them from ChannelStats' sums, and ChannelStats calls channel_moments."""
    return None


@dataclass
class _HooksOnly(probe.Probe):
    """Reads each block's split as the statistics do and computes nothing from it (one zero per
    sample): what the session's hooks and bookkeeping cost before any arithmetic."""

    name: ClassVar[str] = "hooks_only"
    forward_grad: ClassVar[bool] = False
    reduces: ClassVar[bool] = True

    def forward(self, call: probe.Call) -> dict[str, torch.Tensor]:
        return {"zero": call.output.new_zeros(call.batch_size)}


def _no_kernels():
    """The one-pass kernels off: torch's formulas, as without numba."""
    return None


def _kernel_only(f, s, y, axis):
    """The one-pass kernel's call alone, its results thrown away for zeros: what the call's
    Python around the kernel (views, outputs, the dicts) costs beside the kernel's arithmetic."""
    onepass.block_sums(f, s, y, axis)
    n, c = y.shape[0], y.shape[axis]
    zeros = y.new_zeros(n)
    return dict.fromkeys(st._ONEPASS_NAMES, zeros), dict.fromkeys(
        st._CHANNEL_NAMES, y.new_zeros(n, c)
    )


def _y_thrice(f, s, y, axis):
    """The one-pass kernel given y in place of F and S: its arithmetic as it is, a third of its
    reads (y, just written, is the hottest of the three; F and S are read again only here). The
    difference from "eager" is what reading F and S costs a pass beyond the sums (numbers
    wrong on purpose)."""
    return _BLOCK_SUMS(y, y, y, axis)


_BLOCK_SUMS = onepass.block_sums  # the original, for the variant that calls it
_MERGE = probe.HookSession._merge  # the original, for the variant that calls it


def _first_result_merged(self, results, new, *args, **kwargs):
    """The session's merge given a probe's first result alone: what the session's handling of
    the others costs (their checks, the compaction, the non-finite check of the blocks)."""
    return _MERGE(self, results, dict(list(new.items())[:1]), *args, **kwargs)


def _kernel_skipped(kernel, dtype, words, data, outputs, items, values) -> bool:
    """The kernel not run, its outputs zeros: what the Python around it costs in the pass (the
    outputs are the arrays the wrapper made; the inputs, views of the model's tensors, are not
    among them)."""
    for a in outputs:
        a.fill(0)
    return True


BOTH = (probe.ResidualNorms, probe.ChannelStats)
_TORCH = ("onepass._kernels", _no_kernels)
_OWN = ("_shared_channels", _unshared)  # with a stub of channel_moments: else it is not called
# name -> (probes, the functions of probe.probes.statistics replaced for the variant). The
# variants after "torch formulas" take parts out of torch's formulas: the kernels are off there.
VARIANTS: dict[str, tuple[tuple[type, ...], tuple[tuple[str, Callable], ...]]] = {
    "eager": (BOTH, ()),
    "hooks, no arithmetic": ((_HooksOnly,), ()),
    "kernel, results unused": (BOTH, (("_onepass_block", _kernel_only),)),
    "kernel skipped": (BOTH, (("onepass._launch", _kernel_skipped),)),
    "kernel reads y alone": (BOTH, (("onepass.block_sums", _y_thrice),)),
    "kernel skipped, one result a probe": (
        BOTH,
        (("onepass._launch", _kernel_skipped), ("HookSession._merge", _first_result_merged)),
    ),
    "ResidualNorms alone": ((probe.ResidualNorms,), ()),
    "ChannelStats alone": ((probe.ChannelStats,), ()),
    "torch formulas": (BOTH, (_TORCH,)),
    "norms of y, F alone": (BOTH, (_TORCH, _OWN)),
    "two-pass moments": (BOTH, (_TORCH, _OWN, ("channel_moments", _two_pass))),
    "product y.S": (BOTH, (_TORCH, ("polarized_dot", _product_dot))),
    "no cosines": (BOTH, (_TORCH, ("_block_quantities", _without_cosines))),
    "channel means only": (BOTH, (_TORCH, _OWN, ("channel_moments", _means_only))),
    # both at once: what the ~40 small ops a block spends on [N] and [N, C] results cost
    "reductions only": (
        BOTH,
        (_TORCH, _OWN, ("_block_quantities", _reductions_only), ("channel_moments", _sums_only)),
    ),
}


# --channels-last: the eager statistics and the block outputs on a model fed channels-last
# inputs, each beside the way it was taken before that layout got a path of its own
_OUTPUTS = (functools.partial(probe.Activations, dtype="fp32"),)  # kept as views, no cast
CHANNELS_LAST_VARIANTS: dict[str, tuple[tuple[Callable, ...], tuple[tuple[str, Callable], ...]]] = {
    "eager": (BOTH, ()),
    "torch formulas": (BOTH, (_TORCH,)),
    "norms of strided rows": (BOTH, (_TORCH, ("_sum_squares", _norm_of_rows))),
    "block outputs": (_OUTPUTS, ()),
    "block outputs, reshaped row sums": (_OUTPUTS, (("nonfinite._row_sums", _reshaped_row_sums),)),
}


def inside_the_pass(
    rounds: int, batch: int = 64, channels_last: bool = False, only: list[str] | None = None
) -> None:
    import probe.runtime

    # as the CLI runs: with glibc's default, an unprobed ResNet-56 pass alone in a process
    # page-faulted ~50,000 pages and ran ~2 x slower, by how the heap happened to lie
    probe.runtime.tune_allocator()
    _, blocks, x, y = build("zoo")
    x, y = x[:batch], y[:batch]
    variants = CHANNELS_LAST_VARIANTS if channels_last else VARIANTS
    if only:
        unknown = sorted(set(only) - set(variants))
        if unknown:
            raise SystemExit(f"no variant {unknown}; the variants: {', '.join(variants)}")
        variants = {name: variants[name] for name in only}
    if channels_last:  # the model's convolutions keep the layout of their input
        x = x.contiguous(memory_format=torch.channels_last)
    twin = build("zoo")[0]
    sessions = {
        name: probe.HookSession(build("zoo")[0], blocks, [kind() for kind in probes])
        for name, (probes, _) in variants.items()
    }
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for s in sessions.values():
            s.__enter__()
        for r in range(rounds + 2):
            for name, (_, stubs) in variants.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    twin(x)
                base = time.perf_counter() - t0
                with _stubbed(stubs):
                    t0 = time.perf_counter()
                    sessions[name].run_batch(x, y)
                    probed = time.perf_counter() - t0
                if r >= 2:  # two rounds of warm-up
                    ratios[name].append(probed / base)
                    times[name].append(probed)
    finally:
        for s in sessions.values():
            s.close()
    layout = ", channels-last input" if channels_last else ""
    print(
        f"## inside the pass (ResNet-56, batch {len(x)}{layout}; ratio to the unprobed twin, "
        "median)"
    )
    for name, rs in ratios.items():
        print(f"{name:22s} {statistics.median(rs):.3f}")
    own = "norms of y, F alone"  # the variants that stub channel_moments take these norms too
    pairs = (
        (
            ("eager", "torch formulas"),
            ("torch formulas", "norms of strided rows"),
            ("block outputs", "block outputs, reshaped row sums"),
        )
        if channels_last
        else (
            ("eager", "torch formulas"),
            ("eager", "kernel, results unused"),
            ("eager", "kernel skipped"),
            ("eager", "kernel reads y alone"),
            ("kernel reads y alone", "kernel skipped"),
            ("kernel skipped", "kernel skipped, one result a probe"),
            ("kernel skipped, one result a probe", "hooks, no arithmetic"),
            ("kernel skipped", "hooks, no arithmetic"),
            ("torch formulas", own),
            (own, "two-pass moments"),
            ("torch formulas", "product y.S"),
            (own, "reductions only"),
        )
    )
    for one, other in pairs:
        if one not in times or other not in times:
            continue
        med, lo, hi = ratio_ci(times[one], times[other])
        print(f"{one} / {other}, round by round: {med:.3f} ({lo:.3f}-{hi:.3f}, 95%)")


def _cold(fn: Callable[[], object], flush: torch.Tensor, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        flush.add_(1)  # 64 MB through the caches, as a block's convolutions do
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got.double() - ref) / ref.abs().clamp_min(1e-300)).abs().max())


def _torch_block(f: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> object:
    """A block's statistics by torch's formulas, as the eager pair takes them without the
    kernels: each map's channel sums, then ||y - S||, y.S from the norms and F.S."""
    mean_y, var_y, square_y = st._sums(y, torch.float32)
    mean_f, var_f, square_f = st._sums(f, torch.float32)
    ny, nf = square_y.sum(1).sqrt_(), square_f.sum(1).sqrt_()
    norms = (st.per_sample_norm(s), nf, st.per_sample_norm(s), ny)
    return st._block_quantities(s, f, s, y, norms), (mean_y, var_y, mean_f, var_f)


def _formulas(shape: tuple[int, int, int, int], flush: torch.Tensor) -> None:
    """Print each moment and dot-product formula's time and error on tensors of ``shape``."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=g).relu_()
    other = torch.randn(*shape, generator=g)
    n, c, p = shape[0], shape[1], shape[2] * shape[3]
    rows = t.view(n * c, 1, p)
    ref_var = t.double().flatten(2).var(2, unbiased=False).flatten()
    ref_dot = (t.double() * other.double()).flatten(1).sum(1)
    moments = {
        "one-pass kernel (resprobe)": lambda: onepass.moments(t, 1)[1],
        "one-pass sums, guarded (torch)": lambda: st.sum_moments(t, torch.float32)[1],
        "two-pass": lambda: st.moments(t, torch.float32)[1],
        "var_mean (Welford)": lambda: torch.var_mean(t.flatten(2), 2, correction=0)[0],
        "batch_norm_update_stats": lambda: torch.batch_norm_update_stats(
            t.view(1, n * c, p), None, None, 0.1
        )[1],
        "cdist to the mean": lambda: (
            torch.cdist(
                rows,
                rows.mean(2, keepdim=True).expand(-1, 1, p),
                compute_mode="donot_use_mm_for_euclid_dist",
            ).square()
            / p
        ),
        "float64 sums": lambda: t.flatten(2).sum(2, dtype=torch.float64),
    }
    dots = {
        "one-pass kernel (resprobe)": lambda: onepass.dot(t, other),
        "product, sum (torch)": lambda: st.per_sample_dot(t, other),
        "bmm": lambda: torch.bmm(t.view(n, 1, -1), other.view(n, -1, 1)).flatten(),
        "vecdot": lambda: torch.linalg.vecdot(t.flatten(1), other.flatten(1)),
    }
    # a whole block's statistics: F, S and y as a post-activation block gives them
    s, f = t, other
    y = (f + s).relu()
    blocks = {
        "one-pass kernel (resprobe)": lambda: onepass.block_sums(f, s, y, 1),
        "torch formulas": lambda: _torch_block(f, s, y),
    }
    print(f"{tuple(shape)}")
    for name, fn in blocks.items():
        print(f"  block    {name:26s} {_cold(fn, flush):7.3f}")
    for name, fn in moments.items():
        err = "" if name == "float64 sums" else f"  err {_error(fn().flatten(), ref_var):.1e}"
        print(f"  moments  {name:26s} {_cold(fn, flush):7.3f}{err}")
    for name, fn in dots.items():
        print(f"  dot      {name:26s} {_cold(fn, flush):7.3f}  err {_error(fn(), ref_dot):.1e}")


def _norm_inputs() -> dict[str, torch.Tensor]:
    """Tensors to take per-sample norms of: ResNet-56's and resnet50's maps, and a ViT-S
    gradient's shape whose mass sits in one token (the class token's, which the head reads)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 197, 384, generator=g) * 1e-3
    tokens[:, 0] *= 300  # ~99.99 % of each row's squares, as in timm's ViT-S gradients
    maps = [(64, 16, 32, 32), (64, 64, 8, 8), (8, 256, 56, 56), (8, 2048, 7, 7)]
    return {str(s): torch.randn(*s, generator=g).relu_() for s in maps} | {
        "(8, 197, 384), one token's mass": tokens
    }


def _norm_formulas(flush: torch.Tensor) -> None:
    """Per-sample norms: resprobe's (the norms of the pieces after axis 1, then of those, where
    the pieces hold >= 128 values) against one norm of each row, as torch takes it."""
    for name, t in _norm_inputs().items():
        ref = t.double().flatten(1).norm(dim=1)
        rows = tuple(range(1, t.ndim))
        print(name)
        for label, fn in {
            "resprobe (pieces on long rows)": lambda t=t: st.per_sample_norm(t),
            "one norm of each row": lambda t=t, rows=rows: torch.linalg.vector_norm(t, dim=rows),
        }.items():
            print(f"  norm     {label:28s} {_cold(fn, flush):7.3f}  err {_error(fn(), ref):.1e}")


def alone() -> None:
    flush = torch.empty(16 * 1024 * 1024)
    print("\n## alone, caches flushed (ms; largest relative error against float64)")
    for shape in [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]:
        _formulas(shape, flush)
    _norm_formulas(flush)


def _error_table(title: str, params, label: str, other: str, errors: Callable) -> None:
    """Print the largest relative errors against float64 of a formula at each of ``params``
    (``errors(rows, positions, param, generator)`` -> (the formula's, the other formula's)),
    rows of 64 to 50176 positions; the other formula's column is the largest over ``params``."""
    print(f"\n## {title}")
    print(f"{'positions':>9s}  " + "  ".join(f"{label}={p:<4g}" for p in params) + f"  {other}")
    g = torch.Generator().manual_seed(0)
    for n in (64, 1024, 12544, 50176):
        rows = 2000 if n <= 1024 else 200
        pairs = [errors(rows, n, p, g) for p in params]
        worst = max(e for _, e in pairs)
        print(f"{n:9d}  " + "  ".join(f"{e:16.1e}" for e, _ in pairs) + f"  {worst:8.1e}")


def errors_by_ratio() -> None:
    """Largest relative error of the one-pass formula (unguarded, so rows above the bound show
    what the guard saves them from) and of the two-pass one against float64, on float32 rows of
    E[x^2]/var = R."""

    def errors(rows, n, ratio, g):
        z = torch.randn(rows, 1, n, generator=g, dtype=torch.float64)
        z = (z - z.mean(2, keepdim=True)) / z.std(2, keepdim=True, unbiased=False)
        x = (z + (ratio - 1) ** 0.5).float()
        ref = x.double().var(2, unbiased=False)
        mean = x.mean(2)
        sq = torch.linalg.vector_norm(x, dim=2).square()
        one = _error((sq - n * mean * mean) / n, ref)  # the kept rows' formula
        return one, _error(st.moments(x, torch.float32)[1], ref)

    ratios = (1.5, 4.0, st.ONE_PASS_MAX_RATIO, 64.0)
    title = "largest relative error against float64, rows of E[x^2]/var = R"
    _error_table(title, ratios, "one-pass R", "two-pass", errors)


def errors_by_cosine() -> None:
    """Largest relative error of y.S by the polarization identity (unguarded, so cosines past
    the bound show what the guard saves them from) and by the product, against float64, on
    float32 pairs of equal norms and a given cosine (the bound: 2/17 ~ 0.118)."""

    def errors(rows, n, c, g):
        a = torch.randn(rows, n, generator=g, dtype=torch.float64)
        a = a / a.norm(dim=1, keepdim=True)
        u = torch.randn(rows, n, generator=g, dtype=torch.float64)
        u = u - (u * a).sum(1, keepdim=True) * a
        b = (c * a + (1 - c * c) ** 0.5 * u / u.norm(dim=1, keepdim=True)).float()
        a = a.float()
        ref = (a.double() * b.double()).sum(1)
        na, nb, nd = (torch.linalg.vector_norm(t, dim=1) for t in (a, b, a - b))
        one = _error((na.square() + nb.square() - nd.square()) / 2, ref)
        return one, _error(st.per_sample_dot(a, b), ref)

    cosines = (1.0, 0.9, 0.5, 0.2, 0.12, 0.05)
    title = "largest relative error of y.S against float64, pairs of cosine c, equal norms"
    _error_table(title, cosines, "identity c", "product", errors)


def profile_ops(passes: int = 6, fused: bool = False, welford: bool = False) -> None:
    """Self time per pass of each op, the probed pass's minus the unprobed twin's
    (``torch.profiler``), the two profiled pass by pass in turn so that the host's drift over
    the run falls on both alike: which of the probes' ops take the time. On a GPU: each
    kernel's GPU time, ResNet-56 at batch 512 under bf16 autocast, channels-last, statistics
    grouped (the benchmarks' setting; a recorded pass runs these kernels too). ``welford``:
    the eager channel moments by ``torch.var_mean`` instead of the two-pass formula."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI runs
    gpu = torch.cuda.is_available()
    net, blocks, x, y = build("zoo")
    twin = build("zoo")[0]
    activities, autocast = [ProfilerActivity.CPU], contextlib.nullcontext
    if gpu:
        net, twin = (m.to("cuda", memory_format=torch.channels_last) for m in (net, twin))
        x = torch.randn(512, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (512,), device="cuda")
        activities.append(ProfilerActivity.CUDA)
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    probes = [probe.ResidualNorms(fused=fused), probe.ChannelStats(fused=fused)]
    ms: dict[str, Counter] = {"probed": Counter(), "twin": Counter()}
    calls: dict[str, Counter] = {"probed": Counter(), "twin": Counter()}

    def run_twin():
        with torch.no_grad():
            twin(x)

    def self_ms(e) -> float:  # the kernel's GPU time on a GPU, else the op's CPU time
        if not gpu:
            return e.self_cpu_time_total / 1e3
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3

    stubs = (("moments", _welford),) if welford else ()
    with _stubbed(stubs), probe.HookSession(net, blocks, probes) as s, autocast():
        for _ in range(3):
            s.run_batch(x, y)
            run_twin()
        for _ in range(passes):
            for name, fn in (("probed", lambda: s.run_batch(x, y)), ("twin", run_twin)):
                with profile(activities=activities) as prof:
                    fn()
                    if gpu:
                        torch.cuda.synchronize()
                for e in prof.key_averages():
                    ms[name][e.key] += self_ms(e) / passes
                    calls[name][e.key] += e.count
    where = "GPU" if gpu else "CPU"
    kind = "fused" if fused else "eager, var_mean moments" if welford else "eager"
    print(f"\n## ops, self {where} ms per pass ({kind}; probed - unprobed)")
    print(f"all ops: {sum(ms['probed'].values()):.1f} against {sum(ms['twin'].values()):.1f}")
    extra = sorted(
        (
            (t - ms["twin"][k], k, (calls["probed"][k] - calls["twin"][k]) // passes)
            for k, t in ms["probed"].items()
        ),
        reverse=True,
    )
    for t, key, n in extra[:15]:
        print(f"  {t:7.2f}  {n:5d} calls  {key[:100]}")


def _after_twin(twin: Callable[[], object], run: Callable[[], object]) -> tuple[float, float]:
    """(seconds of ``twin``, seconds of ``run``), the unprobed twin timed right before the run:
    their ratio, pair by pair, is immune to the drift of the machine between pairs."""
    t0 = time.perf_counter()
    twin()
    base = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    return base, time.perf_counter() - t0


def by_batch_size(sizes: list[int], rounds: int, grad: bool = False) -> None:
    """Part 5: per call, the default grouping and every block grouped, by batch size; with
    ``grad`` also GradNorms, forward and backward (the twin takes the gradient w.r.t. the input,
    as compare.py's unprobed pass of that row)."""
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI runs
    _, blocks, x, y = build("zoo")
    twin, hooked = build("zoo")[0], build("zoo")[0]
    store: list = []
    handles = _stat_hooks(hooked, blocks, store, "zoo", grads=grad)
    kinds = (*BOTH, probe.GradNorms) if grad else BOTH
    settings = {"per call": False, "default": None, "all grouped": True}
    sessions = {
        name: probe.HookSession(build("zoo")[0], blocks, [kind() for kind in kinds], grouped=g)
        for name, g in settings.items()
    }

    def hooks(xb, yb):
        store.clear()
        unprobed_pass(hooked, xb, yb, grad)

    runs = {name: s.run_batch for name, s in sessions.items()} | {"hand-written hooks": hooks}
    what = "ResidualNorms + ChannelStats" + (" + GradNorms, forward + backward" if grad else "")
    print(f"\n## by batch size (ResNet-56, {what}; ratio to the unprobed twin)")
    print(f"{'batch':>5s} {'twin ms':>8s} " + " ".join(f"{name:>18s}" for name in runs))
    try:
        for s in sessions.values():
            s.__enter__()
        for n in sizes:
            xb, yb = x[:n], y[:n]
            ratios: dict[str, list[float]] = {name: [] for name in runs}
            base_ms = []
            for r in range(rounds + 2):
                for name, fn in runs.items():
                    base, probed = _after_twin(
                        functools.partial(unprobed_pass, twin, xb, yb, grad),
                        functools.partial(fn, xb, yb),
                    )
                    if r >= 2:  # two rounds of warm-up
                        ratios[name].append(probed / base)
                        base_ms.append(base * 1e3)
            cells = " ".join(f"{statistics.median(v):18.3f}" for v in ratios.values())
            print(f"{n:5d} {statistics.median(base_ms):8.1f} {cells}")
    finally:
        for s in sessions.values():
            s.close()
        for h in handles:
            h.remove()


# where part 6 runs the kernels: (onepass.TEAM_VALUES, onepass.MIN_VALUES) of each setting; a
# threshold past every call's size turns that way off
_NEVER = 1 << 40
PLACES = {
    "team": (None, None),  # the defaults: torch's OpenMP team from TEAM_VALUES on
    "thread": (_NEVER, _NEVER),  # every call on the calling thread
    "pool": (_NEVER, 1 << 18),  # no team; spans on resprobe's pool from 2^18 values a thread
}


def kernel_time(rounds: int, batch: int, places: list[str]) -> None:
    """Part 6: the time inside the one-pass kernels' calls (``onepass.block_sums``) per pass of a
    session with ResidualNorms + ChannelStats, and the pass against an unprobed twin timed right
    before it, with the kernels run in each of ``places`` (keys of :data:`PLACES`), rounds
    interleaved."""
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI runs
    twin, blocks, _, _ = build("zoo")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    spent = [0.0]
    block_sums = onepass.block_sums

    def timed(*a):
        t0 = time.perf_counter()
        try:
            return block_sums(*a)
        finally:
            spent[0] += time.perf_counter() - t0

    default = onepass.TEAM_VALUES, onepass.MIN_VALUES
    session = probe.HookSession(build("zoo")[0], blocks, [kind() for kind in BOTH])
    inside: dict[str, list[float]] = {p: [] for p in places}
    above: dict[str, list[float]] = {p: [] for p in places}
    print(f"\n## the kernels' calls per pass (ResNet-56, batch {batch}, {torch.get_num_threads()} "
          f"threads; median ms)")  # fmt: skip
    print(f"{'kernels on':>12s} {'in the calls':>13s} {'pass - twin':>12s}")
    try:
        session.__enter__()
        onepass.block_sums = timed
        for r in range(rounds + 2):
            for place in places:
                team, split = PLACES[place]
                onepass.TEAM_VALUES = default[0] if team is None else team
                onepass.MIN_VALUES = default[1] if split is None else split
                spent[0] = 0.0
                base, probed = _after_twin(
                    functools.partial(unprobed_pass, twin, x, y, False),
                    functools.partial(session.run_batch, x, y),
                )
                if r >= 2:  # two rounds of warm-up
                    above[place].append((probed - base) * 1e3)
                    inside[place].append(spent[0] * 1e3)
    finally:
        onepass.block_sums = block_sums
        onepass.TEAM_VALUES, onepass.MIN_VALUES = default
        session.close()
    for place in places:
        print(
            f"{place:>12s} {statistics.median(inside[place]):13.2f} "
            f"{statistics.median(above[place]):12.2f}"
        )


def cold_calls(rounds: int, batch: int, skip_kernel: bool) -> None:
    """Part 7: each block's ``ResidualNorms.forward`` (the pair's shared work: the one-pass
    kernel's call and the Python around it) timed in the pass, then called again on the same
    block right away, its memo cleared so that it computes anew: what running after the
    block's convolutions, with Python's code and data out of the caches, costs that call.
    ``skip_kernel``: the kernel's arithmetic skipped (the Python alone)."""
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI runs
    _, blocks, x, y = build("zoo")
    x, y = x[:batch], y[:batch]
    forward = probe.ResidualNorms.forward
    first: list[float] = []
    again: list[float] = []
    timing = [False]

    def timed(self, call):
        if not timing[0]:
            return forward(self, call)
        t0 = time.perf_counter()
        out = forward(self, call)
        t1 = time.perf_counter()
        kept = dict(call.memo)
        call.memo.clear()
        t2 = time.perf_counter()
        forward(self, call)
        t3 = time.perf_counter()
        call.memo.clear()
        call.memo.update(kept)  # ChannelStats reads the first call's work, as in the pass
        first.append(t1 - t0)
        again.append(t3 - t2)
        return out

    session = probe.HookSession(build("zoo")[0], blocks, [kind() for kind in BOTH])
    skipped = (("onepass._launch", _kernel_skipped),) if skip_kernel else ()
    with _stubbed((("ResidualNorms.forward", timed), *skipped)), session:
        for r in range(rounds + 2):
            timing[0] = r >= 2  # two rounds of warm-up
            session.run_batch(x, y)
    what = "the kernel's arithmetic skipped" if skip_kernel else "with the kernel"
    print(f"\n## ResidualNorms.forward per block (ResNet-56, batch {len(x)}, {what}; median us)")
    print(f"in the pass {statistics.median(first) * 1e6:8.1f}")
    print(f"right after {statistics.median(again) * 1e6:8.1f}")


# part 8: the helpers onepass.block_sums takes its steps through, in their order, and what each does
STEPS = {
    "_layout": "the tensors' checks and layout",
    "_buffers": "the call's memory (descriptor, outputs)",
    "_describe": "filling in the descriptor",
    "_launch": "the launch, the team's run apart",
    "team": "the OpenMP team's run of the kernel",
    "_tensors": "the result tensors",
}


def kernel_steps(rounds: int, batch: int) -> None:
    """Part 8: each step of a block's one-pass kernel call in the pass (see :data:`STEPS`), per
    block, the mean of a pass's blocks and the median over passes, in microseconds; then the
    whole call on the last block's tensors, hot, its arithmetic skipped (``timeit``)."""
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI runs
    _, blocks, x, y = build("zoo")
    x, y = x[:batch], y[:batch]
    spent = dict.fromkeys([*STEPS, "block_sums"], 0.0)
    # the pass's calls and the last one's arguments: only the last is kept, so that no block's
    # tensors outlive the pass's own use of them
    calls, last = [0], [None]

    def timed(name: str, fn: Callable) -> Callable:
        def step(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[name] += time.perf_counter() - t0

        return step

    def launch(*args):  # the team's run is inside the launch: counted apart
        before = spent["team"]
        t0 = time.perf_counter()
        try:
            return original_launch(*args)
        finally:
            spent["_launch"] += time.perf_counter() - t0 - (spent["team"] - before)

    original_launch = onepass._launch
    whole = timed("block_sums", onepass.block_sums)

    def block_sums(*args):
        calls[0] += 1
        last[0] = args
        return whole(*args)

    per_pass: dict[str, list[float]] = {name: [] for name in [*spent, "rest"]}
    session = probe.HookSession(build("zoo")[0], blocks, [kind() for kind in BOTH])
    plain = ("_layout", "_buffers", "_describe", "_tensors")  # the steps timed as they are
    stubs = (
        *((f"onepass.{name}", timed(name, getattr(onepass, name))) for name in plain),
        ("onepass._launch", launch),
        ("onepass._Team.run", timed("team", onepass._Team.run)),
        ("onepass.block_sums", block_sums),
    )
    with _stubbed(stubs), session:
        for r in range(rounds + 2):
            spent.update(dict.fromkeys(spent, 0.0))
            calls[0] = 0
            session.run_batch(x, y)
            if r >= 2 and calls[0]:  # two rounds of warm-up
                for name, seconds in spent.items():
                    per_pass[name].append(seconds / calls[0] * 1e6)
                steps = sum(spent[name] for name in STEPS)
                per_pass["rest"].append((spent["block_sums"] - steps) / calls[0] * 1e6)
    if last[0] is None:
        print("\nthe one-pass kernels do not serve this process: nothing to time")
        return
    print(f"\n## onepass.block_sums per block in the pass (ResNet-56, batch {len(x)}; median us)")
    for name, label in STEPS.items():
        print(f"{label:42s} {statistics.median(per_pass[name]):8.1f}")
    print(f"{'the rest (block_sums own lines)':42s} {statistics.median(per_pass['rest']):8.1f}")
    print(f"{'the whole call':42s} {statistics.median(per_pass['block_sums']):8.1f}")
    f, s, yy, axis = last[0]
    with _stubbed((("onepass._launch", _kernel_skipped),)):
        hot = min(timeit.repeat(lambda: onepass.block_sums(f, s, yy, axis), number=200, repeat=5))
    print(f"{'hot, the arithmetic skipped (last block)':42s} {hot / 200 * 1e6:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="only the op-by-op profile")
    ap.add_argument("--fused", action="store_true", help="profile the compiled statistics")
    ap.add_argument(
        "--welford", action="store_true", help="profile eager moments by torch.var_mean"
    )
    ap.add_argument("--batch", type=int, default=64, help="part 1's batch size (at most 64)")
    ap.add_argument("--batch-sizes", default="", help="only part 5, at these batch sizes")
    ap.add_argument("--norms", action="store_true", help="only part 2's per-sample norms")
    ap.add_argument("--alone", action="store_true", help="only part 2")
    ap.add_argument("--grad", action="store_true", help="part 5 with GradNorms, fwd + bwd")
    ap.add_argument(
        "--variants",
        default="",
        help="only part 1, these of its variants (names separated by ';', e.g. 'eager;torch "
        "formulas')",
    )
    ap.add_argument(
        "--kernel-time",
        default="",
        metavar="PLACE,...",
        help="only part 6, with the kernels in these places: team, thread, pool",
    )
    ap.add_argument(
        "--cold",
        choices=("kernel", "skipped"),
        help="only part 7: each block's statistics call in the pass against the same call "
        "right after it, with the kernel or with its arithmetic skipped",
    )
    ap.add_argument(
        "--steps",
        action="store_true",
        help="only part 8: each step of a block's kernel call in the pass, and the call hot",
    )
    ap.add_argument(
        "--channels-last",
        action="store_true",
        help="only part 1, on channels-last inputs, against the ways taken before that layout "
        "had a path of its own",
    )
    args = ap.parse_args()
    sizes = [int(n) for n in args.batch_sizes.split(",")] if args.batch_sizes else []
    if args.rounds < 2:  # a round-by-round interval needs two rounds
        ap.error(f"--rounds must be at least 2; got {args.rounds}.")
    if args.kernel_time:  # a batch of its own making: any size
        places = args.kernel_time.split(",")
        unknown = sorted(set(places) - set(PLACES))
        if unknown:
            ap.error(f"--kernel-time: unknown {unknown}; choose from {sorted(PLACES)}.")
        if args.batch < 1:
            ap.error(f"--batch must be positive; got {args.batch}.")
        torch.set_num_threads(args.threads)
        kernel_time(args.rounds, args.batch, places)
        return
    if not all(1 <= n <= 64 for n in [args.batch, *sizes]):  # the rows of compare.py's batch
        ap.error(f"batch sizes must lie in 1..64; got {args.batch} and {sizes or 'none'}.")
    torch.set_num_threads(args.threads)
    if args.cold:
        cold_calls(args.rounds, args.batch, skip_kernel=args.cold == "skipped")
        return
    if args.steps:
        kernel_steps(args.rounds, args.batch)
        return
    if args.profile:
        profile_ops(fused=args.fused, welford=args.welford)
        return
    if args.norms:
        _norm_formulas(torch.empty(16 * 1024 * 1024))
        return
    if args.alone:
        alone()
        return
    if args.batch_sizes:
        by_batch_size(sizes, args.rounds, args.grad)
        return
    only = [v.strip() for v in args.variants.split(";") if v.strip()]
    if args.channels_last or only:
        inside_the_pass(args.rounds, args.batch, channels_last=args.channels_last, only=only)
        return
    inside_the_pass(args.rounds, args.batch)
    alone()
    errors_by_ratio()
    errors_by_cosine()


if __name__ == "__main__":
    main()
