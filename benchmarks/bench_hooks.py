"""Hook overhead and HDF5 dump throughput on ResNet-56, side by side in one run.

Prints, for a forward+backward pass with statistics probes on all 27 blocks, the ratio to an
unprobed pass and to the naive hooks of the reference measurement; and for a raw fp16 dump of every
block output, the throughput against the raw sequential write speed of the same disk and against
naive ``.cpu()`` hooks (their copies dropped after each pass, and all kept in host memory: like for
like with resprobe's in-memory capture of the same outputs); and the peak host memory of dumps of
N and 4N samples (bounded by the queue).

Usage: python -m benchmarks.bench_hooks [--batch 512] [--samples 8192] [--out-dir /tmp]
GPU targets (H100, batch 512, bf16): stats <= 1.10x unprobed (naive 1.30x), measured with eager and
with fused (compiled) statistics; dump >= 80% of raw disk
speed and >= 10x naive .cpu() hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import probe
import probe.runtime
from benchmarks.common import device, graphed, header, median_ms


def _model(dev):
    m = probe.zoo.create("resnet56").to(dev).eval()
    return m.to(memory_format=torch.channels_last) if dev.type == "cuda" else m


def _autocast(dev):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


def overhead(batch: int, repeats: int) -> dict:
    dev = device()
    model = _model(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    blocks = model.blocks()

    def unprobed_backward():
        with _autocast(dev):
            loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        loss.backward()

    def unprobed_input_grad():
        inp = x.detach().requires_grad_(True)  # x itself stays without a gradient
        with _autocast(dev):
            loss = F.cross_entropy(model(inp).float(), y, reduction="sum")
        torch.autograd.grad(loss, [inp])

    stats = []

    def naive_hook(mod, args, out):  # the reference's naive statistics hook, fp32 on the device
        xi, yo = args[0].float(), out.float()
        f = mod.branch(args[0]).float()
        stats.append(
            (
                (xi**2).sum((1, 2, 3)),
                (f**2).sum((1, 2, 3)),
                (yo**2).sum((1, 2, 3)),
                yo.mean((0, 2, 3)) ** 2,
                yo.var((0, 2, 3)),
            )
        )

    def with_naive():
        hs = [b.register_forward_hook(naive_hook) for b in blocks]
        try:
            unprobed_backward()
        finally:
            for h in hs:
                h.remove()
            stats.clear()

    def with_probes(*probes, grouped=None, cuda_graph=False):
        # The session is opened for its own measurement only: its hooks, left on the model,
        # would run inside the unprobed and naive passes too and flatter every ratio.
        with probe.HookSession(
            model, "auto", list(probes), grouped=grouped, cuda_graph=cuda_graph
        ) as session:

            def run():
                with _autocast(dev):
                    session.run_batch(x, y)

            # the first batch finds the sites and fused probes compile; with cuda_graph the
            # second is recorded and checked, and the timed ones are replays
            for _ in range(3):
                run()
            if cuda_graph and session.graph_off is not None:
                raise RuntimeError(f"the recording was not used: {session.graph_off}")
            return median_ms(run, repeats=repeats)

    def stat_probes():
        return [probe.ResidualNorms(), probe.ChannelStats(), probe.GradNorms()]

    out = {
        "unprobed (loss.backward)": median_ms(unprobed_backward, repeats=repeats),
        "unprobed (grad wrt input)": median_ms(unprobed_input_grad, repeats=repeats),
        "naive stats hooks": median_ms(with_naive, repeats=repeats),
        "resprobe stats probes": with_probes(
            probe.ResidualNorms(), probe.ChannelStats(), probe.GradNorms()
        ),
        "resprobe stats, fused": with_probes(
            probe.ResidualNorms(fused=True), probe.ChannelStats(fused=True), probe.GradNorms()
        ),
        # the statistics the other way than the device's default: each at its call on an
        # accelerator (where they are grouped by default), grouped across blocks on the CPU
        f"resprobe stats, {'per call' if dev.type != 'cpu' else 'grouped'}": with_probes(
            probe.ResidualNorms(),
            probe.ChannelStats(),
            probe.GradNorms(),
            grouped=dev.type == "cpu",
        ),
    }
    if dev.type == "cuda":
        # the probed pass recorded once and replayed (probe.replay), grouped and per call, and
        # the unprobed pass recorded the same way: the device's own time, with no host in it
        out["resprobe stats, cuda graph"] = with_probes(*stat_probes(), cuda_graph=True)
        out["resprobe stats, cuda graph, per call"] = with_probes(
            *stat_probes(), grouped=False, cuda_graph=True
        )
        inp = x.detach().requires_grad_(True)

        def input_grad_step():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = F.cross_entropy(model(inp).float(), y, reduction="sum")
            torch.autograd.grad(loss, [inp])

        out["unprobed (grad wrt input), graph"] = median_ms(
            graphed(input_grad_step), repeats=repeats
        )
    # the same pass again at the end: its distance from the first is the noise floor
    out["unprobed, again at the end"] = median_ms(unprobed_backward, repeats=repeats)
    return out


_DUMP = """
import sys, json, time, torch, probe
def hwm_mb():  # peak RSS of this process image (ru_maxrss would include the parent's, kept across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
n, batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cudnn.benchmark = dev.type == "cuda"
model = probe.zoo.create("resnet56").to(dev).eval()
x = torch.randn(batch, 3, 32, 32, device=dev)
def batches():
    for i in range(0, n, batch):
        yield x[: min(batch, n - i)], torch.zeros(min(batch, n - i), dtype=torch.long, device=dev)
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
    for xb, _ in batches():  # warm-up, then the bare forward over the same samples
        model(xb)
    sync()
    t0 = time.perf_counter()
    for xb, _ in batches():
        model(xb)
    sync()
    fwd = time.perf_counter() - t0
