"""resprobe against the tools its users would pick instead, side by side in one run.

Every (model, row, method) runs in a fresh Python process: build the model, warm up, then the
median of ``--repeats`` timed passes over one batch; the unprobed pass of the row is measured at
the start and at the end of the run, and the spread of those two is the noise floor. Every method
that captures block outputs saves what it captured from the first batch, and the parent checks it
against block outputs computed without any hook (the blocks called one after another), so a fast
method that records the wrong tensor fails its row. In the statistics rows each method's norms
and channel moments (and gradient norms) of every residual site are checked against the same
statistics, in float64, of the sites split by hand (``reference_statistics``). Each worker also
times the unprobed pass on a twin of the model (same weights, no hooks) alternately with its
method; ``paired`` is the median of those pass-by-pass ratios, which the drift between processes
(often +-20 % here) does not reach, given with its 95 % bootstrap interval. Each row with a
target (:data:`TARGETS`) ends with resprobe's verdict on it from that interval: "met" (all of it
at or under the target), "missed" (all above) or "within the noise" (a longer ``--repeats``
narrows it).

Rows: ``out`` block outputs in memory; ``io`` block input + branch + output in memory; ``disk``
block outputs to HDF5 (uncompressed) against a raw write of the same bytes; ``stream`` the same
for 8 batches into one file (the per-file set-up spread out); ``stats``
ResidualNorms + ChannelStats, forward; ``stats_disk`` the same to HDF5, one batch per file (~300
small datasets: a file's per-dataset cost); ``grad`` statistics + gradient norms, forward +
backward; ``grads`` block outputs and their gradients in memory, forward + backward (every
model of the row frozen, so that each method and the unprobed pass take the gradient with
respect to the input alone; checked against each block's output and its gradient from
``torch.autograd.grad`` of the blocks called one after another). Captum has no one-pass API
that returns a layer's activation and gradient together, and TorchLens, which logs gradients
with ``save_grads``, costs 10-15 x for the outputs alone: neither is in that row.
Methods: ``hooks`` (hand-written ``register_forward_hook``, detached references), ``hooks_clone``
(cloned), ``raw_write`` (the dump's bytes written alone, no model), ``raw_thread`` (hooks hand
each block output to a thread that writes its bytes to a flat file while the model runs, then
fsync: no format, no checksum, the least any dump costs beside the model), ``nnsight``, ``captum`` (LayerActivation), ``torchlens``, ``resprobe``, and in the
statistics rows ``resprobe_fused`` (``fused=True``: compiled statistics) and ``resprobe_torch``
(the eager statistics by torch's formulas: the one-pass CPU kernels off, as where numba is
absent; probe.probes.onepass). Peers that are
not installed (``pip install -e ".[bench]"``) are skipped with a note.

``--versus A,B`` (e.g. ``resprobe,nnsight``) times two methods head to head instead: per row,
one process runs A, B and the unprobed twin in rotating order, and A/B is the median of the
round-by-round ratios with a 95 % bootstrap interval ("faster", "slower" or "within the noise").
``--versus resprobe,resprobe_unchecked`` gives what resprobe's non-finite checks cost (the
second session counts no NaN or inf: a measurement, never a way to capture).

Models: ``zoo`` the zoo's ResNet-56 on CIFAR-sized inputs, ``tv`` torchvision's resnet50, ``vit``
timm's ViT-S/16 (a transformer block holds two residual sites, x + attention and + MLP: its
io and statistics rows are over those 24 sites). torchvision and timm are in the ``models``
extra; a model whose package is missing is skipped with a note.

Usage:
    python -m benchmarks.compare [--models zoo,tv,vit]
        [--rows out,io,disk,stream,stats,stats_disk,grad,grads]
        [--repeats 10] [--threads 2] [--json /tmp/compare.json]
    python -m benchmarks.compare --versus resprobe,nnsight --rows out,io --repeats 31
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MODELS = {
    "zoo": ("zoo:resnet56, CIFAR 3x32x32", 64, (3, 32, 32)),
    "tv": ("torchvision resnet50, 3x224x224", 8, (3, 224, 224)),
    "vit": ("timm vit_small_patch16_224, 3x224x224", 8, (3, 224, 224)),
}
MODEL_PACKAGES = {"tv": "torchvision", "vit": "timm"}
STREAM = 8  # batches per file in the "stream" row: a capture's own cost, its set-up spread out
ROWS = {
    "out": (
        "block outputs in memory",
        ["hooks", "hooks_clone", "nnsight", "captum", "torchlens", "resprobe"],
    ),
    "io": ("block input + branch + output in memory", ["hooks", "nnsight", "resprobe"]),
    "disk": (
        "block outputs to HDF5 (uncompressed)",
        ["raw_write", "raw_thread", "hooks_h5py", "resprobe"],
    ),
    "stream": (
        f"block outputs to HDF5, {STREAM} batches per file",
        ["raw_write", "raw_thread", "hooks_h5py", "resprobe"],
    ),
    "stats": (
        "ResidualNorms + ChannelStats, forward",
        ["hooks", "resprobe", "resprobe_fused", "resprobe_torch"],
    ),
    "stats_disk": ("ResidualNorms + ChannelStats to HDF5, one batch per file", ["resprobe"]),
    "grad": (
        "statistics + gradient norms, forward + backward",
        ["hooks", "resprobe", "resprobe_fused", "resprobe_torch"],
    ),
    "grads": ("block outputs + their gradients, fwd + bwd", ["hooks", "nnsight", "resprobe"]),
}
# A captured tensor is the reference's to float32 rounding (0, or ~6e-7 where a method's backward
# adds in another order). A float32 statistic is not: torch's CPU norm keeps one running sum per
# vector lane and is off by up to ~1e-4 where a few values hold a row's mass (a ViT gradient's
# class token; benchmarks/bench_statistics_parts.py --norms), where a statistic of a wrong tensor
# is off by >= 1e-2 (||F|| read after torchvision's bottleneck added S into it: 0.22).
TENSOR_TOLERANCE = 1e-5
STATS_TOLERANCE = 1e-3
# In --versus only: resprobe's in-memory session with its non-finite checks switched off (a NaN
# would go uncounted), so that resprobe against it is what the checks cost.
UNCHECKED = "resprobe_unchecked"
PEERS = {"nnsight": "nnsight", "captum": "captum", "torchlens": "torchlens"}
TWIN = "unprobed twin"  # the unprobed pass timed beside every method, for paired ratios
# The targets for resprobe's paired ratio on the CPU (2 threads), by row. A dump's is relative:
# DUMP_TARGET x max(forward, a raw write of the same bytes), the latter raw_write's paired ratio
# in the same run. Block outputs also aim at <= nnsight's ratio in the same run.
TARGETS = {"out": 1.05, "io": 1.10, "stats": 1.15, "grad": 1.20}
DUMP_TARGET = 1.10


# --------------------------------------------------------------------------- the model and data
def build(model: str) -> tuple[torch.nn.Module, list[str], torch.Tensor, torch.Tensor]:
    """(model in eval mode, dotted block names, x, y) with fixed seeds."""
    torch.manual_seed(0)
    _, batch, shape = MODELS[model]
    if model == "zoo":
        import probe

        net = probe.zoo.create("resnet56")
        blocks = [n for n, m in net.named_modules() if isinstance(m, probe.zoo.BasicBlock)]
    elif model == "vit":
        import timm

        net = timm.create_model("vit_small_patch16_224")
        blocks = [f"blocks.{i}" for i in range(len(net.blocks))]
    else:
        import torchvision

        net = torchvision.models.resnet50()
        blocks = [
            f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(net, f"layer{i}")))
        ]
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    return net.eval(), blocks, x, y


def split_by_hand(model: str) -> tuple[list[tuple[str, torch.Tensor, ...]], torch.Tensor]:
    """([(site, x, F(x), y)] of every residual site in order, logits), the model run site by site
    with no hook anywhere and autograd on (callers detach). A ResNet block is one site, named by
    the block, F computed by calling the branch's layers by hand (torchvision's bottleneck adds
    into F(x) in place, so a kept, uncopied F would read y); a ViT block is two, ``blocks.i#0``
    (x + attention) and ``blocks.i#1`` (+ MLP), as resprobe names them."""
    net, blocks, x, _ = build(model)
    sites = []
    if model == "vit":
        h = _vit_tokens(net, x)
        for name, b in zip(blocks, net.blocks):
            for j, (norm, fn, ls, drop) in enumerate(
                [(b.norm1, b.attn, b.ls1, b.drop_path1), (b.norm2, b.mlp, b.ls2, b.drop_path2)]
            ):
                f = drop(ls(fn(norm(h))))
                sites.append((f"{name}#{j}", h, f, h + f))  # timm's Block.forward, step by step
                h = sites[-1][3]
        return sites, net.forward_head(net.norm(h))
    if model == "zoo":
        h, modules, head = net.stem(x), list(net.blocks()), net.head
    else:
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        modules = [b for i in range(1, 5) for b in getattr(net, f"layer{i}")]

        def head(t):
            return net.fc(torch.flatten(net.avgpool(t), 1))

    for name, b in zip(blocks, modules):
        if model == "zoo":
            f = b.branch(h)
        else:
            f = b.relu(b.bn1(b.conv1(h)))
            f = b.bn3(b.conv3(b.relu(b.bn2(b.conv2(f)))))
        sites.append((name, h, f, b(h)))
        h = sites[-1][3]
    return sites, head(h)


