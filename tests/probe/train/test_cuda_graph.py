"""Training steps replayed as CUDA graphs: refused where unsupported, and on a GPU the same
gradients, BatchNorm statistics and training as eager steps."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from probe.cli.main import cli
from probe.errors import ProbeError
from probe.train import TrainConfig, train
from probe.train.graphs import (
    _Graphed,
    check_graphable,
    graph_autocast,
    graphed_forward,
    replayed_backward,
)
from probe.zoo import create

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(tmp_path, **kw):
    base = dict(
        model="resnet8",
        model_options={"width": 4},
        recipe_overrides={"epochs": 2, "batch_size": 128},
        save_at="last",
        out=str(tmp_path / "run"),
        cuda_graph=True,
    )
    return TrainConfig(**{**base, **kw})


def test_cuda_graph_off_cuda_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ProbeError, match="CUDA graphs need a CUDA device; the run is on cpu"):
        train(_cfg(tmp_path, device="cpu"))
    assert not (tmp_path / "run").exists()


def test_cuda_graph_cli_error_exits_non_zero_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(
        cli, ["train", "-m", "resnet8", "--device", "cpu", "--cuda-graph", "--out", str(out)]
    )
    assert r.exit_code != 0
    assert "Drop --cuda-graph" in r.output and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize(
    "kw, match",
    [({"compiled": True}, "choose one"), ({"ranks": 2}, "this run has 2 ranks")],
)
def test_unsupported_combinations_are_refused(kw, match):
    # checked before any CUDA call, so a CPU-only machine tests the messages too
    with pytest.raises(ProbeError, match=match):
        check_graphable(torch.device("cuda"), **kw)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.gpu
@gpu
def test_a_replayed_step_gives_the_eager_gradients_and_statistics():
    torch.manual_seed(0)
    eager = create("resnet8", width=8).cuda().train()
    graphed_model = create("resnet8", width=8).cuda().train()
    graphed_model.load_state_dict(eager.state_dict())
    step = graphed_forward(graphed_model, torch.device("cuda"))
    for i in range(3):  # recording at the first call, then replays with new data
        x = torch.randn(64, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (64,), device="cuda")
        for model, fn in ((eager, eager), (graphed_model, step)):
            model.zero_grad(set_to_none=True)
            with graph_autocast():
                loss = F.cross_entropy(fn(x).float(), y)
            with replayed_backward():  # as the trainer steps
                loss.backward()
        for a, b in zip(_grads(eager), _grads(graphed_model)):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=f"step {i}")
        # the recording's warm-up passes left no trace: one update per step, as eager
        for a, b in zip(eager.buffers(), graphed_model.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"step {i}")
    # a batch of another size runs eagerly, with the same parameters
    x = torch.randn(10, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(step(x), graphed_model(x))


@pytest.mark.gpu
@gpu
def test_graphed_training_follows_eager_training(tmp_path):
    """Two epochs with a last, smaller batch (600 = 4 x 128 + 88): the same losses as eager."""
    common = dict(train_limit=600, device="cuda")
    eager = train(_cfg(tmp_path, cuda_graph=False, out=str(tmp_path / "eager"), **common))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        graphed = train(_cfg(tmp_path, out=str(tmp_path / "graph"), **common))
    assert not [w for w in seen if "AccumulateGrad" in str(w.message)]  # internals stay inside
    for e, g in zip(eager.history[1:], graphed.history[1:]):
        assert g["batch_loss"] == pytest.approx(e["batch_loss"], rel=2e-2), (e, g)
    assert graphed.final["train_error"] == pytest.approx(eager.final["train_error"], abs=0.03)


def test_replayed_backward_hides_only_the_recording_stream_warning():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with replayed_backward():
            warnings.warn(
                "The AccumulateGrad node's stream does not match", UserWarning, stacklevel=1
            )
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_the_recording_hides_the_stream_warning_of_its_own_backward_passes(monkeypatch):
    """make_graphed_callables runs backward passes while it records (warm-up and capture), where
    torch 2.11 on an H100 warned about the accumulation nodes' stream: the trainer's user saw it."""

    def recording(module, args, num_warmup_iters):
        warnings.warn("The AccumulateGrad node's stream does not match", UserWarning, stacklevel=1)
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", recording)
    net = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _Graphed(net, warmup=1)(x)
    assert not [w for w in seen if "AccumulateGrad" in str(w.message)]
    torch.testing.assert_close(out, net(x))


def test_a_study_with_cuda_graph_off_cuda_is_refused_before_its_directory_exists(tmp_path):
    out = tmp_path / "study"
    r = CliRunner().invoke(cli, ["study", "--device", "cpu", "--cuda-graph", "--out", str(out)])
    assert r.exit_code != 0
    assert "CUDA graphs need a CUDA device" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_the_study_passes_cuda_graph_to_every_training_run(tmp_path):
    from probe.study import get_preset
    from probe.study.interventions.runner import condition_run, conditions_for
    from probe.study.runner import grid_run

    cfg = get_preset("default", cuda_graph=True, arms=("all",))
    assert grid_run(cfg, tmp_path, "resnet8", 0).cuda_graph
    conditions = [c for c, _ in conditions_for(cfg).values()]
    assert conditions and all(condition_run(cfg, c, 0, tmp_path).cuda_graph for c in conditions)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the bf16 autocast, on a CPU
def test_a_failed_recording_is_a_clear_error_and_moves_no_statistics(monkeypatch):
    """A model that cannot be recorded (here: the recorder itself fails, as it does for a forward
    that waits for the host) stops with ProbeError, its BatchNorm statistics untouched."""
    from probe.train import graphs

    def failing(module, sample_args, num_warmup_iters):
        module(*sample_args)  # a warm-up pass moves the running statistics, then it fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing)
    net = create("resnet8", width=4).train()
    before = [b.clone() for b in net.buffers()]
    step = graphs._Graphed(net, warmup=1)
    with pytest.raises(ProbeError, match="Train without --cuda-graph"):
        step(torch.randn(4, 3, 32, 32))
    for a, b in zip(before, net.buffers()):
        assert torch.equal(a, b)
