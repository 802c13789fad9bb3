"""Data-parallel training over two ranks (torchrun, gloo, CPU): every step is the one-process
step with the same global batch, but for BatchNorm, which normalises each rank's half by its own
statistics (torch's SyncBatchNorm refuses CPU tensors). The independent reference below computes
exactly that in one process -- each half normalised alone, the gradient of the mean loss over the
whole batch, rank 0's running statistics kept -- and the two-rank run must agree with it; only
rank 0 writes the run directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probe.data import DeviceLoader, load_dataset
from probe.errors import ProbeError
from probe.train import get_recipe, lr_at
from probe.train.checkpoint import load_checkpoint
from probe.train.ddp import Replicas

# One pytest-xdist worker runs this module, so the two-rank job of conftest.ranks_job is made once.
pytestmark = pytest.mark.xdist_group("ranks_job")

TRAIN = ["--threads", "1", "train", "-m", "resnet8", "--opt", "width=4", "--epochs", "2",
         "--set", "batch_size=64", "--save-at", "0,last"]  # fmt: skip


def _ghost_batch_reference(run: Path, epochs: int, batch_size: int):
    """(batch loss per epoch, state dict) of the run trained in one process from its epoch-0
    checkpoint, each global batch's two halves passing BatchNorm separately."""
    torch.set_num_threads(1)
    model, _ = load_checkpoint(run / "checkpoints" / "epoch-0000.json")
    data = load_dataset("digits")
    recipe = get_recipe("digits", depth=8, epochs=epochs, batch_size=batch_size)
    loader = DeviceLoader(data.x_train, data.y_train, batch_size, mean=data.mean, std=data.std,
                          shuffle=True, augment=data.augment, seed=0)  # fmt: skip
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
    )  # fmt: skip
    total, it, losses = epochs * len(loader), 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        loader.set_epoch(epoch)
        summed, seen = 0.0, 0
        for x, y, _ in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, it, total)
            half = -(-len(y) // 2)
            first = model(x[:half])
            kept = [b.clone() for b in model.buffers()]  # rank 0's running statistics
            second = model(x[half:])
            parts = [F.cross_entropy(first, y[:half], reduction="sum"),
                     F.cross_entropy(second, y[half:], reduction="sum")]  # fmt: skip
            opt.zero_grad()
            ((parts[0] + parts[1]) / len(y)).backward()
            with torch.no_grad():
                for b, v in zip(model.buffers(), kept):
                    b.copy_(v)
            opt.step()
            summed += (parts[0] + parts[1]).item()
            seen += len(y)
            it += 1
        losses.append(summed / seen)
    return losses, model.state_dict()


def test_two_rank_training_is_the_one_process_step_with_per_rank_batchnorm(ranks_job):
    out, res = ranks_job
    assert res.stdout.count("resnet8 seed 0: train error") == 1, res.stdout  # rank 0 speaks
    run = out / "run"
    history = json.loads((run / "history.json").read_text())
    assert [r.get("ranks") for r in history] == [None, 2, 2]

    losses, want = _ghost_batch_reference(run, 2, 64)
    got, _ = load_checkpoint(run / "checkpoints" / "epoch-0002.json")
    assert np.allclose([r["batch_loss"] for r in history[1:]], losses, rtol=1e-6, atol=0)
    for name, value in want.items():
        assert torch.allclose(
            got.state_dict()[name].double(), value.double(), rtol=1e-5, atol=1e-7
        ), name

    # only rank 0 wrote the run directory; rank 1 read it
    writes = [json.loads((out / f"rank{r}.json").read_text())["writes"] for r in range(2)]
    inside = [[p for p in w if Path(p).resolve().is_relative_to(run.resolve())] for w in writes]
    assert inside[1] == []
    assert {"run.json", "history.json", "epoch-0002.json", "resume.json"} <= {
        Path(p).name for p in inside[0]
    }


@pytest.mark.slow
def test_training_over_ranks_refuses_what_it_cannot_do(tmp_path, torchrun):
    res = torchrun("-m", "probe", *TRAIN, "--sync-bn", "--out", "run")
    assert res.returncode != 0
    assert "SyncBatchNorm, which runs on GPUs only" in res.stderr, res.stderr[-2000:]
    assert not re.search(r'File ".*/probe/', res.stderr), "a traceback of ours reached the user"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("n_train", "batch", "ok"), [(128, 64, True), (65, 64, False), (3, 64, True), (1, 64, False)]
)
def test_every_rank_gets_images_in_every_step(n_train, batch, ok):
    replicas = Replicas(rank=1, world=2, device=torch.device("cpu"))
    if ok:
        replicas.check(n_train, batch, sync_bn=False)
    else:
        with pytest.raises(ProbeError, match="a rank with no images in a step"):
            replicas.check(n_train, batch, sync_bn=False)


@pytest.mark.slow
def test_an_interrupted_two_rank_run_resumes_to_the_same_weights(tmp_path, torchrun, kill_job):
    """Kill the whole job after epoch 1 is saved; started again, every rank resumes from that
    checkpoint and the run ends bit for bit where an uninterrupted run ends."""
    args = [a if a != "2" else "3" for a in TRAIN]  # three epochs
    assert torchrun("-m", "probe", *args, "--out", "whole").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "probe", *args, "--out", "cut"]  # fmt: skip
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    resume = tmp_path / "cut" / "resume.json"
    while job.poll() is None and not (
        resume.exists() and json.loads(resume.read_text())["epoch"] >= 1
    ):
        pass
    kill_job(job)
    assert json.loads(resume.read_text())["epoch"] < 3, "the job finished before it was killed"
    res = torchrun("-m", "probe", *args, "--out", "cut")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed after epoch" in res.stdout
    a, _ = load_checkpoint(tmp_path / "whole" / "checkpoints" / "epoch-0003.json")
    b, _ = load_checkpoint(tmp_path / "cut" / "checkpoints" / "epoch-0003.json")
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_sync_bn_on_two_gpus_follows_the_one_gpu_run(tmp_path, torchrun):
    """With SyncBatchNorm the two-rank run computes the one-process step with the same global
    batch: its loss curve follows a one-GPU run's to bf16 rounding (rtol 2e-2 after two epochs is
    a first bound, to be tightened from the first measurement)."""
    args = ["-m", "probe", *TRAIN, "--device", "cuda"]
    assert torchrun(*args, "--sync-bn", "--out", "two").returncode == 0
    one = subprocess.run([sys.executable, *args, "--out", "one"], cwd=tmp_path, capture_output=True)
    assert one.returncode == 0, one.stderr[-2000:]
    curves = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two")]
    assert curves[1][-1]["sync_bn"] is True
    loss = [[r["batch_loss"] for r in c[1:]] for c in curves]
    assert np.allclose(loss[1], loss[0], rtol=2e-2), loss
