"""Identity constructions for the zoo's nets: blocks that compute their own input.

He et al. (2016, Sec. 1) argue that a deeper plain net has a solution at least as good as a
shallower one: "the added layers are identity mapping, and the other layers are copied from the
learned shallower model". These functions build that solution literally.

* :func:`dirac_`: Dirac ("delta") kernels in every block convolution, so each conv passes its input
  through (Zagoruyko & Komodakis 2017, DiracNets; Xiao et al. 2018 use the orthogonal form). A
  widening conv (c -> 2c) copies input channel ``j mod c`` to output ``j``: on the non-negative
  input of a post-activation block every channel then carries signal, where the zero-padding of
  option-A shortcuts would leave channels that a ReLU keeps at zero gradient for ever.
* :func:`identity_blocks_`: make chosen blocks compute y = x on the data. Plain blocks get Dirac
  convolutions and BatchNorms set from the measured statistics (mean m, biased variance v, averaged
  over training batches) of their inputs: gamma = sqrt(v + eps), beta = m, running statistics (m, v).
  In eval mode that is the identity exactly, for any input. In train mode BN normalises with the
  batch's own statistics, so the block deviates from the identity by their sampling error
  (relative size ~ 1/sqrt(batch x H x W); measured and returned by :func:`construct_deeper_`).
  Residual blocks get a zero last branch scale, F = 0 in both modes, y = act(x) = x.
* :func:`construct_deeper_`: the first blocks of each stage carry a trained shallower net's
  weights; the extra blocks at the end of each stage are identities.

Post-activation blocks only: a pre-activation block starts with ReLU(BN(x)) on a signed input,
which no setting of its parameters makes the identity.

Example:
    >>> from probe.zoo import create
    >>> shallow, deep = create("plain8", in_channels=1), create("plain20", in_channels=1)
    >>> batches = [torch.randn(32, 1, 8, 8) for _ in range(4)]
    >>> report = construct_deeper_(deep, shallow.eval(), batches)
    >>> x = torch.randn(5, 1, 8, 8)
    >>> bool(torch.allclose(deep.eval()(x), shallow(x), atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from probe.errors import ProbeError
from probe.zoo.cifar_resnet import BasicBlock, CifarResNet

__all__ = [
    "dirac_",
    "identity_blocks_",
    "construct_deeper_",
    "Construction",
    "check_constructible",
    "check_postact",
]


def _dirac_kernel_(conv: nn.Conv2d) -> None:
    """Identity kernel; output channel j reads input channel j mod c_in (a copy when widening)."""
    c_out, c_in, kh, kw = conv.weight.shape
    if kh % 2 == 0 or kw % 2 == 0 or conv.groups != 1 or c_out < c_in:
        raise ProbeError(
            f"A Dirac kernel needs an odd kernel, groups=1 and c_out >= c_in; got {tuple(conv.weight.shape)}, "
            f"groups={conv.groups}."
        )
    with torch.no_grad():
        conv.weight.zero_()
        j = torch.arange(c_out)
        conv.weight[j, j % c_in, kh // 2, kw // 2] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()


def check_postact(blocks: Sequence[BasicBlock]) -> None:
    """Raise unless every block is post-activation (the constructions need ReLU after the add)."""
    pre = [b for b in blocks if b.preact]
    if pre:
        raise ProbeError(
            "Identity constructions need post-activation blocks (conv-BN-ReLU): a pre-activation "
            "block applies ReLU(BN(x)) to a signed input, which no parameters make the identity. "
            "Use the 'plain'/'resnet' families."
        )


def dirac_(model: CifarResNet) -> CifarResNet:
    """Dirac kernels in every block convolution (stem, shortcuts and classifier keep theirs).

    BatchNorms keep their default scale 1 and shift 0, so in train mode each conv-BN-ReLU is
    ReLU(standardise(x)), not the identity; :func:`identity_blocks_` also sets the BNs.

    Example:
        >>> from probe.zoo import create
        >>> net = dirac_(create("plain8"))
        >>> int(net.stages[0][0].branch.conv1.weight.sum()), net.stages[0][0].branch.conv1.weight.shape[0]
        (16, 16)
    """
    blocks = model.blocks()
    check_postact(blocks)
    for block in blocks:
        for conv in (block.branch.conv1, block.branch.conv2):
            _dirac_kernel_(conv)
    return model


@contextlib.contextmanager
def _kept_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running statistics, counters) after a train-mode pass."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    was = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])
        model.train(was)


@torch.no_grad()
def identity_blocks_(
    model: CifarResNet, blocks: Sequence[BasicBlock], batches: Iterable[torch.Tensor]
) -> None:
    """Make ``blocks`` of ``model`` compute y = x on the data of ``batches`` (see the module doc).

    The statistics of each block's BatchNorm inputs are measured in one train-mode pass over
    ``batches`` (the batch size of training, so that they are the statistics BN will see), with
    every block of ``blocks`` already acting as the identity; the other layers' running statistics
    are left as they were.
    """
    check_postact(blocks)
    if not blocks:
        return
    plain = [b for b in blocks if not b.residual]
    for b in plain:
        for conv in (b.branch.conv1, b.branch.conv2):
            _dirac_kernel_(conv)
    for b in blocks:
        if b.residual:
            b.zero_init_()
    identity = {id(m) for b in plain for m in (b.branch.bn1, b.branch.bn2)}
    bns = [m for b in blocks for m in b.branch if isinstance(m, nn.BatchNorm2d)]
    sums = {id(m): [0, 0.0, 0.0] for m in bns}  # batches, sum of batch means, of batch variances

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = inputs[0].double()  # [N, C, H, W]
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        s = sums[id(module)]
        s[0], s[1], s[2] = s[0] + 1, s[1] + mean, s[2] + var
        return inputs[0] if id(module) in identity else None  # identity while measuring

    handles = [m.register_forward_hook(record) for m in bns]
    try:
        with _kept_buffers(model):
            model.train()
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    for m in bns:
        n, mean_sum, var_sum = sums[id(m)]
        if n == 0:
            raise ProbeError("identity_blocks_ needs at least one batch of data; got none.")
        mean, var = (mean_sum / n).float(), (var_sum / n).float()
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if id(m) in identity:
            m.weight.copy_(torch.sqrt(var + m.eps))
            m.bias.copy_(mean)


@dataclass(frozen=True)
class Construction:
    """What :func:`construct_deeper_` built and how exact it is."""

    copied: tuple[str, ...]  # block names carrying the shallow net's weights
    extra: tuple[str, ...]  # block names set to the identity
    eval_max_abs_diff: float  # max |logits(deep) - logits(shallow)|, eval mode, on the batches
    train_rel_diff: float  # ||logits(deep) - logits(shallow)|| / ||logits(shallow)||, train mode

    def to_dict(self) -> dict:
        return {
            "copied": list(self.copied),
            "extra": list(self.extra),
            "eval_max_abs_diff": self.eval_max_abs_diff,
            "train_rel_diff": self.train_rel_diff,
        }


def check_constructible(deep: CifarResNet, shallow: CifarResNet) -> None:
    """Raise unless ``deep`` can hold ``shallow``: deeper, and equal in every other option."""
    a, b = deep.config.to_dict(), shallow.config.to_dict()
    differ = sorted(k for k in a if k not in ("depth", "zero_init") and a[k] != b[k])
    if differ:
        raise ProbeError(
            f"Cannot construct {deep.config.depth}-layer net from the {shallow.config.depth}-layer "
            f"one: they differ in {', '.join(f'{k} ({b[k]!r} vs {a[k]!r})' for k in differ)}; only "
            "the depth may differ."
        )
    if deep.config.depth <= shallow.config.depth:
        raise ProbeError(
            f"The constructed net must be deeper than the shallow one; got depth {deep.config.depth} "
            f"from depth {shallow.config.depth}."
        )


@torch.no_grad()
def construct_deeper_(
    deep: CifarResNet, shallow: CifarResNet, batches: Iterable[torch.Tensor]
) -> Construction:
    """Copy ``shallow`` into the first blocks of each stage of ``deep``; the rest become identities.

    Stage s of the deep net holds n_D blocks; its first n_S (including the downsampling block)
    take the shallow net's stage-s blocks, the last n_D - n_S are set by :func:`identity_blocks_`.
    Stem and head are copied. Raises :class:`ProbeError` if the result differs from ``shallow`` in
    eval mode by more than float32 rounding on ``batches``.
    """
    check_constructible(deep, shallow)
    check_postact(deep.blocks())
    batches = list(batches)
    if not batches:
        raise ProbeError("construct_deeper_ needs at least one batch of data; got none.")
    n_s = shallow.config.blocks_per_stage
    deep.stem.load_state_dict(shallow.stem.state_dict())
    deep.head.load_state_dict(shallow.head.state_dict())
    names = {m: n for n, m in deep.named_modules()}
    copied, extra = [], []
    for stage_d, stage_s in zip(deep.stages, shallow.stages):
        for b, block in enumerate(stage_d):
            if b < n_s:
                block.load_state_dict(stage_s[b].state_dict())
                copied.append(block)
            else:
                extra.append(block)
    identity_blocks_(deep, extra, batches)
    was_d, was_s = deep.training, shallow.training
    try:
        deep.eval(), shallow.eval()
        pairs = [(deep(x), shallow(x)) for x in batches]
        eval_diff = max(float((a - b).abs().max()) for a, b in pairs)
        scale = max(float(b.abs().max()) for _, b in pairs)
        with _kept_buffers(deep), _kept_buffers(shallow):
            deep.train(), shallow.train()
            pairs = [(deep(x), shallow(x)) for x in batches]
            num = sum(float((a - b).norm() ** 2) for a, b in pairs)
            den = sum(float(b.norm() ** 2) for _, b in pairs)
    finally:
        deep.train(was_d), shallow.train(was_s)
    if not eval_diff <= 1e-4 * max(1.0, scale):
        raise ProbeError(
            f"The constructed net differs from the shallow one by {eval_diff:.3g} in eval mode "
            f"(logits up to {scale:.3g}); the construction is not exact. Is the shallow net finite?"
        )
    return Construction(
        tuple(names[b] for b in copied),
        tuple(names[b] for b in extra),
        eval_diff,
        (num / den) ** 0.5 if den > 0 else 0.0,
    )