def reference_io(model: str) -> list[torch.Tensor]:
    """x, F(x), y of every residual site in turn (:func:`split_by_hand`)."""
    sites, _ = split_by_hand(model)
    return [t.detach() for _, x, f, y in sites for t in (x, f, y)]


def reference_output_grads(model: str) -> list[torch.Tensor]:
    """y and dL/dy of every block in turn, L the summed cross-entropy of the batch: the model
    run block by block (no hook anywhere) and differentiated by ``torch.autograd.grad`` with
    respect to each block's output. In float32, as the methods run: a float64 copy's ReLUs
    would switch off a few other units whose input is within rounding of zero, which moves the
    gradients of the early blocks by ~2e-3 of their norm on ResNet-56."""
    sites, logits = split_by_hand(model)
    outs = [y for name, _, _, y in sites if not name.endswith("#0")]  # a ViT block's last site
    grads = torch.autograd.grad(F.cross_entropy(logits, build(model)[3], reduction="sum"), outs)
    return [t.detach() for pair in zip(outs, grads) for t in pair]


def reference_outputs(model: str) -> list[torch.Tensor]:
    """Block outputs computed by calling the blocks in order, no hook anywhere (the y of each
    block's last site in :func:`split_by_hand`)."""
    with torch.no_grad():
        sites, _ = split_by_hand(model)
    return [y for name, _, _, y in sites if not name.endswith("#0")]