t0 = time.perf_counter()
with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
    cap = probe.capture(model, batches(), probes=[probe.Activations(dtype="fp16")], out=out, queue_bytes=256 << 20)
secs = time.perf_counter() - t0
nbytes = sum(cap.dataset(l, "output").id.get_storage_size() for l in cap.layers)
res = {"seconds": secs, "forward_seconds": fwd, "bytes": nbytes, "max_rss_mb": hwm_mb()}
if sys.argv[4:] == ["memory"]:  # the same capture kept in memory (after the peak RSS is read)
    t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        # its length given, as a DataLoader gives it: each batch is written into its final rows
        # (a generator of unknown length is gathered, then joined: the data copied twice)
        probe.capture(model, batches(), probes=[probe.Activations(dtype="fp16")], limit=n)
    res["memory_seconds"] = time.perf_counter() - t0
print(json.dumps(res))
"""


def _steady(short: tuple[int, float], long: tuple[int, float]) -> dict:
    """The line through two dumps' (bytes, seconds): their steady rate (MB/s) and start-up (s)."""
    (b1, t1), (b2, t2) = short, long
    rate = (b2 - b1) / (t2 - t1) if t2 > t1 else float("inf")
    return {"steady_MBps": rate / 1e6, "startup_s": t1 - b1 / rate}


def _naive_cpu_hooks(model, x: torch.Tensor, samples: int, keep: bool) -> float:
    """Seconds of forwards over ``samples`` samples with the naive hook on every block output,
    ``output.detach().float().cpu()``: its copies dropped after each pass (the hook's own cost),
    or all ``kept`` in host memory as an in-memory capture keeps them (like for like with it)."""
    kept = []
    hs = [
        b.register_forward_hook(lambda m, a, o: kept.append(o.detach().float().cpu()))
        for b in model.blocks()
    ]
    try:
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(x.device):
            for _ in range(0, samples, x.shape[0]):
                model(x)
                if not keep:
                    kept.clear()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        for h in hs:
            h.remove()


