"""Run once under torchrun (two gloo ranks) by the tests of tests/distributed: what a user does
on several ranks -- ``probe capture`` and ``probe train`` from the command line, and
``probe.capture`` inside a script, with its failures. One job, so torchrun starts once.

Each rank records every file it creates, opens for writing, renames or removes (a Python audit
hook) and what it saw, in OUT/rank<R>.json; the tests compare the files with one-process runs.

Usage: torchrun --standalone --nproc-per-node 2 ranks_job.py OUT
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

CAPTURE = [
    "capture", "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--model-arg", "width=4",
    "--data", "digits", "--limit", "151", "--batch-size", "32", "--probe", "residual",
    "--probe", "channel", "--probe", "grad", "--probe", "activations:dtype=fp16",
    "--probe", "jacobian:n_probes=2,max_samples=90",
    "--probe", "shattered:n_points=8,max_lag=4,max_samples=100,direction=next",
]  # fmt: skip
TRAIN = ["train", "-m", "resnet8", "--opt", "width=4", "--epochs", "2", "--set", "batch_size=64",
         "--save-at", "0,last"]  # fmt: skip
VIRTUAL = ["capture", "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--model-arg",
           "width=4", "--data", "digits", "--limit", "77", "--batch-size", "32", "--probe",
           "residual", "--probe", "grad"]  # fmt: skip


def record_writes() -> list[str]:
    writes: list[str] = []

    def hook(event: str, a: tuple) -> None:
        if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
            mode, flags = a[1], a[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & _WRITE_FLAGS:
                writes.append(os.path.abspath(os.fsdecode(a[0])))
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            target = a[1] if event == "os.rename" else a[0]
            writes.append(os.path.abspath(os.fsdecode(target)))

    sys.addaudithook(hook)
    return writes


def data(n=37):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + 10], y[i : i + 10]) for i in range(0, n, 10)]


def model():
    import probe

    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval()


class FailsOnRank1(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if dist.get_rank() == 1:
            raise RuntimeError("this rank's model broke")
        return self.inner(x)


def attempt(fn):
    import probe

    try:
        fn()
        return None
    except probe.ProbeError as e:
        return f"{type(e).__name__}: {e}"


def cli(*args: str) -> None:
    from probe.cli.main import cli as probe_cli

    probe_cli.main(["--threads", "1", *args], prog_name="probe", standalone_mode=False)


def main(out: Path) -> None:
    writes = record_writes()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import probe

    seen: dict = {}
    os.chdir(out)
    cli(*CAPTURE, "--out", "two.h5")
    cli(*VIRTUAL, "--join", "virtual", "--out", "virtual.h5")
    cli(*TRAIN, "--out", "run")
    torch.set_num_threads(1)
    # in memory, a list of batches, train mode (split between batches)
    mem = probe.capture(model(), data(), probes=["residual", "channel"], mode="train")
    np.savez(out / f"memory{rank}.npz", index=mem.sample_index(),
             **{f"{l}|{q}": mem.read(l, q) for l in mem.layers for q in mem.quantities(l)})  # fmt: skip
    seen["memory_samples"] = int(mem.attrs["n_samples"])
    # a rank whose model raises: every rank fails with that rank's message, nothing is left
    seen["failure"] = attempt(
        lambda: probe.capture(FailsOnRank1(model()), data(), probes=["residual"], out=out / "f.h5")
    )
    # a rank with other weights would put another model's numbers in the file: refused
    torch.manual_seed(rank)
    other = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    seen["weights"] = attempt(
        lambda: probe.capture(other, data(), probes=["residual"], out=out / "w.h5")
    )
    # on one rank alone inside the job
    if rank == 1:
        probe.capture(model(), data(), probes=["residual"], out=out / "alone.h5",
                      distributed=False).close()  # fmt: skip
    dist.barrier()
    seen["writes"] = list(writes)
    (out / f"rank{rank}.json").write_text(json.dumps(seen, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