def reference_statistics(model: str) -> dict[str, torch.Tensor]:
    """``{"site/quantity": value}`` from :func:`split_by_hand`, in float64: per-sample norms of
    x, F and y (``x_norm``, ``f_norm``, ``y_norm``) and of dL/dy (``grad_y_norm``, L the summed
    cross-entropy as resprobe takes it; ``grad_y_norm_mean`` for the mean, as the hand-written
    hooks' pass takes it), y's per-sample channel mean and population variance over positions
    (``channel_mean``, ``channel_var``: resprobe's) and its batch-wide mean and unbiased variance
    (``batch_mean``, ``batch_var``: what the hand-written hooks compute)."""
    sites, logits = split_by_hand(model)
    labels = build(model)[3]
    grads = torch.autograd.grad(
        F.cross_entropy(logits, labels, reduction="sum"), [s[3] for s in sites]
    )
    ref = {}
    for (name, x, f, y), g in zip(sites, grads):
        x, f, y, g = (t.detach().double() for t in (x, f, y, g))
        # channels: axis 1 of [N, C, H, W], the last of [N, T, C] tokens
        c = y.flatten(2) if y.ndim == 4 else y.transpose(1, 2)  # [N, C, positions]
        per_sample = {
            "x_norm": x.flatten(1).norm(dim=1),
            "f_norm": f.flatten(1).norm(dim=1),
            "y_norm": y.flatten(1).norm(dim=1),
            "grad_y_norm": g.flatten(1).norm(dim=1),
            "grad_y_norm_mean": g.flatten(1).norm(dim=1) / len(y),
            "channel_mean": c.mean(2),
            "channel_var": c.var(2, correction=0),
            "batch_mean": c.transpose(0, 1).flatten(1).mean(1),
            "batch_var": c.transpose(0, 1).flatten(1).var(1),
        }
        ref.update({f"{name}/{q}": v for q, v in per_sample.items()})
    return ref


def _vit_tokens(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm's ViT feeds its first block (``forward_features`` up to the blocks)."""
    return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))


# --------------------------------------------------------------------------- methods
def _module(net, name):
    return net.get_submodule(name)


def _envoy(wrapped, name):
    """nnsight's proxy of a dotted submodule (it is reached by attribute and index)."""
    obj = wrapped
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _branch_of(model: str, block: torch.nn.Module):
    return block.branch if model == "zoo" else block.bn3  # bottleneck: F(x) = bn3(...)


def _vit_sites(block, name: str, on_site) -> list:
    """Hooks calling ``on_site(key, x, F, y)`` for a ViT block's two sites as each y is known, the
    way a hand-written probe reads them: the block's input (x of ``name#0``), ``drop_path1``'s
    output (its F), ``norm2``'s input (its y, and x of ``name#1``), ``drop_path2``'s output (F)
    and the block's output (y); keys as :func:`split_by_hand` gives them."""
    kept = {}

    def first(mod, a):
        kept["y0"] = a[0]
        on_site(f"{name}#0", kept["x"], kept["f0"], a[0])

    return [
        block.register_forward_pre_hook(lambda mod, a: kept.__setitem__("x", a[0])),
        block.drop_path1.register_forward_hook(lambda mod, a, o: kept.__setitem__("f0", o)),
        block.norm2.register_forward_pre_hook(first),
        block.drop_path2.register_forward_hook(lambda mod, a, o: kept.__setitem__("f1", o)),
        block.register_forward_hook(
            lambda mod, a, o: on_site(f"{name}#1", kept["y0"], kept["f1"], o)
        ),
    ]


def _vit_io_hooks(block, name: str, store) -> list:
    """Hooks keeping x, F, y of a ViT block's two sites (:func:`_vit_sites`), in that order."""

    def keep(site, x, f, y):
        store.extend([(f"{site}:x", x.detach()), (f"{site}:f", f.detach()), (site, y.detach())])

    return _vit_sites(block, name, keep)


def _hooks(net, blocks, store, *, clone=False, what="out", model="zoo"):
    hs = []
    # torchvision's bottleneck adds into F(x) in place: kept uncopied, it would read y
    copy = clone or model == "tv"
    for name in blocks:
        m = _module(net, name)
        if what == "io" and model == "vit":
            hs += _vit_io_hooks(m, name, store)
            continue
        if what in ("out", "io"):
            hs.append(
                m.register_forward_hook(
                    lambda mod, a, o, n=name: store.append(
                        (n, o.detach().clone() if clone else o.detach())
                    )
                )
            )
        if what == "io":
            hs.append(
                m.register_forward_pre_hook(
                    lambda mod, a, n=name: store.append((n + ":x", a[0].detach()))
                )
            )
            hs.append(
                _branch_of(model, m).register_forward_hook(
                    lambda mod, a, o, n=name: store.append(
                        (n + ":f", o.detach().clone() if copy else o.detach())
                    )
                )
            )
    return hs


class _HandOff:
    """A hook store that hands each (name, tensor) to a writer thread instead of a list."""

    def __init__(self, q) -> None:
        self.q = q

    def append(self, item) -> None:
        self.q.put(item[1])


