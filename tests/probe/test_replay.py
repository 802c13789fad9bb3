"""Recorded probed passes (probe.replay): a replayed batch gives the eager pass's numbers, a
recording that cannot be trusted is refused with a warning and the eager numbers, and bad
settings fail before anything runs or is written.

On the CPU a stand-in graph (probe.replay.Rerun) does what a CUDA graph does to the session:
recording runs the pass once, and every replay runs the recorded pass again on the static input
and writes its packed results into the recorded blocks (the probes' Python is not run at a
replay of a real graph; here it is, on the recorded tensors). The GPU tests at the end use real CUDA graphs."""

import importlib
import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import probe
import probe.session
from probe.cli.main import cli
from probe.conformance import RawSites
from probe.errors import ProbeError
from probe.replay import GraphFallbackWarning, Packed, rerun_graph, same_results
from probe.store.writer import _extent, _span_to_host, to_host_many


class Recorded:
    """The stand-in graphs a test's sessions recorded."""

    def __init__(self):
        self.graphs = []

    @property
    def recorded(self):
        return len(self.graphs)

    def replays(self):
        return sum(g.replays for g in self.graphs)


@pytest.fixture
def stand_in(monkeypatch):
    """Recording on the CPU through probe.replay.rerun_graph; returns a :class:`Recorded`."""
    seen = Recorded()

    def record(fn):
        graph, out = rerun_graph(fn)
        seen.graphs.append(graph)
        return graph, out

    monkeypatch.setattr(probe.session, "record_graph", record)
    monkeypatch.setattr(probe.session, "check_device", lambda t, what="batches": None)
    capture_module = importlib.import_module("probe.capture")  # (probe.capture: the function)
    monkeypatch.setattr(capture_module, "check_device", lambda t, what="batches": None)
    return seen


def _net(name="resnet14", **kw):
    torch.manual_seed(0)
    return probe.zoo.create(name, in_channels=1, width=4, num_classes=3, **kw).eval()


def _batches(k=4, n=5):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]  # fmt: skip


def _stats():
    return [probe.ResidualNorms(), probe.ChannelStats(), probe.GradNorms()]


def _run(model, probes, batches, layers="auto", **kw):
    """Each batch's (results, logits), and the session with ``recordings``: how many it held."""
    out = []
    with probe.HookSession(model, layers, probes, **kw) as s:
        for x, y in batches:
            results, logits = s.run_batch(x, y)
            out.append((results, logits))
        s.recordings = len(s._recordings)
    return out, s


def _assert_same(a, b, exact=False):
    assert same_results(a, b, rtol=0 if exact else 1e-6) is None, same_results(a, b)


