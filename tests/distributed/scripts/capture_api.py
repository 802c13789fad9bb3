"""Run under torchrun by tests/distributed/test_capture_ranks.py: probe.capture inside a user's
script with an initialised process group, and its failures. Each rank writes what it saw to
OUT/rank<R>.json; the test compares with one-process captures."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import probe
from probe.data import load_dataset
from probe.loading import capture_loader


def data(n=37):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + 10], y[i : i + 10]) for i in range(0, n, 10)]


def model():
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
    try:
        fn()
        return None
    except probe.ProbeError as e:
        return f"{type(e).__name__}: {e}"


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    seen = {}
    # in memory, a list of batches, train mode (split between batches)
    mem = probe.capture(model(), data(), probes=["residual", "channel"], mode="train")
    np.savez(out / f"memory{rank}.npz", index=mem.sample_index(),
             **{f"{l}|{q}": mem.read(l, q) for l in mem.layers for q in mem.quantities(l)})  # fmt: skip
    seen["memory_attrs"] = {k: v for k, v in mem.attrs.items() if k in ("n_samples", "provenance")}
    # to a file, as an index over the kept parts (digits' test split, an odd limit)
    loader = capture_loader(load_dataset("digits"), "test", 32, "cpu", limit=77)
    probe.capture(model(), loader, probes=["residual", "grad"], out=out / "virtual.h5",
                  join="virtual").close()  # fmt: skip
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
    (out / f"rank{rank}.json").write_text(json.dumps(seen, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