def _drain(q, fh) -> None:
    """Write each tensor's bytes (no copy: a view of its memory) until None."""
    while (t := q.get()) is not None:
        fh.write(memoryview(t.numpy()).cast("B"))


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _site_stats(store, site, x, f_norm, y, grads) -> None:
    """The statistics resprobe computes, hand-written: ||x||, ||F||, ||y|| per sample (||F|| taken
    as the branch returns F: torchvision's bottleneck then adds S into it in place); channel mean
    and variance of y over the batch; with ``grads`` the per-sample ||dL/dy||."""
    axes = (0, 2, 3) if y.ndim == 4 else (0, 1)  # all but the channel: [N, C, H, W], [N, T, C]
    store.append((site, _norms(x), f_norm, _norms(y), y.mean(axes), y.var(axes)))
    if grads and y.requires_grad:
        y.register_hook(lambda g: store.append((site + ":g", _norms(g))))


def _stat_hooks(net, blocks, store, model, grads=False):
    """Hooks storing :func:`_site_stats` of every residual site: a ResNet block's x, F, y from
    its input, its branch's output and its output; a ViT block's two sites by :func:`_vit_sites`."""
    hs = []
    for name in blocks:
        m = _module(net, name)
        if model == "vit":  # ViT's F: no in-place add into it, so its norm is taken with y's
            hs += _vit_sites(
                m, name, lambda site, x, f, y: _site_stats(store, site, x, _norms(f), y, grads)
            )
            continue
        kept = {}
        hs.append(
            _branch_of(model, m).register_forward_hook(
                lambda mod, a, o, k=kept: k.__setitem__("f", _norms(o))
            )
        )
        hs.append(
            m.register_forward_hook(
                lambda mod, a, o, k=kept, n=name: _site_stats(store, n, a[0], k["f"], o, grads)
            )
        )
    return hs


def _stats_captured(store, grads: bool) -> dict[str, torch.Tensor]:
    """What :func:`_stat_hooks` stored, by ``site/quantity`` as :func:`reference_statistics`
    names it."""
    got = {}
    for site, *values in store:
        if site.endswith(":g"):
            got[f"{site[:-2]}/grad_y_norm_mean"] = values[0]
        else:
            names = ("x_norm", "f_norm", "y_norm", "batch_mean", "batch_var")
            got |= {f"{site}/{q}": v.detach().clone() for q, v in zip(names, values)}
    return got


def _grad_hooks(net, blocks, outs: dict, grads: dict):
    """Hand-written hooks keeping each block output (detached, uncopied) and, once the backward
    pass reaches it, its gradient."""

    def hook(mod, a, o, n):
        outs[n] = o.detach()
        if o.requires_grad:
            o.register_hook(lambda g: grads.__setitem__(n, g))

    return [
        _module(net, name).register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n))
        for name in blocks
    ]


def unprobed_pass(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, grad: bool) -> None:
    """One unprobed pass: a forward without autograd, or with ``grad`` forward and backward to
    the input's gradient (what a capture of gradient statistics runs besides its probes)."""
    if grad:
        inp = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(inp), y), [inp])
    else:
        with torch.no_grad():
            net(x)