def dump(samples: int, batch: int, out_dir: Path) -> dict:
    dev = device()
    res = {}
    for n in (samples, 4 * samples):
        path = out_dir / f"dump-{n}.h5"
        memory = ["memory"] if n == samples else []
        r = subprocess.run(
            [sys.executable, "-c", _DUMP, str(n), str(batch), str(path), *memory],
            capture_output=True,
            text=True,
            check=True,
        )
        res[n] = json.loads(r.stdout.strip().splitlines()[-1])
        path.unlink()
    first = res[samples]
    # raw sequential write of the same number of bytes, same disk, with fsync: the best of three,
    # since a process's first large buffered write also pays for the kernel freeing page-cache
    # memory (355 against ~1500 MB/s here), which a dump past the page cache never asks for
    buf = np.ones(64 << 20, dtype=np.uint8)
    raw = out_dir / "raw.bin"
    raw_secs = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with open(raw, "wb") as f:
            written = 0
            while written < first["bytes"]:
                f.write(buf)
                written += buf.nbytes
            f.flush()
            os.fsync(f.fileno())
        raw_secs = min(raw_secs, time.perf_counter() - t0)
        raw.unlink()
    model = _model(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    naive_secs = _naive_cpu_hooks(model, x, samples, keep=False)
    naive_kept_secs = _naive_cpu_hooks(model, x, samples, keep=True)
    return {
        "resprobe_MBps": first["bytes"] / first["seconds"] / 1e6,
        # 4x the samples: the start-up (writer, first pinned buffers) weighs a quarter as much
        "long_MBps": {n: r["bytes"] / r["seconds"] / 1e6 for n, r in res.items()},
        # t = start-up + bytes / rate through the two dumps: the rate once running, and the
        # fixed cost (imports, writer, first buffers, the last flush) a longer dump amortises
        **_steady(*((r["bytes"], r["seconds"]) for r in res.values())),
        "forward_s": first["forward_seconds"],
        "raw_disk_MBps": written / raw_secs / 1e6,
        "naive_cpu_hooks_s": naive_secs,
        "naive_cpu_hooks_kept_s": naive_kept_secs,
        "resprobe_s": first["seconds"],
        "memory_s": first["memory_seconds"],
        "rss_mb": {n: r["max_rss_mb"] for n, r in res.items()},
        "bytes": first["bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512 if torch.cuda.is_available() else 64)
    ap.add_argument("--samples", type=int, default=8192 if torch.cuda.is_available() else 512)
    ap.add_argument("--repeats", type=int, default=20 if torch.cuda.is_available() else 5)
    ap.add_argument(
        "--out-dir", default=None, help="an existing, writable folder for the dump test"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs")
    ap.add_argument("--no-dump", action="store_true", help="time the hooks only")
    ap.add_argument("--dump-only", action="store_true", help="time the HDF5 dump only")
    args = ap.parse_args()
    if args.out_dir is not None and not Path(args.out_dir).is_dir():
        ap.error(
            f"--out-dir {args.out_dir!r} is not an existing folder; create it or leave it out."
        )
    probe.runtime.tune_allocator()  # as the CLI does: otherwise glibc's page faults dominate
    torch.manual_seed(args.seed)  # the same model and inputs on every run
    header(f"hook overhead and dump throughput, ResNet-56, batch {args.batch}")
    if not args.dump_only:
        times = overhead(args.batch, args.repeats)
        base = times["unprobed (loss.backward)"]
        # A capture's backward asks for the gradients of the block outputs only: no weight gradient
        # is computed, so its like-for-like unprobed pass is the gradient with respect to the input.
        # The naive hooks ride on loss.backward, weight gradients included.
        like = {"resprobe": times["unprobed (grad wrt input)"]}
        graph_floor = times.get("unprobed (grad wrt input), graph")
        print(
            "\n## forward + backward, statistics on all 27 blocks "
            "(median ms; ratio to loss.backward; ratio to the like-for-like unprobed pass)"
        )
        for k, v in times.items():
            same = like.get(k.split()[0], base)
            print(f"{k:28s} {v:9.2f} ms  {v / base:5.2f}x  {v / same:5.2f}x")
        end = times["unprobed, again at the end"]
        print(f"noise floor (unprobed at start vs end): {abs(end - base) / base:.1%}")
        print(
            f"resprobe / naive stats hooks: {times['resprobe stats probes'] / times['naive stats hooks']:.2f}x"
        )
        if graph_floor is not None:
            for k in ("resprobe stats, cuda graph", "resprobe stats, cuda graph, per call"):
                print(f"{k} / unprobed pass recorded as a graph: {times[k] / graph_floor:.2f}x")
    if args.no_dump:
        return
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        d = dump(args.samples, args.batch, Path(tmp))
    print(
        f"\n## raw fp16 dump of every block output ({args.samples} samples, {d['bytes'] / 1e6:.0f} MB)"
    )
    print(
        f"resprobe capture -> HDF5     {d['resprobe_MBps']:8.0f} MB/s  ({d['resprobe_s']:.2f} s; "
        f"bare forward over the same samples {d['forward_s']:.2f} s = {d['resprobe_s'] / d['forward_s']:.2f}x)"
    )
    print(
        f"raw sequential write + fsync {d['raw_disk_MBps']:8.0f} MB/s  (resprobe = {d['resprobe_MBps'] / d['raw_disk_MBps']:.0%})"
    )
    n_long, long_rate = list(d["long_MBps"].items())[-1]
    print(
        f"resprobe, {n_long} samples     {long_rate:8.0f} MB/s  ({long_rate / d['raw_disk_MBps']:.0%} of the raw write)"
    )
    print(
        f"steady rate (the two dumps)  {d['steady_MBps']:8.0f} MB/s  ({d['steady_MBps'] / d['raw_disk_MBps']:.0%} "
        f"of the raw write), start-up {d['startup_s']:.2f} s"
    )
    print(
        f"naive .cpu() hooks           {d['naive_cpu_hooks_s']:8.2f} s vs resprobe {d['resprobe_s']:.2f} s "
        f"({d['naive_cpu_hooks_s'] / d['resprobe_s']:.1f}x); resprobe in memory {d['memory_s']:.2f} s "
        f"({d['naive_cpu_hooks_s'] / d['memory_s']:.1f}x)"
    )
    print(  # both end with every block output in host memory: like for like
        f"naive .cpu() hooks, kept     {d['naive_cpu_hooks_kept_s']:8.2f} s vs resprobe in memory "
        f"{d['memory_s']:.2f} s ({d['naive_cpu_hooks_kept_s'] / d['memory_s']:.1f}x)"
    )
    rss = list(d["rss_mb"].items())
    print(
        f"peak host RSS: {rss[0][1]:.0f} MB for {rss[0][0]} samples, {rss[1][1]:.0f} MB for {rss[1][0]} samples "
        f"(queue bound 256 MB)"
    )


if __name__ == "__main__":
    main()
