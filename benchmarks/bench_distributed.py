"""One process against two ranks (torchrun, gloo) for a capture and a small study, and what rank
0's join costs per shard -- measured side by side in one run.

Every command runs in a fresh process, start-up included (what a user waits for); repeats
alternate the configurations so that drift of the machine hits each alike. The capture is also
timed without start-up (its ``wall_seconds``: from the first batch to the joined file). The join
rows split one capture into K shards and time rank 0's two ways of joining them: a copy into one
file (reads and writes every byte) and an index of virtual datasets (metadata only).

On a GPU node, ``--ranks N`` compares one process on one GPU with N ranks on N GPUs (threads do
not matter there).

Usage: python -m benchmarks.bench_distributed [--repeats 3] [--ranks 2] [--json out.json]
       [--skip-study]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import probe
from probe.data import load_dataset
from probe.loading import capture_loader
from probe.runtime import available_cores

CAPTURE = [
    "capture", "--model", "zoo:resnet56", "--model-arg", "in_channels=1", "--data", "digits",
    "--split", "train", "--batch-size", "128", "--probe", "residual", "--probe", "channel",
    "--probe", "grad", "--probe", "jacobian:n_probes=16,max_samples=1437",
]  # fmt: skip
STUDY = [
    "study", "--set", "depths=8,20", "--set", "seeds=0,1", "--set", 'recipe_overrides={"epochs": 4}',
    "--set", "capture_at=0,last", "--set", "capture_limit=128", "--set", "lesion_limit=128",
    "--set", "probes=residual,channel,grad",
]  # fmt: skip
# (label, ranks, threads per rank)


def configs(ranks: int) -> list[tuple[str, int, int]]:
    """(label, ranks, threads per rank): one process with all cores and with one rank's share,
    and ``ranks`` ranks sharing the cores."""
    cores = available_cores()
    share = max(1, cores // ranks)
    return [
        (f"1 process, {cores} threads", 1, cores),
        (f"1 process, {share} thread{'s' * (share > 1)}", 1, share),
        (f"{ranks} ranks x {share} thread{'s' * (share > 1)}", ranks, share),
    ]


def _command(ranks: int, threads: int, args: list[str]) -> list[str]:
    probe_cmd = ["-m", "probe", "--threads", str(threads), *args]
    if ranks == 1:
        return [sys.executable, *probe_cmd]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={ranks}", *probe_cmd]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESPROBE_DATA": str(cwd / "data")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return wall


def commands(repeats: int, work: Path, study: bool, ranks: int) -> list[dict]:
    rows = []
    plan = configs(ranks)
    jobs = [("capture", CAPTURE)] + ([("study", STUDY)] if study else [])
    for name, args in jobs:
        times: dict[str, list[float]] = {label: [] for label, _, _ in plan}
        inner: dict[str, list[float]] = {label: [] for label, _, _ in plan}
        for rep in range(repeats):
            for label, ranks, threads in plan:
                out = work / f"{name}-{ranks}-{threads}-{rep}"
                extra = ["--out", str(out.with_suffix(".h5") if name == "capture" else out)]
                times[label].append(_run(_command(ranks, threads, args + extra), work))
                if name == "capture":
                    with probe.open(out.with_suffix(".h5")) as cap:
                        inner[label].append(float(cap.attrs["wall_seconds"]))
        base = statistics.median(times[plan[0][0]])
        for label, ranks, threads in plan:
            row = {
                "job": name,
                "config": label,
                "ranks": ranks,
                "threads_per_rank": threads,
                "wall_s": times[label],
                "median_s": statistics.median(times[label]),
                "vs_first": statistics.median(times[label]) / base,
            }
            if inner[label]:
                row["capture_s"] = statistics.median(inner[label])
            rows.append(row)
    return rows


# What rank 0 joins: many small datasets (statistics of every block and the block outputs of an
# 8x8 digit: 117 datasets, 26 MB), and few large ones (block outputs of a CIFAR-sized input).
JOINS = {
    "digits, statistics + outputs": (1, "digits", 1437, ["residual", "channel", "activations"]),
    "32x32, outputs": (3, "synthetic", 1024, ["activations"]),
}


def _join_data(kind: str, channels: int, n: int):
    if kind == "digits":
        return load_dataset("digits"), "train"
    from probe.data.synthetic import synthetic

    return synthetic((channels, 32, 32), 10, n=n), "train"


def joins(repeats: int, work: Path) -> list[dict]:
    """Rank 0's join of one capture split into K shards, by copy and as a virtual index."""
    rows = []
    for what, (channels, kind, n, probes) in JOINS.items():
        torch.manual_seed(0)
        model = probe.zoo.create("resnet20", in_channels=channels).eval()
        data, split = _join_data(kind, channels, n)
        loader = capture_loader(data, split, 128, torch.device("cpu"), limit=n)
        rows += _joins(repeats, work / what.split(",")[0], model, loader, probes, what)
    return rows


def _joins(repeats: int, work: Path, model, loader, probes: list[str], what: str) -> list[dict]:
    n = loader.num_samples
    rows = []
    for k in (1, 2, 4, 8):
        folder = work / f"join-{k}"
        paths = []
        cuts = probe.distributed.split_samples(n, k)
        for rank, (a, b) in enumerate(cuts):
            path = folder / f"rank{rank}.h5"
            probe.capture(model, loader.shard(a, b), probes=probes, out=path,
                          shard=(rank, k), sample_offset=a).close()  # fmt: skip
            paths.append(path)
        size = sum(p.stat().st_size for p in paths)
        with probe.open(paths[0]) as first:
            datasets = 2 + sum(len(first.quantities(layer)) for layer in first.layers)
        for copy in (True, False):
            times = []
            for _ in range(repeats):
                out = folder / f"joined-{copy}.h5"
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                probe.join_shards(paths, out, copy=copy)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append(
                {
                    "capture": what,
                    "datasets": datasets,
                    "shards": k,
                    "join": "copy" if copy else "virtual",
                    "mb": size / 2**20,
                    "median_ms": med * 1e3,
                    "ms_per_shard": med * 1e3 / k,
                    "mb_per_s": size / 2**20 / med if copy else None,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--joins-only", action="store_true", help="only the join rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {available_cores()} cores, torch {torch.__version__}, repeats {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = (
            [] if args.joins_only else commands(args.repeats, work, not args.skip_study, args.ranks)
        )
        if runs:
            print("\n| job | configuration | wall s (median; each run) | ratio | capture s |")
            print("|---|---|---|---|---|")
            for r in runs:
                each = ", ".join(f"{t:.1f}" for t in r["wall_s"])
                cap = f"{r['capture_s']:.1f}" if "capture_s" in r else ""
                print(f"| {r['job']} | {r['config']} | {r['median_s']:.1f} ({each}) | "
                      f"{r['vs_first']:.2f} | {cap} |")  # fmt: skip
        jrows = joins(args.repeats, work)
        print("\n| capture | datasets | shards | join | MB | ms | ms per shard | MB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in jrows:
            rate = f"{r['mb_per_s']:.0f}" if r["mb_per_s"] else ""
            print(f"| {r['capture']} | {r['datasets']} | {r['shards']} | {r['join']} | "
                  f"{r['mb']:.1f} | {r['median_ms']:.1f} | {r['ms_per_shard']:.1f} | {rate} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"commands": runs, "joins": jrows}, indent=2))


if __name__ == "__main__":
    main()