def make_pass(model: str, row: str, method: str, tmp: Path):
    """(setup -> fn running one probed pass, teardown, captured block outputs of the first pass)."""
    net, blocks, x, y = build(model)
    if row == "grads":
        # gradients with respect to the input only, for every method and the unprobed pass
        # alike: nnsight's backward is loss.backward(), which would also fill every weight's
        # .grad were the weights trainable
        net.requires_grad_(False)
    captured: list = []
    need_grad = row in ("grad", "grads")
    batches = STREAM if row == "stream" else 1

    def unprobed():
        if batches > 1:
            with torch.no_grad():
                for _ in range(batches):
                    net(x)
        else:
            unprobed_pass(net, x, y, need_grad)

    if method == "unprobed":
        return unprobed, lambda: None, lambda: None
    if method == "raw_write":  # the same bytes a dump of every block output writes, in fp32
        nbytes = batches * sum(t.numel() * 4 for t in reference_outputs(model))
        buf = np.random.default_rng(0).bytes(nbytes)

        def write():
            with open(tmp / "raw.bin", "wb") as fh:
                fh.write(buf)
                fh.flush()
                os.fsync(fh.fileno())

        return write, lambda: None, lambda: None

    if method == "raw_thread":  # the floor of any dump: bytes out on a thread beside the model
        import queue
        import threading

        store = _HandOff(queue.Queue())
        hs = _hooks(net, blocks, store, model=model)
        state = {"i": 0}

        def fn():
            path = tmp / f"flat-{state['i']}.bin"
            with open(path, "wb", buffering=0) as fh:
                writer = threading.Thread(target=_drain, args=(store.q, fh))
                writer.start()
                for _ in range(batches):
                    with torch.no_grad():
                        net(x)
                store.q.put(None)
                writer.join()
                os.fsync(fh.fileno())
            os.remove(path)
            state["i"] += 1

        return fn, lambda: [h.remove() for h in hs], lambda: None
    if method == "hooks_h5py" and row == "stream":  # one file, datasets filled batch by batch
        import h5py

        store: list = []
        hs = _hooks(net, blocks, store, model=model)
        state = {"i": 0}

        def fn():
            path = tmp / f"hooks-{state['i']}.h5"
            with h5py.File(path, "w") as f:
                for b in range(batches):
                    store.clear()
                    with torch.no_grad():
                        net(x)
                    for n, t in store:
                        if b == 0:
                            f.create_dataset(n, (batches * len(t), *t.shape[1:]), "f4")
                        f[n][b * len(t) : (b + 1) * len(t)] = t.numpy()
                    if not captured:
                        captured.extend(t.clone() for _, t in store)
                f.flush()
                os.fsync(f.id.get_vfd_handle())
            os.remove(path)
            state["i"] += 1

        return fn, lambda: [h.remove() for h in hs], lambda: captured
    if method in ("hooks", "hooks_clone", "hooks_h5py") and row in ("out", "io", "disk"):
        store: list = []
        hs = _hooks(
            net,
            blocks,
            store,
            clone=method == "hooks_clone",
            what="io" if row == "io" else "out",
            model=model,
        )
        state = {"i": 0}

        def fn():
            store.clear()
            with torch.no_grad():
                net(x)
            if method == "hooks_h5py":
                import h5py

                with h5py.File(tmp / f"hooks-{state['i']}.h5", "w") as f:
                    for n, t in store:
                        f.create_dataset(n, data=t.numpy())
                    f.flush()  # on the disk, as raw_write and resprobe leave their bytes
                    os.fsync(f.id.get_vfd_handle())
                os.remove(tmp / f"hooks-{state['i']}.h5")
            if not captured:  # block outputs; in the io row x, F(x), y of each block
                captured.extend(t.clone() for n, t in store if row == "io" or ":" not in n)
            state["i"] += 1

        return fn, lambda: [h.remove() for h in hs], lambda: captured
    if method == "hooks" and row == "grads":
        outs: dict = {}
        grads: dict = {}
        hs = _grad_hooks(net, blocks, outs, grads)

        def fn():
            inp = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(net(inp), y, reduction="sum"), [inp])
            if not captured:
                captured.extend(t for n in blocks for t in (outs[n], grads[n]))
            outs.clear()
            grads.clear()

        return fn, lambda: [h.remove() for h in hs], lambda: captured
    if method == "hooks":  # stats / grad rows
        store = []
        hs = _stat_hooks(net, blocks, store, model, grads=need_grad)

        def fn():
            store.clear()
            unprobed()  # the same pass, now with the statistics hooks on
            if not captured:
                captured.append(_stats_captured(store, need_grad))

        return fn, lambda: [h.remove() for h in hs], lambda: captured[0] if captured else None
    if method == "nnsight":
        from nnsight import NNsight

        wrapped = NNsight(net)  # in the grads row its weights are frozen (above)
        mods = [_envoy(wrapped, n) for n in blocks]
        branch = "branch" if model == "zoo" else "bn3"

        def fn():
            saved = []
            with torch.no_grad(), wrapped.trace(x):
                for m in mods:  # nnsight reads values in execution order: x, F(x), y
                    if row == "io" and model == "vit":  # two sites (see _vit_io_hooks)
                        saved.append(m.input.save())
                        saved.append(m.drop_path1.output.save())
                        y0 = m.norm2.input.save()
                        saved += [y0, y0, m.drop_path2.output.save()]
                    elif row == "io":
                        saved.append(m.input.save())
                        f = getattr(m, branch).output
                        # torchvision's bottleneck adds into F(x) in place (see reference_io)
                        saved.append((f.clone() if model == "tv" else f).save())
                    saved.append(m.output.save())
            if not captured:
                captured.extend(saved)

        def fn_grads():
            inp = x.detach().requires_grad_(True)
            outs, grads = [], []
            with wrapped.trace(inp):
                ys = [m.output for m in mods]
                for t in ys:
                    outs.append(t.save())
                loss = F.cross_entropy(wrapped.output, y, reduction="sum")
                with loss.backward():  # gradients arrive in reverse forward order
                    for t in reversed(ys):
                        grads.append(t.grad.save())
            if not captured:
                captured.extend(t for pair in zip(outs, reversed(grads)) for t in pair)

        return fn_grads if row == "grads" else fn, lambda: None, lambda: captured
    if method == "captum":
        from captum.attr import LayerActivation

        la = LayerActivation(net, [_module(net, n) for n in blocks])

        def fn():
            with torch.no_grad():
                outs = la.attribute(x)
            if not captured:
                captured.extend(outs)

        return fn, lambda: None, lambda: captured
    if method == "torchlens":
        import torchlens as tl

        def fn():
            with torch.no_grad():
                trace = tl.trace(net, x)  # saves every op's output (its default)
            if not captured:
                captured.extend(trace[n].out.detach().clone() for n in blocks)
            del trace

        return fn, lambda: None, lambda: captured
    if method in ("resprobe", "resprobe_fused", "resprobe_torch", UNCHECKED):
        import probe
        from probe.conformance import RawSites

        fused = method == "resprobe_fused"  # compiled statistics; warm-up pays the compilation
        # only what a method asks for: a tree of resprobe from before the fused statistics or
        # the one-pass kernels (on PYTHONPATH, timed "before" by this script) has neither
        kw = {"fused": True} if fused else {}
        stats = [probe.ResidualNorms(**kw), probe.ChannelStats(**kw)]
        switch = _onepass_switch()

        def formulas():
            # read at each call: one process may time both ways head to head (--versus)
            if switch is not None:
                os.environ[switch] = "0" if method == "resprobe_torch" else "1"

        probes = {
            "out": [probe.Activations(dtype="fp32")],
            "io": [RawSites()],
            "disk": [probe.Activations(dtype="fp32")],
            "stream": [probe.Activations(dtype="fp32")],
            "stats": stats,
            "stats_disk": stats,
            "grad": [*stats, probe.GradNorms()],
            "grads": [probe.Activations(dtype="fp32"), probe.Gradients(dtype="fp32")],
        }[row]

        def sites(layers):
            """resprobe's residual sites: a ResNet's blocks, a ViT block's ``#0`` and ``#1``
            (its layer ``blocks.i`` is the block as a whole)."""
            return [n for n in layers if model != "vit" or "#" in n]

        # The rows of block outputs take a ViT block's second site alone (``blocks.i#1``, whose
        # y is the block's output): ``blocks.i`` would add the block as a whole and its first
        # site, three times the tensors the peers keep. The others take the blocks.
        outputs_only = model == "vit" and row in ("out", "disk", "stream", "grads")
        layers = [f"{b}#1" for b in blocks] if outputs_only else blocks

        if row in ("disk", "stream", "stats_disk"):
            state = {"i": 0}

            def fn():
                formulas()
                path = tmp / f"rp-{state['i']}.h5"
                cap = probe.capture(
                    net, [(x, y)] * batches, layers=layers, probes=probes, out=path, name=model
                )
                if not captured:
                    n_rows = len(x)  # the first batch's rows
                    if row == "stats_disk":
                        captured.append(_resprobe_stats(cap.read, sites(cap.layers), False))
                    else:
                        captured.extend(
                            torch.from_numpy(cap.read(n, "output")[:n_rows]) for n in layers
                        )
                cap.close()
                os.remove(path)
                state["i"] += 1

            return fn, lambda: None, lambda: captured[0] if row == "stats_disk" else captured
        session = probe.HookSession(net, layers, probes).__enter__()
        if method == UNCHECKED:  # what the non-finite counts cost: this session counts none
            session._nonfinite.add = session._nonfinite.add_block = lambda *a, **k: None

        def fn():
            formulas()
            res, _ = session.run_batch(x, y)
            if not captured and row in ("stats", "grad"):
                get = lambda site, q: res[site][q]  # noqa: E731
                captured.append(_resprobe_stats(get, sites(res), row == "grad"))
            elif not captured:
                keys = {
                    "out": ("output",),
                    "io": ("X", "F", "Y"),
                    "grads": ("output", "grad_output"),
                }[row]
                kept = sites(res) if row == "io" else layers  # a ViT's io: its 24 sites
                captured.extend(res[n][k] for n in kept for k in keys)

        return fn, session.close, lambda: captured[0] if row in ("stats", "grad") else captured
    raise SystemExit(f"no method {method!r} for row {row!r}")


