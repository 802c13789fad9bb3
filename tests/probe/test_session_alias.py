"""Raw results kept as views of the pass's own tensors: never changed by a later in-place op.

The session copies a raw activation only where a later in-place op would change it: the first
batch copies and watches each quantity's version counter, later batches keep views of the
quantities that stayed unchanged and run a batch again, copying, if one did change after all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import probe
from probe.probes.base import Call, Probe


class Noise(nn.Module):
    """Adds fresh random noise: a batch that runs twice must draw the same noise twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)


class MaybeDouble(nn.Module):
    """Doubles its input in place when switched on (an in-place op only some batches take)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            x.mul_(2)
        return x


WIDTH = 4096  # 16 KiB a row: larger than the small results the session packs together


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Noise(), nn.Linear(6, WIDTH), MaybeDouble(), nn.Linear(WIDTH, 3)).eval()


def _reference(model: nn.Sequential, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Layer 1's output as it was computed (copied in a plain hook), and the logits."""
    kept = []
    h = model[1].register_forward_hook(lambda m, a, o: kept.append(o.clone()))
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = model(x)
    finally:
        h.remove()
    return kept[0], logits


def _capture(session: probe.HookSession, x: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    results, logits = session.run_batch(x)
    return results["1"]["output"], logits


def test_an_output_changed_in_place_on_every_batch_is_copied_on_every_batch():
    model, x = _model(), torch.randn(32, 6)
    model[2].on = True
    with probe.HookSession(model, ["1"], [probe.Activations(dtype="fp32")]) as s:
        for seed in range(3):
            got, logits = _capture(s, x, seed)
            want, want_logits = _reference(model, x, seed)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)


def test_an_output_left_alone_is_kept_as_a_view_after_the_first_batch():
    model, x = _model(), torch.randn(32, 6)
    seen = []  # addresses only: holding the outputs themselves would make them shared (copied)
    h = model[1].register_forward_hook(lambda m, a, o: seen.append(o.data_ptr()))
    with probe.HookSession(model, ["1"], [probe.Activations(dtype="fp32")]) as s:
        first, _ = _capture(s, x, 0)
        assert first.data_ptr() != seen[-1]  # the first batch copies while it watches
        second, _ = _capture(s, x, 1)
        assert second.data_ptr() == seen[-1]  # then no copy is made
    h.remove()
    torch.testing.assert_close(second, _reference(model, x, 1)[0], rtol=0, atol=0)


def test_an_in_place_op_that_starts_later_runs_the_batch_again_with_the_same_random_draws():
    model, x = _model(), torch.randn(32, 6)
    seen = []
    h = model[1].register_forward_hook(lambda m, a, o: seen.append(o.data_ptr()))
    with probe.HookSession(model, ["1"], [probe.Activations(dtype="fp32")]) as s:
        _capture(s, x, 0)
        _capture(s, x, 1)  # a view from now on
        model[2].on = True
        seen.clear()
        got, logits = _capture(s, x, 2)
        assert len(seen) == 2  # the batch ran twice: the view was changed, so it was redone
        later, _ = _capture(s, x, 3)  # and the quantity is copied from then on
        assert len(seen) == 3
    h.remove()
    want, want_logits = _reference(model, x, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    torch.testing.assert_close(later, _reference(model, x, 3)[0], rtol=0, atol=0)
    assert later.data_ptr() != seen[-1]


def test_a_partial_view_is_copied_so_it_does_not_pin_the_whole_activation():
    model, x = _model(), torch.randn(32, 6)
    with probe.HookSession(model, ["1"], [probe.Activations(dtype="fp32", max_samples=2)]) as s:
        for seed in range(2):
            got, _ = _capture(s, x, seed)
            assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
            torch.testing.assert_close(got, _reference(model, x, seed)[0][:2], rtol=0, atol=0)


def test_residual_split_views_stay_what_the_probe_saw():
    """The raw split (F, S, y, x) of a zoo block, whose output the next block's ReLU does not
    touch: every batch equals the split computed directly."""
    from probe.conformance import RawSites
    from probe.zoo import create

    torch.manual_seed(0)
    net = create("resnet8", in_channels=3).eval()
    x = torch.randn(3, 3, 8, 8)
    block = net.get_submodule("stages.0.0")
    with probe.HookSession(net, ["stages.0.0"], [RawSites()]) as s:
        for _ in range(3):
            r = s.run_batch(x)[0]["stages.0.0"]
            with torch.no_grad():
                y = block(r["X"])
            torch.testing.assert_close(r["Y"], y, rtol=0, atol=0)
            torch.testing.assert_close(torch.relu(r["F"] + r["S"]), y, rtol=0, atol=0)


class StaticOutput(nn.Module):
    """Writes its result into one buffer it keeps and returns that buffer (as CUDA-graph replays
    and preallocated-output code do): the next batch overwrites what this one returned."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, WIDTH)
        self.register_buffer("out", torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if self.out.shape != y.shape:
            self.out = torch.empty_like(y)
        self.out.copy_(y)
        return self.out


def test_an_output_the_model_keeps_and_overwrites_on_the_next_batch_is_copied():
    torch.manual_seed(0)
    model = nn.Sequential(StaticOutput(), nn.Linear(WIDTH, 3)).eval()
    xs = [torch.randn(32, 6) for _ in range(4)]
    with probe.HookSession(model, ["0"], [probe.Activations(dtype="fp32")]) as s:
        kept = [s.run_batch(x)[0]["0"]["output"] for x in xs]
    for x, got in zip(xs, kept):
        with torch.no_grad():
            torch.testing.assert_close(got, model[0].lin(x), rtol=0, atol=0)


def test_an_input_the_caller_keeps_is_copied():
    """The batch itself belongs to the caller (a loader may refill it in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 3)).eval()
    x = torch.randn(32, WIDTH)
    with probe.HookSession(model, ["0"], [probe.Activations(dtype="fp32", which="input")]) as s:
        kept = []
        for k in range(3):
            x.fill_(float(k))  # refilled in place, as a reused buffer is
            kept.append(s.run_batch(x)[0]["0"]["input"])
    for k, got in enumerate(kept):
        assert bool((got == float(k)).all())


