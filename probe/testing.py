"""Conformance checks every probe -- built-in or user-written -- must pass.

``check_probe(probe)`` runs the probe through the real capture path on tiny plain and residual zoo
nets and checks the contract: per-sample tensors with the sample axis first, no autograd history,
results independent of batch composition (eval mode), identical after an HDF5 round trip, a JSON-
serialisable config, and no hook left behind; a ``groupable`` probe the same numbers for grouped
calls, and a ``replayable`` one the same numbers replayed (a recording stood in for on the CPU).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from probe.capture import capture
from probe.errors import ProbeError
from probe.probes.base import Probe
from probe.replay import GraphFallbackWarning, rerun_graph, same_results
from probe.session import HookSession
from probe.zoo import create

__all__ = ["check_probe"]


def _tiny_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        create(name, in_channels=1, width=4, num_classes=3).eval() for name in ("resnet8", "plain8")
    ]


def _runs_of_blocks() -> torch.nn.Module:
    """A tiny net whose stages hold runs of equally shaped blocks (groups, recordings)."""
    torch.manual_seed(0)
    return create("resnet14", in_channels=1, width=4, num_classes=3).eval()


def _fail(probe: Probe, what: str) -> None:
    raise AssertionError(f"Probe {type(probe).__name__} ({probe.name!r}) {what}")


def check_probe(probe: Probe, layers: str = "auto", rtol: float = 1e-5) -> None:
    """Raise ``AssertionError`` with an explanation if ``probe`` breaks the probe contract.

    Example:
        >>> from probe.probes import ResidualNorms
        >>> check_probe(ResidualNorms())
    """
    if not isinstance(probe, Probe):
        _fail(probe, "is not a probe.Probe subclass instance.")
    try:
        json.dumps(probe.config())
    except TypeError as e:
        _fail(probe, f"has a config() that is not JSON-serialisable: {e}")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    for model in _tiny_models():
        before = {
            n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()
        }
        with HookSession(model, layers, [probe]) as session:
            full, _ = session.run_batch(x, y)
            halves = [session.run_batch(x[:3], y[:3], 0)[0], session.run_batch(x[3:], y[3:], 3)[0]]
        after = {
            n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in model.named_modules()
        }
        if before != after:
            _fail(probe, "left hooks behind.")
        if not any(full.values()):
            _fail(probe, "produced nothing on any layer of a tiny zoo net.")
        for layer, qs in full.items():
            for q, t in qs.items():
                if t.requires_grad:
                    _fail(probe, f"returned {layer}/{q} with autograd history; detach it.")
                if t.shape[0] not in (6, 0) and not getattr(probe, "max_samples", None):
                    _fail(probe, f"returned {layer}/{q} with {t.shape[0]} rows for 6 samples.")
                parts = [h.get(layer, {}).get(q) for h in halves]
                if any(p is None for p in parts):
                    continue
                joined = torch.cat(parts).float()
                if joined.shape == t.shape and not torch.allclose(
                    joined, t.float(), rtol=rtol, atol=1e-5
                ):
                    _fail(
                        probe,
                        f"gives different {layer}/{q} when the batch is split; rows must be per sample.",
                    )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "check.h5"
            cap = capture(model, [(x, y)], layers=layers, probes=[probe], out=path)
            with cap:
                for layer, qs in full.items():
                    for q, t in qs.items():
                        stored = cap.read(layer, q)
                        ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
                        if stored.shape != ref.shape or not np.allclose(
                            stored.astype(np.float64),
                            ref.astype(np.float64),
                            rtol=rtol,
                            atol=1e-6,
                            equal_nan=True,
                        ):
                            _fail(probe, f"changes {layer}/{q} in the HDF5 round trip.")
    if probe.groupable:
        _check_groups(probe, layers, x, y, rtol)
    if probe.replayable():
        _check_replay(probe, layers, rtol)
    try:
        type(probe)(**{k: v for k, v in probe.config().items() if k != "probe"})
    except (TypeError, ProbeError) as e:
        _fail(probe, f"cannot be rebuilt from its config(): {e}")


def _check_groups(probe: Probe, layers: str, x: torch.Tensor, y: torch.Tensor, rtol: float) -> None:
    """A ``groupable`` probe gives each call's numbers when its calls are grouped: on a net with
    runs of equally shaped blocks, grouped (probe.probes.group) and per call."""
    model = _runs_of_blocks()
    runs = []
    for grouped in (False, True):
        with HookSession(model, layers, [probe], grouped=grouped) as session:
            runs.append(session.run_batch(x, y)[0])
    alone, grouped = runs
    for layer, qs in alone.items():
        for q, t in qs.items():
            got = grouped.get(layer, {}).get(q)
            if got is None or got.shape != t.shape:
                _fail(probe, f"gives no {layer}/{q} of shape {tuple(t.shape)} for grouped calls.")
            if not torch.allclose(got.float(), t.float(), rtol=rtol, atol=1e-6, equal_nan=True):
                _fail(
                    probe,
                    f"gives a different {layer}/{q} for grouped calls (forward_group / "
                    "backward_group) than call by call; a group's rows must be each call's own.",
                )


def _check_replay(probe: Probe, layers: str, rtol: float) -> None:
    """A probe that says ``replayable()`` gives its eager numbers when its pass is recorded and
    replayed (probe.replay). Off the GPU a recording is stood in for by running the recorded
    pass again at each replay (:class:`probe.replay.Rerun`): a host sync cannot show here, but
    numbers carried from one pass to the next do, as they would in a CUDA graph."""
    model = _runs_of_blocks()
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(5, 1, 8, 8, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(4)
    ]
    with HookSession(model, layers, [probe]) as session:
        eager = [session.run_batch(bx, by)[0] for bx, by in batches]
    with HookSession(model, layers, [probe], cuda_graph=True) as session:
        session._record_graph, session._check_device = rerun_graph, lambda t: None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GraphFallbackWarning)  # read from graph_off below
            replayed = [session.run_batch(bx, by)[0] for bx, by in batches]
        if session.graph_off is not None:
            _fail(
                probe, f"says replayable() but its recorded pass was refused: {session.graph_off}."
            )
    for i, (got, want) in enumerate(zip(replayed, eager)):
        diff = same_results(got, want, rtol=rtol)
        if diff is not None:
            _fail(
                probe,
                f"says replayable() but gives other numbers replayed (batch {i + 1}: {diff}); "
                "a replay repeats the recorded kernels, so state kept between passes is stale.",
            )
