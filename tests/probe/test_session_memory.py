"""A session keeps no batch's tensors once the batch is done: gradient probes hook the hooked
tensors, and those hooks close over the tensors themselves -- a cycle through autograd's C++
nodes that Python's garbage collector cannot see, so the session must undo it."""

import gc
import weakref

import pytest
import torch

import probe


def _tracked(model, name):
    """Weak references to every output of ``model.<name>`` from now on."""
    refs = []
    model.get_submodule(name).register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    return refs


class _Deferred(probe.Probe):
    """A gradient probe whose backward half runs once the whole backward pass is done."""

    name = "deferred"
    needs_grad = True
    eager_backward = False

    def backward(self, call):
        return {"g": call.grad_output.flatten(1).norm(dim=1)}


@pytest.mark.parametrize(
    "probes",
    [["grad"], ["residual", "grad"], ["gradients"], [_Deferred()]],
    ids=["norms", "stats", "raw", "deferred"],
)
def test_gradient_probes_let_every_batch_go(probes):
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    refs = _tracked(model, "stages.1.0")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with probe.HookSession(model, "auto", probes) as session:
        for _ in range(3):
            res, _ = session.run_batch(x, y)
            assert res  # something was measured
        gc.collect()
        assert len(refs) == 3 and all(r() is None for r in refs), "a batch's activations leaked"


def test_a_forward_outside_run_batch_is_let_go_on_close():
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    refs = _tracked(model, "stages.1.0")
    with probe.HookSession(model, "auto", ["grad"]):
        model(torch.randn(4, 1, 8, 8).requires_grad_(True))  # hooks its tensors, nobody runs them
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None


class _Counting(probe.Probe):
    """Counts its calls, forward and backward."""

    name = "counting"
    needs_grad = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, call):
        self.calls += 1
        return {"n": call.output.flatten(1).norm(dim=1)}

    def backward(self, call):
        self.calls += 1
        return {"g": call.grad_output.flatten(1).norm(dim=1)}


class _Block(torch.nn.Module):
    """A residual block no adapter describes: its site is found by tracing."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def _traced_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        _Block(),
        _Block(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    ).eval()


@pytest.mark.parametrize(
    "make, tracked",
    [
        (lambda: probe.zoo.create("resnet8", in_channels=1, width=4).eval(), "stages.1.0"),
        (_traced_net, "1"),
    ],
    ids=["adapters", "traced sites"],
)
def test_a_pass_of_the_callers_own_between_batches_runs_no_probe_and_changes_nothing(make, tracked):
    """Between batches the model is the caller's: a pass of theirs (an evaluation, a training
    step) runs no probe -- it cost a ResNet-56 forward 25 % for results no one read -- hooks no
    tensor, and the next batch's results are what they would have been."""
    import copy

    torch.manual_seed(0)
    net = make()
    twin = copy.deepcopy(net)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with probe.HookSession(twin, "auto", ["residual", "grad"]) as fresh:
        want, _ = fresh.run_batch(x, y)
    counting = _Counting()
    with probe.HookSession(net, "auto", ["residual", "grad", counting]) as session:
        session.run_batch(x, y)
        ran = counting.calls
        assert ran > 0 and session.layers
        refs = _tracked(net, tracked)
        with torch.no_grad():
            net(torch.randn(3, 1, 8, 8))
        out = net(torch.randn(3, 1, 8, 8).requires_grad_(True))  # a step of the caller's own
        out.sum().backward()
        assert counting.calls == ran and not session._grad_hooks
        del out
        gc.collect()
        assert len(refs) == 2 and all(r() is None for r in refs)
        got, _ = session.run_batch(x, y)
    assert counting.calls == 2 * ran
    assert sorted(got) == sorted(want) and want
    for key in want:
        for q, t in want[key].items():
            assert torch.equal(got[key][q], t), (key, q)


def test_small_results_are_compacted_into_one_block_per_dtype():
    """Equal values, shapes and dtypes; the small ones share a block made after the pass (see
    probe.session._compacted), large raw tensors are left as the probes made them."""
    from probe.nonfinite import NonFiniteCounter
    from probe.session import _COMPACT_BYTES, _SERIAL_CAT, _compacted

    big = torch.randn(_COMPACT_BYTES // 4 + 1)
    results = {
        "a": {"n": torch.randn(8), "m": torch.randn(8, 3).t(), "big": big},  # .t(): not contiguous
        "b": {"k": torch.arange(8), "v": torch.randn(8, 2, 2, dtype=torch.float64)},
        # copied in runs of under _SERIAL_CAT elements: one alone past it, several across a run
        "c": {"wide": torch.randn(2, _SERIAL_CAT // 2 + 3), "after": torch.randn(5)},
        **{f"d{i}": {"r": torch.randn(4, _SERIAL_CAT // 7)} for i in range(9)},
        # copied by shape: runs of one shape across layers, interleaved with others, and empty
        **{f"e{i}": {"n": torch.randn(8) + i, "c": torch.randn(8, 5) - i} for i in range(4)},
        "f": {"none": torch.randn(0), "no_channels": torch.randn(8, 0)},
    }
    expected = {k: {q: t.clone() for q, t in qs.items()} for k, qs in results.items()}
    out = _compacted(results, NonFiniteCounter())
    for k, qs in expected.items():
        for q, t in qs.items():
            assert out[k][q].dtype == t.dtype and torch.equal(out[k][q], t), (k, q)
    assert out["a"]["big"] is big
    float_storage = out["a"]["n"].untyped_storage().data_ptr()
    assert out["a"]["m"].untyped_storage().data_ptr() == float_storage
    assert out["b"]["v"].untyped_storage().data_ptr() != float_storage  # float64: its own block


def test_compaction_stays_on_the_cpu_under_another_default_device():
    """The block is made on the CPU whatever torch's default device is (a user's
    ``torch.set_default_device``): its results are CPU tensors."""
    from probe.nonfinite import NonFiniteCounter
    from probe.session import _compacted

    results = {"a": {"n": torch.randn(8), "m": torch.randn(8, 3)}}
    expected = {q: t.clone() for q, t in results["a"].items()}
    with torch.device("meta"):
        out = _compacted(results, NonFiniteCounter())
    for q, t in expected.items():
        assert out["a"][q].is_cpu and torch.equal(out["a"][q], t), q


def test_a_closed_session_leaves_no_tensor_for_the_garbage_collector():
    """A closed session is cyclic garbage (its hooks were bound methods of it), freed by the
    collector. Its batch's results used to stay in it (63 of them views), so the collector freed
    them, in whatever order it clears a cycle. Only the norm memos' [N] norms may be left."""
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    probes = [probe.make_probe(p) for p in ("residual", "channel", "grad")]
    with probe.HookSession(model, "auto", probes) as s:  # imports and caches made once
        s.run_batch(x, y)
    del s
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with probe.HookSession(model, "auto", probes) as s:
            layers = len(s.run_batch(x, y)[0])  # the results dropped, as a capture drops them
        del s
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    memo = {
        id(n) for p in probes for _, _, n in getattr(getattr(p, "_norms", None), "_entries", ())
    }
    assert layers and [tuple(t.shape) for t in left if id(t) not in memo] == []
