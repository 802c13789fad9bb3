"""Captures over two ranks (torchrun, gloo, CPU): the joined file is the one-process capture, a
rank's failure is every rank's, and a killed rank leaves no file that ``probe.open`` accepts."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import probe
from probe.cli.main import cli

# One pytest-xdist worker runs this module, so the two-rank job of conftest.ranks_job is made once.
pytestmark = pytest.mark.xdist_group("ranks_job")

JOB = Path(__file__).parent / "scripts" / "ranks_job.py"


def _same_capture(one, two, rtol=1e-5, atol=1e-5):
    """Same samples (by sample_index), layers, layer attributes, axis labels, values to float
    tolerance (the ranks' batches start at other samples, so sums run in another order)."""
    assert two.sample_index().tolist() == one.sample_index().tolist()
    assert np.array_equal(two.labels(), one.labels())
    assert two.layers == one.layers
    for layer in one.layers:
        assert two.layer_attrs(layer) == one.layer_attrs(layer), layer
        assert two.quantities(layer) == one.quantities(layer)
        for q in one.quantities(layer):
            assert two.dim_labels(layer, q) == one.dim_labels(layer, q)
            a, b = one.read(layer, q).astype(np.float64), two.read(layer, q).astype(np.float64)
            assert a.shape == b.shape, (layer, q)
            tol = 2e-3 if q == "output" else rtol  # fp16 storage: one rounding step
            assert np.allclose(a, b, rtol=tol, atol=atol), (layer, q, np.abs(a - b).max())


def _one_process(tmp_path, args, name="one.h5"):
    torch.set_num_threads(1)
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / name)])
    assert res.exit_code == 0, res.output
    return probe.open(tmp_path / name)


def _job_module():
    spec = importlib.util.spec_from_file_location("ranks_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_a_two_rank_capture_is_the_one_process_capture(ranks_job, tmp_path, monkeypatch):
    out, res = ranks_job
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    assert res.stdout.count("captured 151 samples x 4 layers") == 1, res.stdout  # rank 0 speaks
    assert "on 2 ranks" in res.stdout
    assert not (out / "two.h5.shards").exists()  # a copied join keeps no parts
    with probe.open(out / "two.h5") as two:
        assert two.attrs["shard_count"] == 1 and two.attrs["n_samples"] == 151  # odd count: once
        ranks = two.provenance["ranks"]
        assert ranks["world"] == 2 and ranks["samples"] == [[0, 76], [76, 151]]
        assert two.verify() == []
        one = _one_process(tmp_path, _job_module().CAPTURE)
        assert json.loads(two.attrs["config"]) == json.loads(one.attrs["config"])
        _same_capture(one, two)


def test_a_virtual_join_keeps_parts_that_open_only_through_it(ranks_job, tmp_path, monkeypatch):
    out, _ = ranks_job
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    parts = sorted((out / "virtual.h5.shards").glob("*.h5"))
    assert [p.name for p in parts] == ["rank-00000-of-00002.h5", "rank-00001-of-00002.h5"]
    with pytest.raises(probe.ProbeError, match="one shard .* of the capture"):
        probe.open(parts[0])
    one = _one_process(tmp_path, _job_module().VIRTUAL)
    with probe.open(out / "virtual.h5") as index:
        assert index.attrs["shard_count"] == 2 and "capture_id" in index.attrs
        for layer in one.layers:
            assert np.allclose(index.read(layer, "f_norm"), one.read(layer, "f_norm"), rtol=1e-5)
    byhand = tmp_path / "byhand.h5"
    res = CliRunner().invoke(cli, ["join", "--copy", str(byhand), *map(str, parts)])
    assert res.exit_code == 0, res.output
    with probe.open(byhand) as copied, probe.open(out / "virtual.h5") as index:
        assert copied.attrs["capture_id"] == index.attrs["capture_id"]
        assert np.array_equal(
            copied.read("stages.1.0", "f_norm"), index.read("stages.1.0", "f_norm")
        )
    res = CliRunner().invoke(cli, ["join", str(tmp_path / "half.h5"), str(parts[1])])
    assert res.exit_code == 1 and "ranks 0 to 1" in res.output  # half a capture is no capture


def test_probe_capture_in_a_script_under_torchrun(ranks_job):
    out, _ = ranks_job
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    job = _job_module()
    torch.set_num_threads(1)
    # in memory, train mode: every rank holds the whole capture, batches as one process has them
    whole = probe.capture(job.model(), job.data(), probes=["residual", "channel"], mode="train")
    for r in range(2):
        got = np.load(out / f"memory{r}.npz")
        assert got["index"].tolist() == list(range(37)) and seen[r]["memory_samples"] == 37
        for layer in whole.layers:
            for q in whole.quantities(layer):
                assert np.array_equal(got[f"{layer}|{q}"], whole.read(layer, q)), (layer, q)
    # a failing rank: both ranks raise its message; a rank with other weights: refused
    for r in range(2):
        assert "capture failed on rank 1 of 2" in seen[r]["failure"], seen[r]
        assert "this rank's model broke" in seen[r]["failure"]
        assert "model weights" in seen[r]["weights"], seen[r]
    assert not list(out.glob("f.h5*")) and not list(out.glob("w.h5*"))
    assert probe.open(out / "alone.h5").attrs["n_samples"] == 37  # distributed=False


def _accepted(folder):
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                probe.open(path).close()
                found.append(path)
            except probe.ProbeError:
                pass
    return found


@pytest.mark.slow
def test_killing_one_rank_mid_capture_leaves_no_capture(tmp_path):
    """SIGKILL rank 1 while it writes its part (its temporary file names its pid): torchrun stops
    rank 0, which deletes its own part; no file anywhere opens as a capture, and a rerun of the
    same command writes the capture."""
    args = [*_job_module().CAPTURE[:7], "--data", "digits", "--split", "train", "--batch-size", "16",
            "--limit", "1400", "--probe", "residual", "--probe", "activations", "--out", "k.h5"]  # fmt: skip
    env = {**os.environ, "RESPROBE_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "probe", "--threads", "1", *args]  # fmt: skip
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed, t0 = None, time.monotonic()
    while run.poll() is None and time.monotonic() - t0 < 120 and killed is None:
        temps = list((tmp_path / "k.h5.shards").glob("rank-00001-of-00002.h5.tmp-*"))
        if temps:
            # at once: the part is written in well under a second, so any wait could land after it
            killed = int(temps[0].name.rsplit("-", 1)[1])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.005)
    output, _ = run.communicate(timeout=120)
    assert killed is not None, "rank 1 never started writing:\n" + output[-2000:]
    # the kill landed before rank 1 finished its part, or this run tests nothing
    assert not (tmp_path / "k.h5.shards" / "rank-00001-of-00002.h5").exists(), output[-2000:]
    assert run.returncode != 0
    assert not (tmp_path / "k.h5").exists()
    assert _accepted(tmp_path) == [], "a killed capture left a file that opens as a capture"
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert probe.open(tmp_path / "k.h5").attrs["n_samples"] == 1400
    assert not list((tmp_path).rglob("*.tmp-*"))  # the killed rank's temporary file is gone
