"""Peak memory of a capture against the number of batches it covers: it should not grow.

Each (probes, output, batches) runs in a fresh process (peak RSS is per process): the zoo
ResNet-56 on random CIFAR-sized batches of 64, captured to HDF5 and in memory, over N and 10·N
batches. Prints peak RSS and the growth per extra batch; a bounded capture grows by the size of
what it keeps (in memory: its results, ~2 MB per batch here), not by its activations.

Block outputs kept in memory are the other case: there the results are the data. Given as a
generator, a capture does not know its length and joins its batches at the end; given as a
DataLoader (or a list) it writes each batch into arrays of the final size. The last rows print
peak RSS over the data kept, for both, side by side.

Usage: python -m benchmarks.bench_memory [--batches 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

PROBES = {  # probe specs, separated by ';'
    "statistics": "residual;channel",
    "statistics + gradients": "residual;channel;grad",
}


def worker(probes: str, out: str, batches: int, source: str = "generator") -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import probe
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI does
    torch.manual_seed(0)
    net = probe.zoo.create("resnet56").eval()
    x, y = torch.randn(64 * batches, 3, 32, 32), torch.randint(0, 10, (64 * batches,))
    if source == "loader":  # a known length
        data = DataLoader(TensorDataset(x, y), batch_size=64)
    else:  # a generator: no length known ahead
        data = ((x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as d:
        target = f"{d}/x.h5" if out == "hdf5" else None
        cap = probe.capture(net, data, probes=probes.split(";"), out=target)
        kept = (
            0
            if target
            else sum(cap.read(l, q).nbytes for l in cap.layers for q in cap.quantities(l))
        )
        cap.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "start_mb": before, "kept_mb": kept / 2**20}))


def run_worker(probes: str, out: str, batches: int, source: str = "generator") -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", probes, out, str(batches)]
    res = subprocess.run([*cmd, source], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(probes: str, out: str, batches: int) -> float:
    return run_worker(probes, out, batches)["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="N: the short capture; the long is 10·N")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        probes, out, n, source = args.worker
        worker(probes, out, int(n), source)
        return
    n = args.batches
    rows = []
    print(f"peak RSS, zoo ResNet-56, batch 64, {n} vs {10 * n} batches (fresh process each)")
    print(f"{'probes':<24}{'output':<8}{'N':>9}{'10·N':>9}{'MB per extra batch':>20}")
    for label, probes in PROBES.items():
        for out in ("hdf5", "memory"):
            short, long = measure(probes, out, n), measure(probes, out, 10 * n)
            per = (long - short) / (9 * n)
            rows.append({"probes": label, "output": out, "short_mb": short, "long_mb": long})
            print(f"{label:<24}{out:<8}{short:>8.0f}M{long:>8.0f}M{per:>20.1f}")
    print(f"\nblock outputs in memory (fp32), {10 * n} batches: peak RSS over the data kept")
    for source in ("generator", "loader"):
        r = run_worker("activations:dtype=fp32", "memory", 10 * n, source)
        grew = r["peak_mb"] - r["start_mb"]
        rows.append({"probes": "block outputs", "output": "memory", "source": source, **r})
        print(
            f"  {source:<9} kept {r['kept_mb']:7.0f} MB, peak RSS {r['peak_mb']:6.0f} MB "
            f"({grew:6.0f} MB over the start: {grew / r['kept_mb']:.2f} x the data)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"batches": n, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
