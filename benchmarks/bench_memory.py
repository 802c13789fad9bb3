"""Peak memory of a capture against the number of batches it covers: it should not grow.

Each (probes, output, batches) runs in a fresh process (peak RSS is per process): the zoo
ResNet-56 on random CIFAR-sized batches of 64, captured to HDF5 and in memory, over N and 10·N
batches. Prints peak RSS and the growth per extra batch; a bounded capture grows by the size of
what it keeps (in memory: its results, ~2 MB per batch here), not by its activations.

Usage: python -m benchmarks.bench_memory [--batches 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

PROBES = {
    "statistics": "residual,channel",
    "statistics + gradients": "residual,channel,grad",
}


def worker(probes: str, out: str, batches: int) -> None:
    import torch

    import probe
    import probe.runtime

    probe.runtime.tune_allocator()  # as the CLI does
    torch.manual_seed(0)
    net = probe.zoo.create("resnet56").eval()
    data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(batches)]
    with tempfile.TemporaryDirectory() as d:
        target = f"{d}/x.h5" if out == "hdf5" else None
        probe.capture(net, data, probes=probes.split(","), out=target).close()
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(probes: str, out: str, batches: int) -> float:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", probes, out, str(batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="N: the short capture; the long is 10·N")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        probes, out, n = args.worker
        worker(probes, out, int(n))
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"batches": n, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