def _onepass_switch() -> str | None:
    """The environment variable that turns the one-pass statistics kernels off, or None in a tree
    of resprobe from before them."""
    if importlib.util.find_spec("probe.probes.onepass") is None:
        return None
    return importlib.import_module("probe.probes.onepass").ENV


def _resprobe_stats(read, sites: list[str], grads: bool) -> dict[str, torch.Tensor]:
    """resprobe's statistics of ``sites`` by ``site/quantity`` (``read(site, quantity)``: the
    session's results or a file's datasets) for the reference check."""
    names = ["x_norm", "f_norm", "y_norm", "channel_mean", "channel_var"]
    names += ["grad_y_norm"] if grads else []
    return {f"{s}/{q}": torch.as_tensor(read(s, q)).clone() for s in sites for q in names}


def worker(
    model: str, row: str, methods: list[str], repeats: int, warmup: int, out: str, allocator: str
) -> None:
    """Time ``methods`` (one, or several head to head) in this process, interleaved with an
    unprobed twin; write each method's result to ``out`` (JSON, by method)."""
    if allocator == "tuned":  # the same process settings for every method, baseline included
        import probe.runtime

        getattr(probe.runtime, "tune_allocator", lambda: None)()
    with tempfile.TemporaryDirectory() as d:
        passes = {m: make_pass(model, row, m, Path(d)) for m in methods}
        # The same unprobed pass on a twin of the model (same seed, same weights, no hooks),
        # timed alternately with the method: their ratio, pair by pair, is immune to the drift
        # between processes that the start/end baselines only bound.
        timed = {m: fn for m, (fn, _, _) in passes.items()}
        if methods != ["unprobed"]:
            timed[TWIN] = make_pass(model, row, "unprobed", Path(d))[0]
        order = list(timed)
        times: dict[str, list[float]] = {m: [] for m in order}
        try:
            for _ in range(warmup):
                for fn in timed.values():
                    fn()
            for r in range(repeats):
                # each round starts one further along: no method always follows the same one
                for m in order[r % len(order) :] + order[: r % len(order)]:
                    t0 = time.perf_counter()
                    timed[m]()
                    times[m].append((time.perf_counter() - t0) * 1e3)
        finally:
            for _, teardown, _ in passes.values():
                teardown()
        base = times.get(TWIN)
        results = {}
        for m, (_, _, captured) in passes.items():
            result = {"ms": statistics.median(times[m]), "times": times[m]}
            if base:
                result["paired"] = statistics.median(t / b for t, b in zip(times[m], base))
                result["paired_base_ms"] = statistics.median(base)
                if len(base) > 1:  # one round has no interval (the smoke runs of the tests)
                    result["paired_ci"] = list(ratio_ci(times[m], base)[1:])
            got = captured()
            if isinstance(got, dict):  # statistics by site/quantity
                result["ref_error"] = _stats_error(got, reference_statistics(model))
                result["ref_blocks"] = len(got)
                result["ref_tolerance"] = STATS_TOLERANCE
            elif got:
                ref = {"io": reference_io, "grads": reference_output_grads}.get(
                    row, reference_outputs
                )(model)
                errs = [_rel_error(g, r) for g, r in zip(got, ref)]
                result["ref_error"] = max(errs) if len(got) == len(ref) else float("inf")
                result["ref_blocks"] = len(got)
            results[m] = result
        Path(out).write_text(json.dumps(results))


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||; infinite for a tensor of another shape (a wrong one)."""
    if got.shape != ref.shape:
        return float("inf")
    return float((got.detach().to(ref.dtype) - ref).norm() / ref.norm())


def _stats_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The largest :func:`_rel_error` of a method's statistics against the reference's; infinite
    when a quantity is not the reference's or a residual site is missing (every site counts)."""
    sites = {k.split("/")[0] for k in ref}
    if not got or set(got) - set(ref) or {k.split("/")[0] for k in got} != sites:
        return float("inf")
    return max(_rel_error(v, ref[k]) for k, v in got.items())