def test_without_the_storage_use_count_every_view_is_copied(monkeypatch):
    """The use count is a private torch API: where it is missing, nothing is kept as a view."""
    monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)
    model, x = _model(), torch.randn(32, 6)
    seen = []
    h = model[1].register_forward_hook(lambda m, a, o: seen.append(o.data_ptr()))
    with probe.HookSession(model, ["1"], [probe.Activations(dtype="fp32")]) as s:
        for seed in range(3):
            got, _ = _capture(s, x, seed)
            assert got.data_ptr() != seen[-1]
            torch.testing.assert_close(got, _reference(model, x, seed)[0], rtol=0, atol=0)
    h.remove()


# -- gradients: kept as views too, copied where a later step of the backward changes them ------
class _ScaleGradInPlace(torch.autograd.Function):
    """Identity forward; the backward doubles the incoming gradient in its own buffer (as a
    custom backward may): the gradient the hook on the output saw is changed after the hook."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.mul_(2)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * 2


class MaybeInPlaceGrad(nn.Module):
    """Doubles the gradient on its way back, in place when switched on (out of place when not:
    the same numbers either way)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_ScaleGradInPlace if self.on else _ScaleGrad).apply(x)


def _grad_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, WIDTH), MaybeInPlaceGrad(), nn.Linear(WIDTH, 3)).eval()


def _reference_grad(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/d(output of layer 1), L the summed cross-entropy: torch.autograd.grad stops at that
    output, before layer 1's own backward (the one that may change it) runs."""
    kept = []
    h = model[1].register_forward_hook(lambda m, a, o: kept.append(o))
    try:
        loss = probe.losses.exact_cross_entropy(model(x.requires_grad_(True)), y)
    finally:
        h.remove()
    return torch.autograd.grad(loss, kept)[0]


def _grad_capture(session: probe.HookSession, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return session.run_batch(x, y)[0]["1"]["grad_output"]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_a_gradient_left_alone_is_kept_as_a_view_after_the_first_batch():
    model = _grad_model()
    seen = []  # addresses only, as above

    def watch(m, a, o):
        if o.requires_grad:  # not in the session's no-grad pass that finds residual sites
            o.register_hook(lambda g: seen.append(g.data_ptr()))

    h = model[1].register_forward_hook(watch)
    with probe.HookSession(model, ["1"], [probe.Gradients(dtype="fp32")]) as s:
        first = _grad_capture(s, *_data(0))
        assert first.data_ptr() != seen[-1]  # the first batch copies while it watches
        second = _grad_capture(s, *_data(1))
        assert second.data_ptr() == seen[-1]  # then no copy is made
    h.remove()
    torch.testing.assert_close(first, _reference_grad(model, *_data(0)), rtol=0, atol=0)
    torch.testing.assert_close(second, _reference_grad(model, *_data(1)), rtol=0, atol=0)


def test_a_gradient_changed_in_place_by_a_later_backward_step_is_what_the_probe_saw():
    model = _grad_model()
    runs = []
    h = model[0].register_forward_hook(lambda m, a, o: runs.append(1))
    with probe.HookSession(model, ["1"], [probe.Gradients(dtype="fp32")]) as s:
        kept = [_grad_capture(s, *_data(0)), _grad_capture(s, *_data(1))]  # a view from now on
        model[1].on = True  # the backward now doubles the kept gradient in its own buffer
        runs.clear()
        kept.append(_grad_capture(s, *_data(2)))
        assert len(runs) == 2  # the view was changed: the batch ran again, copying
        kept.append(_grad_capture(s, *_data(3)))  # and the quantity is copied from then on
        assert len(runs) == 3
    h.remove()
    model[1].on = False  # the same numbers, out of place
    for seed, got in enumerate(kept):
        torch.testing.assert_close(got, _reference_grad(model, *_data(seed)), rtol=0, atol=0)


@dataclass
class RawGradient(Probe):
    """A custom probe that returns the gradient it is handed, uncopied."""

    name: ClassVar[str] = "raw_gradient"
    needs_grad: ClassVar[bool] = True
    eager_backward: ClassVar[bool] = True
    forward_grad: ClassVar[bool] = False

    def backward(self, call: Call) -> dict[str, torch.Tensor]:
        return {"g": call.grad_output}


def test_a_custom_probe_returning_the_raw_gradient_keeps_what_it_was_handed():
    """The gradient a backward step changes in place on every batch, from the first: a result
    kept uncopied would read twice the gradient the probe saw."""
    model = _grad_model()
    model[1].on = True
    with probe.HookSession(model, ["1"], [RawGradient()]) as s:
        kept = [s.run_batch(*_data(seed))[0]["1"]["g"] for seed in range(3)]
    model[1].on = False
    for seed, got in enumerate(kept):
        torch.testing.assert_close(got, _reference_grad(model, *_data(seed)), rtol=0, atol=0)
