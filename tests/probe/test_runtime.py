"""Threads and determinism: chosen sensibly, recorded, and reruns bit-identical when asked."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import probe
from probe.cli.main import cli
from probe.errors import ProbeError
from probe.runtime import available_cores, choose_threads, runtime_settings


def test_auto_threads_leave_the_cores_other_processes_use(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 0.0, 0.0))
    assert choose_threads("auto") == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    assert choose_threads("auto") == 4
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    assert choose_threads("auto") == 1


@pytest.mark.parametrize("bad", [0, -2, "abc", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ProbeError, match="thread count"):
        choose_threads(bad)


def test_captures_record_threads_and_determinism():
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    cap = probe.capture(model, [torch.randn(2, 1, 8, 8)], probes=[probe.ResidualNorms()])
    rt = cap.provenance["runtime"]
    assert rt["threads"] == torch.get_num_threads() and rt["cores"] == available_cores()
    assert set(rt) >= {"deterministic", "interop_threads", "cudnn_benchmark"}


def _train(tmp_path, name):
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(
            cli,
            [
                "--threads",
                "1",
                "--deterministic",
                "train",
                "-m",
                "plain8",
                "--epochs",
                "1",
                "--set",
                "batch_size=256",
                "--out",
                str(tmp_path / name),
            ],
        )
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "using 1 CPU thread of" in res.output
    return tmp_path / name


def test_deterministic_runs_at_one_thread_are_bit_identical(tmp_path):
    a, b = _train(tmp_path, "a"), _train(tmp_path, "b")
    wa, wb = (load_file(next((d / "checkpoints").glob("epoch-0001*.safetensors"))) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    meta = json.loads(next((a / "checkpoints").glob("epoch-0001*.json")).read_text())
    assert meta["runtime"]["threads"] == 1 and meta["runtime"]["deterministic"] is True


def test_runtime_settings_are_plain_json():
    json.dumps(runtime_settings())


def test_tf32_convolutions_are_recorded(monkeypatch):
    # on CUDA they change float32 results (~1e-3 relative per layer), so a run says which it used
    for allowed in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allowed)
        assert runtime_settings()["cudnn_allow_tf32"] is allowed


def test_the_allocator_tuning_applies_on_glibc_and_is_recorded():
    import platform

    from probe.runtime import tune_allocator

    applied = tune_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    assert runtime_settings()["allocator_tuned"] is applied
    assert tune_allocator() is applied  # idempotent


def test_no_cuda_statistics_are_recorded_in_a_process_without_a_cuda_device(monkeypatch):
    from probe.probes import onepass_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime_settings()["cuda_statistics"] == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime_settings()["cuda_statistics"] == onepass_cuda.mode()