def judge(ci: tuple[float, float], bound: float) -> str:
    """Whether a ratio whose 95 % interval is ``ci`` meets the target ``bound``: "met" where the
    whole interval lies at or under it, "missed" where it lies above, else "within the noise"
    (a single run cannot tell; a longer run, ``--repeats``, narrows the interval).

    Example:
        >>> judge((1.02, 1.04), 1.05), judge((1.07, 1.09), 1.05), judge((1.03, 1.07), 1.05)
        ('met', 'missed', 'within the noise')
    """
    lo, hi = ci
    return "met" if hi <= bound else "missed" if lo > bound else "within the noise"


def targets(row: str, results: dict[str, dict]) -> dict[str, str]:
    """resprobe's verdicts in ``row`` against the targets (:data:`TARGETS`, :data:`DUMP_TARGET`),
    from the methods' ``results`` of one run: {target: verdict}. Empty where the row has no
    target, resprobe did not run, or its rounds were too few for an interval; a dump's target
    needs raw_write's ratio and block outputs' comparison with nnsight needs nnsight's, each
    from the same run.

    Example:
        >>> targets("io", {"resprobe": {"paired": 1.08, "paired_ci": [1.06, 1.09]}})
        {'<= 1.10': 'met'}
    """
    r = results.get("resprobe", {})
    ci = r.get("paired_ci")
    if ci is None:
        return {}
    out = {}
    if row in TARGETS:
        out[f"<= {TARGETS[row]:.2f}"] = judge(ci, TARGETS[row])
    raw = results.get("raw_write", {}).get("paired")
    if row in ("disk", "stream") and raw is not None:
        bound = DUMP_TARGET * max(1.0, raw)
        out[f"<= {DUMP_TARGET:.2f} x max(forward, raw write) = {bound:.2f}"] = judge(ci, bound)
    peer = results.get("nnsight", {}).get("paired_ci")
    if row == "out" and peer is not None:
        # two intervals, each against its own unprobed twin: apart, or overlapping
        apart = "met" if ci[1] < peer[0] else "missed" if ci[0] > peer[1] else "within the noise"
        out["<= nnsight"] = apart
    return out


