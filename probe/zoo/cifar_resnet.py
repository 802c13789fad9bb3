"""He et al. (2016) CIFAR networks: depth 6n+2, three stages of n basic blocks, plain or residual.

Plain and residual nets come from the same class with one flag (``residual``) so that module names
(and, with option-A shortcuts, parameter counts) match exactly and every comparison is controlled.
Every block exposes ``branch`` (the residual function F) and ``shortcut`` (S) as submodules, so a
hook reads x, F(x), S(x) and the block output y without guessing. No op is in-place.

References:
    He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016 (Sec. 4.2).
    He, Zhang, Ren, Sun. Identity Mappings in Deep Residual Networks. ECCV 2016 (pre-activation,
    shortcut scaling of Table 1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from probe.zoo.config import NetConfig

__all__ = ["NetConfig", "CifarResNet", "BasicBlock", "OptionA", "OptionB"]


class OptionA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling plus zero-padding of the new channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, c_in, H, W] -> [N, c_out, H/s, W/s]
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.c_out - self.c_in
        if extra:
            # Pad symmetrically like the reference implementations (c_in//2 zero channels each side).
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.c_in}->{self.c_out}, stride={self.stride}"


class OptionB(nn.Sequential):
    """Projection shortcut used where shapes change: 1x1 conv (stride s) followed by BN."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(c_out),
            )
        )


class GlobalAvgPool(nn.Module):
    """Mean over H and W. Same as ``AdaptiveAvgPool2d(1)``, but with batching rules under
    ``torch.func.vmap`` (per-sample gradients, Jacobian probes) and no strided-view fallback."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, C, 1, 1]
        return x.mean((2, 3), keepdim=True)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; y = act(lambda*S(x) + F(x)) if residual else act(F(x)).

    Pre-activation blocks (``preact=True``) compute y = lambda*S(x) + F(x) with
    F = conv2(relu(bn2(conv1(relu(bn1(x)))))) and no activation after the addition.

    Example:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int = 1,
        *,
        residual: bool = True,
        shortcut: str = "A",
        preact: bool = False,
        shortcut_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if preact:
            layers = OrderedDict(
                bn1=nn.BatchNorm2d(c_in),
                relu1=nn.ReLU(),
                conv1=_conv3x3(c_in, c_out, stride),
                bn2=nn.BatchNorm2d(c_out),
                relu2=nn.ReLU(),
                conv2=_conv3x3(c_out, c_out),
            )
        else:
            layers = OrderedDict(
                conv1=_conv3x3(c_in, c_out, stride),
                bn1=nn.BatchNorm2d(c_out),
                relu=nn.ReLU(),
                conv2=_conv3x3(c_out, c_out),
                bn2=nn.BatchNorm2d(c_out),
            )
        self.branch = nn.Sequential(layers)
        # The shortcut exists in plain blocks too (unused in their forward pass): it defines the
        # linear map P that identity-closeness is measured against, on equal terms for both nets.
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = OptionA(c_in, c_out, stride)
        else:
            self.shortcut = OptionB(c_in, c_out, stride)
        self.act = nn.Identity() if preact else nn.ReLU()
        self.residual = residual
        self.preact = preact
        self.shortcut_scale = float(shortcut_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        out = self.branch(x)
        if self.residual:
            s = self.shortcut(x)
            out = out + (s if self.shortcut_scale == 1.0 else self.shortcut_scale * s)
        return self.act(out)

    def zero_init_(self) -> None:
        """Zero the last scale of the branch so that F(x) = 0 and the block computes act(S(x))."""
        with torch.no_grad():
            if self.preact:
                self.branch.conv2.weight.zero_()
            else:
                self.branch.bn2.weight.zero_()

    def extra_repr(self) -> str:
        return f"residual={self.residual}, preact={self.preact}, lambda={self.shortcut_scale}"


class CifarResNet(nn.Module):
    """The CIFAR network of He et al. (2016): stem, 3 stages x n blocks, global pooling, linear.

    Module names: ``stem.{conv,bn,relu}``, ``stages.{s}.{b}`` (blocks, with ``.branch`` and
    ``.shortcut``), ``head.{bn,relu}`` (pre-activation only), ``head.pool``, ``head.fc``.

    Example:
        >>> net = CifarResNet(NetConfig(depth=20))
        >>> round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
        0.27
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        widths = (w, 2 * w, 4 * w)
        stem = OrderedDict(conv=_conv3x3(config.in_channels, w))
        if not config.preact:
            stem.update(bn=nn.BatchNorm2d(w), relu=nn.ReLU())
        self.stem = nn.Sequential(stem)
        stages, c_in = [], w
        for s, c_out in enumerate(widths):
            blocks = []
            for b in range(config.blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(
                    BasicBlock(
                        c_in,
                        c_out,
                        stride,
                        residual=config.residual,
                        shortcut=config.shortcut,
                        preact=config.preact,
                        shortcut_scale=config.shortcut_scale,
                    )
                )
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        head: OrderedDict[str, nn.Module] = OrderedDict()
        if config.preact:
            head.update(bn=nn.BatchNorm2d(c_in), relu=nn.ReLU())
        head.update(
            pool=GlobalAvgPool(),
            flatten=nn.Flatten(),
            fc=nn.Linear(c_in, config.num_classes),
        )
        self.head = nn.Sequential(head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal init for convs and the classifier; BN scale 1 and shift 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init:
            for block in self.blocks():
                block.zero_init_()

    def blocks(self) -> list[BasicBlock]:
        """All blocks in forward order."""
        return [m for m in self.modules() if isinstance(m, BasicBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C_in, H, W] -> [N, classes]
        return self.head(self.stages(self.stem(x)))
