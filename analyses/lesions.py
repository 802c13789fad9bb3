"""Lesion studies (Veit, Wilber & Belongie, NeurIPS 2016): delete blocks at test time and re-measure.

Deleting a block removes its residual branch: the block runs as usual with F(x) replaced by zeros,
so y = act(lambda * S(x)) -- the post-addition activation, the shortcut scale lambda and a
projection (option-B) shortcut all stay, as in Veit et al.'s Sec. 4 (the path through F is
dropped, the skip path kept). Blocks of any other model (torchvision, timm, yours) are deleted at
their residual adds (:mod:`probe.hooks.sites`): every add's branch operand is replaced by zeros,
after DropPath and layer scale, and whatever the block does after the addition stays. A plain zoo pseudo-block has no addition; it is replaced by the map
its residual counterpart falls back to, act(lambda * S(x)), so both nets lose the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from analyses.stats import seed_ci
from analyses.tidy import frame, nan_ci, row, stage_of
from probe.errors import ProbeError
from probe.hooks.residual import find_blocks
from probe.hooks.sites import SiteTracer
from probe.zoo.cifar_resnet import BasicBlock

__all__ = ["Deleted", "deleted", "error_rate", "lesion_study", "checkpoint_lesions"]


class Deleted(nn.Module):
    """Stands in for a deleted block: the block's own forward with its branch output F(x) = 0.

    Example:
        >>> from probe.zoo import BasicBlock
        >>> block = BasicBlock(4, 4).eval()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> bool(torch.equal(Deleted(block, block.branch)(x), torch.relu(x)))  # act(S(x) + 0)
        True
    """

    def __init__(self, block: nn.Module, branch: nn.Module | None) -> None:
        super().__init__()
        self.original = block
        self._branch = (branch,)  # a tuple: the branch is a submodule of ``original`` already

    def forward(self, *args: object, **kwargs: object) -> object:
        block = self.original
        if isinstance(block, BasicBlock) and not block.residual:
            (x,) = args
            return block.act(block.shortcut_scale * block.shortcut(x))
        if self._branch[0] is None:  # any model: every residual add of the block gets F = 0
            tracer = SiteTracer(lambda call, output: None, zero_branches=True)
            with tracer.attach({"": block}):
                out = block(*args, **kwargs)
            if tracer.last_shortcut is None:
                raise ProbeError(
                    f"{type(block).__name__} ran no residual add (y = S(x) + F(x)), so there is no "
                    "branch to delete; lesions apply to the residual sites probe.discover_sites finds."
                )
            return out
        handle = self._branch[0].register_forward_hook(_zeros)
        try:
            return block(*args, **kwargs)
        finally:
            handle.remove()


def _zeros(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)  # a fresh tensor: later in-place adds (out += x) are safe


@contextlib.contextmanager
def deleted(model: nn.Module, names: Iterable[str]):
    """Temporarily delete the named blocks (branch F removed, see :class:`Deleted`); always
    restores the model.

    Example:
        >>> from probe.zoo import create
        >>> net = create("resnet20").eval()
        >>> with deleted(net, ["stages.0.1"]):
        ...     type(net.stages[0][1]).__name__
        'Deleted'
        >>> type(net.stages[0][1]).__name__
        'BasicBlock'
    """
    specs = {n: s for n, _, s in find_blocks(model)[0]}
    swapped = []
    try:
        for name in names:
            if specs and name not in specs:
                raise ProbeError(
                    f"{name!r} is not a recognised block; blocks: {', '.join(list(specs)[:6])} ..."
                )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if child not in parent._modules:
                raise ProbeError(f"{type(model).__name__} has no module {name!r}.")
            block = parent._modules[child]
            # Adapter blocks name their branch; any other block is deleted at its residual adds.
            branch = specs[name].resolve(block)[0] if specs else None
            parent._modules[child] = Deleted(block, branch)
            swapped.append((parent, child, block))
        yield model
    finally:
        for parent, child, block in reversed(swapped):
            parent._modules[child] = block


@torch.no_grad()
def error_rate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 error of ``model`` in eval mode over (x, y, ...) batches; restores the mode."""
    was = model.training
    model.eval()
    wrong = total = 0
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            wrong += int((model(x).argmax(1) != y).sum())
            total += len(y)
    finally:
        model.train(was)
    return wrong / max(total, 1)


def lesion_study(
    model: nn.Module,
    loader: Sequence,
    key: dict,
    n_random: Sequence[int] = (2, 4),
    repeats: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Test error with each single block deleted, and with k random non-downsampling blocks deleted.

    Rows: quantity ``lesion_error`` per block (layer = block name), ``lesion_random_error`` per k
    (layer = 'random', layer_index = k, CI over ``repeats`` draws) and ``lesion_baseline``.
    """
    blocks = [n for n, _, _ in find_blocks(model)[0]]
    if not blocks:
        raise ProbeError(
            "Lesions need recognised residual blocks (zoo, torchvision or registered)."
        )
    base = error_rate(model, loader)
    rows = [row(key, "none", -1, -1, "lesion_baseline", nan_ci(base))]
    downsampling = set()
    for i, name in enumerate(blocks):
        block = model.get_submodule(name)
        shortcut = find_blocks(model)[0][i][2].resolve(block)[1]
        if shortcut is not None and not isinstance(shortcut, nn.Identity):
            downsampling.add(name)
        with deleted(model, [name]):
            err = error_rate(model, loader)
        rows.append(row(key, name, i, stage_of(name), "lesion_error", nan_ci(err)))
    rng = np.random.default_rng(seed)
    plain_blocks = [b for b in blocks if b not in downsampling]
    for k in n_random:
        if k > len(plain_blocks):
            continue
        errs = []
        for _ in range(repeats):
            chosen = list(rng.choice(plain_blocks, size=k, replace=False))
            with deleted(model, chosen):
                errs.append(error_rate(model, loader))
        rows.append(row(key, "random", k, -1, "lesion_random_error", seed_ci(np.array(errs))))
    df = frame(rows)
    df["downsampling"] = df["layer"].isin(downsampling)
    return df


def checkpoint_lesions(
    checkpoint: str,
    key: dict,
    data=None,
    device: str = "cpu",
    seed: int = 0,
    limit: int | None = None,
) -> pd.DataFrame:
    """:func:`lesion_study` of a saved checkpoint on the test split of ``data`` (default: the
    dataset it was trained on), or on its first ``limit`` test images."""
    from probe.loading import capture_loader, dataset_for, load_for_capture

    model, meta, _ = load_for_capture(checkpoint, device)
    data = data if data is not None else dataset_for(meta, None)
    loader = list(capture_loader(data, "test", 1024, next(model.parameters()).device, limit))
    return lesion_study(model, loader, key, seed=seed)