def ratio_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median of the round-by-round ratios a/b and its percentile bootstrap confidence interval
    (scipy; BCa's acceleration is undefined for a median of tied values): whether one method is
    faster than another timed beside it, or within the noise.

    Example:
        >>> med, lo, hi = ratio_ci([1.0, 1.1, 0.9, 1.02, 1.05, 0.95, 0.97], [1.0] * 7)
        >>> round(med, 2), lo < 1 < hi
        (1.0, True)
    """
    from scipy.stats import bootstrap

    r = np.asarray(a, float) / np.asarray(b, float)
    ci = bootstrap(
        (r,),
        np.median,
        confidence_level=level,
        n_resamples=2000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    return float(np.median(r)), float(ci.low), float(ci.high)


# --------------------------------------------------------------------------- the parent
def _run(model, row, method, args) -> dict:
    """One method's result, measured in a fresh process; ``method`` may name several, joined
    by commas, timed head to head in that one process (then: a result per method)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.compare",
        "--worker",
        model,
        row,
        method,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--json",
        path,
        "--allocator",
        args.allocator,
        "--warmup",
        str(args.warmup),
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    res = json.loads(Path(path).read_text())
    os.remove(path)
    return res if "," in method else res[method]


def _models(names: str):
    """The models of ``--models`` that can run, each announced by a heading (one whose package,
    torchvision or timm, is not installed is skipped with a note)."""
    for model in names.split(","):
        package = MODEL_PACKAGES.get(model)
        if package is not None and importlib.util.find_spec(package) is None:
            print(f"\n## {MODELS[model][0]}: skipped ({package} is not installed)")
            continue
        print(f"\n## {MODELS[model][0]}, batch {MODELS[model][1]}")
        yield model


def _check(r: dict) -> str:
    """The reference check of what a method captured (block outputs; x, F, y in the io row;
    outputs and their gradients in the grads row)."""
    if "ref_error" not in r:
        return ""
    verdict = "ok" if r["ref_error"] < r.get("ref_tolerance", TENSOR_TOLERANCE) else "WRONG"
    return f"{verdict} (max rel. error {r['ref_error']:.1e}, {r['ref_blocks']} tensors)"


def versus(args) -> None:
    """Two methods head to head: per row, one process times both and an unprobed twin in
    rotating order, so the drift between processes (which the paired ratios of separate
    workers still carry, a few percent here) cannot decide which is faster."""
    a, b = args.versus.split(",")
    for m in (a, b):
        if m in PEERS and importlib.util.find_spec(PEERS[m]) is None:
            raise SystemExit(f"--versus {args.versus}: {PEERS[m]} is not installed")
    print(
        f"# {a} against {b}, head to head in one process per row; torch {torch.__version__}, "
        f"CPU, {args.threads} threads, {args.repeats} rounds, allocator {args.allocator}"
    )
    report = {"versus": [a, b], "threads": args.threads, "repeats": args.repeats, "models": {}}
    for model in _models(args.models):
        print(
            f"{'row':48s} {a + ' ms':>14s} {b + ' ms':>14s} {'paired':>13s} "
            f"{a + '/' + b + ' [95% CI]':>30s}  verdict; reference checks"
        )
        report["models"][model] = rows = {}
        for row in args.rows.split(","):
            title, methods = ROWS[row]
            allowed = methods + ([UNCHECKED] if "resprobe" in methods else [])
            if a not in allowed or b not in allowed:
                continue
            res = _run(model, row, f"{a},{b}", args)
            if "error" in res:
                print(f"{title:48s} failed: {res['error']}")
                continue
            ra, rb = res[a], res[b]
            med, lo, hi = ratio_ci(ra["times"], rb["times"])
            verdict = "faster" if hi < 1 else "slower" if lo > 1 else "within the noise"
            rows[row] = {"title": title, a: ra, b: rb, "ratio": med, "ci95": [lo, hi]}
            paired = f"{ra['paired']:.2f} / {rb['paired']:.2f}"
            print(
                f"{title:48s} {ra['ms']:14.1f} {rb['ms']:14.1f} {paired:>13s} "
                f"{f'{med:.3f} [{lo:.3f}, {hi:.3f}]':>30s}  {verdict}; "
                f"{_check(ra) or '–'}; {_check(rb) or '–'}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="zoo,tv")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--methods", default="", help="only these methods (plus the baselines)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--allocator",
        default="tuned",
        choices=["tuned", "default"],
        help="tuned: probe.runtime.tune_allocator() in every worker (what the CLI does)",
    )
    ap.add_argument(
        "--versus",
        default="",
        metavar="A,B",
        help="time two methods head to head in one process per row (rounds interleaved with "
        "an unprobed twin) and give A/B with a 95%% bootstrap interval",
    )
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "ROW", "METHODS"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        model, row, methods = args.worker
        worker(model, row, methods.split(","), args.repeats, args.warmup, args.json, args.allocator)
        return
    if args.versus:
        versus(args)
        return
    only = set(filter(None, args.methods.split(",")))
    print(
        f"# resprobe against its peers; torch {torch.__version__}, CPU, {args.threads} threads, "
        f"median of {args.repeats}, allocator {args.allocator}"
    )
    report = {
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "models": {},
    }
    for model in _models(args.models):
        print(
            f"{'row':48s} {'method':14s} {'ms':>9s} {'ratio':>7s} {'paired':>7s} "
            f"{'paired 95% CI':>16s}  reference check"
        )
        report["models"][model] = rows = {}
        for row in args.rows.split(","):
            title, methods = ROWS[row]
            base = [_run(model, row, "unprobed", args)]
            out = {}
            for method in methods:
                if only and method not in only:
                    continue
                if method in PEERS and importlib.util.find_spec(PEERS[method]) is None:
                    out[method] = {"skipped": f"{PEERS[method]} is not installed"}
                    continue
                out[method] = _run(model, row, method, args)
            base.append(_run(model, row, "unprobed", args))
            b = [r["ms"] for r in base if "ms" in r]
            floor = abs(b[0] - b[-1]) / statistics.mean(b) if len(b) == 2 else float("nan")
            rows[row] = {"title": title, "unprobed_ms": b, "noise_floor": floor, "methods": out}
            print(
                f"{title:48s} {'unprobed':14s} {statistics.mean(b):9.1f} {1:7.2f} {'':7s}  (start/end {b[0]:.1f}/{b[-1]:.1f}, noise ±{100 * floor:.1f}%)"
            )
            for method, r in out.items():
                if "ms" not in r:
                    print(
                        f"{'':48s} {method:14s} {'–':>9s} {'–':>7s} {'–':>7s}  {r.get('skipped') or r.get('error')}"
                    )
                    continue
                r["ratio"] = r["ms"] / statistics.mean(b)
                check = _check(r)
                paired = f"{r['paired']:7.2f}" if "paired" in r else f"{'–':>7s}"
                ci = r.get("paired_ci")
                ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "–"
                print(
                    f"{'':48s} {method:14s} {r['ms']:9.1f} {r['ratio']:7.2f} {paired} {ci:>16s}"
                    f"  {check}"
                )
            rows[row]["targets"] = verdicts = targets(row, out)
            for target, verdict in verdicts.items():
                print(f"{'':48s} resprobe {target}: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