@pytest.mark.parametrize("grouped", [False, True])
def test_replayed_batches_give_the_eager_numbers_and_numpys(
    grouped, stand_in, statistics_reference
):
    """Batch 1 eager, batch 2 recorded and checked, batches 3-4 replayed: each equals an eager
    session's numbers for that batch, and numpy's float64 statistics of the raw block tensors."""
    model, batches = _net(), _batches()
    eager, _ = _run(model, [RawSites(), *_stats()], batches, grouped=grouped)
    replayed, s = _run(model, _stats(), batches, grouped=grouped, cuda_graph=True)
    assert stand_in.recorded == 1 and s.graph_off is None and s.recordings == 1
    for (r, logits), (e, e_logits) in zip(replayed, eager):
        e_stats = {k: {q: t for q, t in qs.items() if q not in "XFSY"} for k, qs in e.items()}
        _assert_same(r, e_stats)
        torch.testing.assert_close(logits, e_logits, rtol=0, atol=0)
    last, raw = replayed[-1][0], eager[-1][0]
    for key, qs in raw.items():
        ref = statistics_reference(qs)
        for q, want in ref.items():
            np.testing.assert_allclose(last[key][q].double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_replay_runs_no_probe_code_and_keeps_earlier_results(stand_in, monkeypatch):
    """Replayed batches do not call the hooks' probes (the stand-in's rerun aside), and a result
    handed out for one batch is a copy: the next replay leaves it alone."""
    model, batches = _net(), _batches(5)
    kept = []
    with probe.HookSession(model, "auto", _stats(), cuda_graph=True) as s:
        for i, (x, y) in enumerate(batches):
            replays = stand_in.replays()
            results, _ = s.run_batch(x, y)
            kept.append({k: {q: t.clone() for q, t in qs.items()} for k, qs in results.items()})
            kept[-1]["_live"] = results
            if i >= 2:
                assert stand_in.replays() == replays + 1  # one replay per batch from the third on
    for k in kept:
        live = k.pop("_live")
        _assert_same(live, k, exact=True)


def test_other_shapes_and_replaced_parameters_run_eagerly(stand_in):
    model = _net()
    batches = _batches(3)
    small = _batches(1, n=3)
    with probe.HookSession(model, "auto", _stats(), cuda_graph=True) as s:
        for x, y in batches:
            s.run_batch(x, y)
        replays = stand_in.replays()
        results, _ = s.run_batch(*small[0])  # another batch size: eager, first of its key
        assert stand_in.replays() == replays
        assert results["stages.0.0"]["f_norm"].shape == (3,)
        # a parameter replaced by a new tensor: the recording reads the old memory, so not used
        with torch.no_grad():
            block = model.stages[0][0].branch.conv1
            block.weight = nn.Parameter(block.weight * 2)
        replays = stand_in.replays()
        results, _ = s.run_batch(*batches[0])
        assert stand_in.replays() == replays
    eager, _ = _run(model, _stats(), batches[:1])
    _assert_same(results, eager[0][0])


def test_nonfinite_counts_of_replayed_batches_add_up(stand_in):
    model = _net()
    batches = _batches(4)
    for i, (x, _) in enumerate(batches):
        x[: i + 1] = float("nan")  # 1 + 2 + 3 + 4 samples
    _, eager = _run(model, _stats(), batches)
    _, replayed = _run(model, _stats(), batches, cuda_graph=True)
    assert replayed.nonfinite == eager.nonfinite and set(eager.nonfinite.values()) == {10}


class Stale(probe.Probe):
    """Wrongly says it can be replayed: it reuses a norm while its input is the same object,
    right eagerly (every batch is a new tensor) but not across the passes of a recording, whose
    static input is one object."""

    name = "stale"

    def __post_init__(self):
        super().__post_init__()
        self._kept = {}

    def replayable(self):
        return True

    def forward(self, call):
        ref, norm = self._kept.get(call.name, (None, None))
        if ref is None or ref() is not call.input:
            norm = call.input.flatten(1).norm(dim=1)
            self._kept[call.name] = (weakref.ref(call.input), norm)
        return {"input_norm": norm}


def test_a_probe_that_reuses_an_earlier_pass_is_caught_and_the_eager_numbers_returned(stand_in):
    """The pass before the recording holds the batch's samples in other rows, so numbers kept
    from it differ from the batch's eager ones: recording is turned off, with a warning."""
    model, batches = _net(), _batches(4)
    kw = dict(layers="stem")
    with pytest.warns(GraphFallbackWarning, match="differs from the eager one"):
        replayed, s = _run(model, [Stale()], batches, cuda_graph=True, **kw)
    assert s.graph_off is not None and s.recordings == 0
    eager, _ = _run(model, [Stale()], batches, **kw)
    for (r, _), (e, _), (x, _) in zip(replayed, eager, batches):
        _assert_same(r, e, exact=True)
        torch.testing.assert_close(r["stem"]["input_norm"], x.flatten(1).norm(dim=1))


def test_a_recording_that_fails_falls_back_with_the_reason(stand_in, monkeypatch):
    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(probe.session, "record_graph", refuse)
    model, batches = _net(), _batches(3)
    with pytest.warns(GraphFallbackWarning, match="not permitted when stream is capturing"):
        replayed, s = _run(model, _stats(), batches, cuda_graph=True)
    eager, _ = _run(model, _stats(), batches)
    for (r, _), (e, _) in zip(replayed, eager):
        _assert_same(r, e, exact=True)
    assert all(not m._forward_hooks for m in model.modules())


def test_unreplayable_probes_and_bad_settings_are_refused_before_running():
    model = _net()
    for bad in ([probe.Activations(max_samples=4)], [probe.ParamGradNorms()]):
        with pytest.raises(ProbeError, match="cannot be replayed"):
            probe.HookSession(model, "auto", bad, cuda_graph=True)
    with pytest.raises(ProbeError, match="cuda_graph must be True or False"):
        probe.HookSession(model, "auto", _stats(), cuda_graph="yes")
    with (
        probe.HookSession(model, "auto", _stats(), cuda_graph=True) as s,
        pytest.raises(ProbeError, match="needs batches on a CUDA device; this one is on cpu"),
    ):
        s.run_batch(*_batches(1)[0])


def test_capture_off_cuda_is_refused_before_a_file_exists(tmp_path):
    out = tmp_path / "c.h5"
    with pytest.raises(ProbeError, match="needs a model on a CUDA device"):
        probe.capture(_net(), _batches(2), probes=_stats(), out=out, cuda_graph=True)
    assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(
        cli, ["capture", "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--data", "digits", "--device", "cpu",
              "--limit", "8", "--cuda-graph", "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code != 0 and "needs a model on a CUDA device" in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_capture_with_a_recording_writes_the_eager_capture(stand_in, tmp_path):
    model = _net()
    batches = _batches(4)
    eager = probe.capture(model, batches, probes=_stats(), out=tmp_path / "e.h5")
    replayed = probe.capture(
        model, batches, probes=_stats(), out=tmp_path / "r.h5", cuda_graph=True
    )
    assert stand_in.recorded == 1
    with eager, replayed:
        assert eager.layers == replayed.layers
        for layer in eager.layers:
            for q in eager.quantities(layer):
                np.testing.assert_array_equal(replayed.read(layer, q), eager.read(layer, q))


def test_activations_replayed_bit_for_bit(stand_in):
    model, batches = _net(), _batches(3)
    eager, _ = _run(model, [probe.Activations(dtype="fp16")], batches)
    replayed, _ = _run(model, [probe.Activations(dtype="fp16")], batches, cuda_graph=True)
    for (r, _), (e, _) in zip(replayed, eager):
        _assert_same(r, e, exact=True)


def test_packed_results_round_trip_in_every_dtype():
    results = {
        "a": {"n": torch.arange(3.0), "m": torch.ones(3, 2, dtype=torch.float16)},
        "b": {"k": torch.tensor([1, 2, 3]), "z": torch.zeros(3, 2, 2, dtype=torch.bfloat16)},
    }
    results[""] = {"n": torch.ones(3)}  # an empty key packs like any other
    counts = [(("a", "b"), torch.tensor([0, 2]))]
    packed = Packed.pack(results, torch.full((3, 4), 7.0), counts)
    assert len(packed.blocks) == 4  # one per dtype: float32, float16, int64, bfloat16
    back, logits, got = packed.unpack(packed.blocks)
    _assert_same(back, results, exact=True)
    assert logits.shape == (3, 4) and got[0][0] == ("a", "b") and got[0][1].tolist() == [0, 2]


def test_same_results_names_what_differs():
    a = {"l": {"q": torch.tensor([1.0, float("nan")])}}
    assert same_results(a, a) is None
    assert "NaN" in same_results(a, {"l": {"q": torch.tensor([1.0, 2.0])}})
    assert "quantities" in same_results(a, {"l": {"r": torch.ones(2)}})
    assert "layers" in same_results(a, {})
    assert "differs" in same_results(
        {"l": {"k": torch.tensor([1])}}, {"l": {"k": torch.tensor([2])}}
    )


def test_views_of_one_block_leave_in_one_copy_and_read_back_as_theirs():
    block = torch.arange(40, dtype=torch.float32)
    parts = [block[3:10], block[10:30].view(4, 5), block[30:31]]
    members = [(i, t, "") for i, t in enumerate(parts)]
    hosts = _span_to_host(members, [_extent(t) for t in parts])
    for h, t in zip(hosts, parts):
        assert torch.equal(torch.from_numpy(h.numpy()), t)
    bf = torch.randn(6, dtype=torch.bfloat16)
    (h,) = to_host_many([bf])
    assert h.encoding == "bfloat16"
    assert torch.equal(torch.from_numpy(h.numpy()).view(torch.bfloat16), bf)


# -- on a GPU: real CUDA graphs ----------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_batches(k, n=64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 32, 32, generator=g).cuda(),
             torch.randint(0, 10, (n,), generator=g).cuda()) for _ in range(k)]  # fmt: skip


def _resnet56():
    torch.manual_seed(0)
    return probe.zoo.create("resnet56").cuda().eval().to(memory_format=torch.channels_last)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_cuda_replays_give_the_eager_numbers(grouped, autocast):
    model, batches = _resnet56(), _cuda_batches(5)
    probes = lambda: [*_stats(), probe.Activations(dtype="fp16")]  # noqa: E731
    runs = {}
    for graph in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            runs[graph], s = _run(model, probes(), batches, grouped=grouped, cuda_graph=graph)
        if graph:
            assert s.graph_off is None and s.recordings == 1
    for (r, rl), (e, el) in zip(runs[True], runs[False]):
        assert same_results(r, e, rtol=1e-5) is None, same_results(r, e, rtol=1e-5)
        for key in e:
            assert torch.equal(r[key]["output"], e[key]["output"])
        torch.testing.assert_close(rl, el, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@cuda
def test_cuda_capture_to_hdf5_and_memory_equal_the_eager_capture(tmp_path):
    model, batches = _resnet56(), _cuda_batches(5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        e = probe.capture(model, batches, probes=_stats(), out=tmp_path / "e.h5")
        r = probe.capture(model, batches, probes=_stats(), out=tmp_path / "r.h5", cuda_graph=True)
        m = probe.capture(model, batches, probes=_stats(), cuda_graph=True)
    with e, r:
        for layer in e.layers:
            for q in e.quantities(layer):
                want = e.read(layer, q)
                np.testing.assert_allclose(r.read(layer, q), want, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(m.read(layer, q), want, rtol=1e-5, atol=1e-6)


class ItemSync(probe.ResidualNorms):
    """Wrongly says it can be replayed: it waits on the device (refused while recording)."""

    def replayable(self):
        return True

    def forward(self, call):
        out = super().forward(call)
        out["y_max"] = out["y_norm"] * 0 + float(out["y_norm"].max().item())
        return out

    def forward_group(self, group):
        return [self.forward(c) for c in group.calls]


@pytest.mark.gpu
@cuda
def test_cuda_a_probe_that_syncs_falls_back_to_the_eager_numbers():
    model, batches = _resnet56(), _cuda_batches(4)
    eager, _ = _run(model, [ItemSync()], batches)
    with pytest.warns(GraphFallbackWarning, match="recording the probed pass failed"):
        replayed, s = _run(model, [ItemSync()], batches, cuda_graph=True)
    for (r, _), (e, _) in zip(replayed, eager):
        assert same_results(r, e, rtol=1e-6) is None
    # the device is usable afterwards: a fresh session records and replays
    again, s = _run(model, _stats(), batches, cuda_graph=True)
    assert s.graph_off is None and s.recordings == 1


@pytest.mark.gpu
@cuda
def test_cuda_a_stale_probe_is_caught():
    with pytest.warns(GraphFallbackWarning, match="differs from the eager one"):
        _, s = _run(_resnet56(), [Stale()], _cuda_batches(3), "stem", cuda_graph=True)
    assert s.graph_off is not None


def test_a_replayed_batch_with_labels_outside_the_classes_is_reported(stand_in, tmp_path):
    """A recorded pass cannot read labels on the host: a replayed batch's are checked on the
    device and reported at the next batch, or before a capture is written."""
    model, batches = _net(), _batches(4)
    batches[3][1][2] = 7  # three classes
    with probe.HookSession(model, "auto", _stats(), cuda_graph=True) as s:
        for x, y in batches:
            s.run_batch(x, y)
        with pytest.raises(ProbeError, match=r"Labels must lie in \[0, 2\] .* from sample 0"):
            s.nonfinite  # noqa: B018
    out = tmp_path / "c.h5"
    with pytest.raises(ProbeError, match="Labels must lie in"):
        probe.capture(model, batches, probes=_stats(), out=out, cuda_graph=True)
    assert not out.exists() and not list(tmp_path.iterdir())


class Inline(nn.Module):
    """Residual adds written in the model's own forward (no adapter): found by tracing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.convs:
            x = x + torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def test_traced_blocks_replay_and_a_hook_added_later_is_not_skipped(stand_in):
    """Residual sites found by tracing replay like adapter blocks; a forward hook the user adds
    between batches changes the key, so the next batch runs eagerly with it."""
    model, batches = Inline().eval(), _batches(4)
    eager, _ = _run(model, _stats(), batches)
    replays = []
    with probe.HookSession(model, "auto", _stats(), cuda_graph=True) as s:
        for x, y in batches:
            before = stand_in.replays()
            results, _ = s.run_batch(x, y)
            replays.append(stand_in.replays() - before)
        assert replays == [0, 1, 1, 1]  # batch 2: the check's replay; 3 and 4: replayed
        handle = model.head.register_forward_hook(lambda m, a, o: o * 2)
        try:
            before = stand_in.replays()
            _, logits = s.run_batch(*batches[0])
            assert stand_in.replays() == before  # eager: the user's hook ran
            torch.testing.assert_close(logits, 2 * eager[0][1])
        finally:
            handle.remove()
    assert sorted(results) == ["model#0", "model#1", "model#2"]  # the model's own 3 adds
    _assert_same(results, eager[-1][0])  # the last batch, replayed


def test_check_probe_replays_probes_that_say_they_can_be_and_catches_stale_ones():
    from probe.testing import _check_replay, check_probe

    for p in (probe.ResidualNorms(), probe.ChannelStats(), probe.GradNorms(), probe.Activations()):
        check_probe(p)  # replayed on the CPU through the stand-in: their eager numbers

    # right eagerly (each batch is a new tensor) and stale replayed (see Stale)
    with pytest.raises(AssertionError, match=r"says replayable\(\) but .* differs"):
        _check_replay(Stale(), "stem", 1e-5)


def test_batches_that_require_grad_replay_their_values(stand_in):
    model, batches = _net(), _batches(4)
    eager, _ = _run(model, _stats(), batches)
    leaves = [(x.clone().requires_grad_(True), y) for x, y in batches]
    replayed, s = _run(model, _stats(), leaves, cuda_graph=True)
    assert s.recordings == 1 and all(x.grad is None for x, _ in leaves)
    for (r, _), (e, _) in zip(replayed, eager):
        _assert_same(r, e)


def test_train_mode_and_raw_gradients_replay_and_leave_the_buffers(stand_in):
    """Train-mode BN (batch statistics) and raw fp16 gradients replay as they run eagerly, and
    the recording's extra passes leave no trace in the running statistics."""
    model, batches = _net(), _batches(4)
    probes = lambda: [*_stats(), probe.Gradients(dtype="fp16")]  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eager, _ = _run(model, probes(), batches, mode="train")
    replayed, s = _run(model, probes(), batches, mode="train", cuda_graph=True)
    assert s.recordings == 1
    for (r, _), (e, _) in zip(replayed, eager):
        _assert_same(r, e)
        assert all(torch.equal(r[k]["grad_output"], e[k]["grad_output"]) for k in e)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_capture_records_how_its_passes_ran(stand_in, tmp_path):
    batches = _batches(4)
    cap = probe.capture(_net(), batches, probes=_stats(), out=tmp_path / "r.h5", cuda_graph=True)
    with cap:
        assert int(cap.attrs["replayed_batches"]) == 2  # batch 1 eager, 2 recorded and checked
        assert cap.provenance["execution"] == {"grouped": None, "cuda_graph": True}
    mem = probe.capture(_net(), batches, probes=_stats(), grouped=True)
    assert "replayed_batches" not in mem.attrs
    assert mem.provenance["execution"] == {"grouped": True, "cuda_graph": False}


def test_the_cli_says_how_many_batches_were_replayed(stand_in, tmp_path):
    out = tmp_path / "c.h5"
    r = CliRunner().invoke(
        cli, ["capture", "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--data",
              "digits", "--device", "cpu", "--limit", "64", "--batch-size", "16", "--cuda-graph",
              "--probe", "residual", "--probe", "grad", "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "replayed 2 batches of a recorded CUDA graph" in r.output  # of 4: 1 eager, 1 recorded
    with probe.open(out) as cap:
        assert int(cap.attrs["replayed_batches"]) == 2
