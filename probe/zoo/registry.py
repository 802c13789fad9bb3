"""A small model registry: create by name, list by pattern, did-you-mean errors.

Names are ``{family}{depth}`` with depth = 6n+2, e.g. ``resnet56``, ``plain56``, ``preresnet110``,
``preplain20``. Options of :class:`~probe.zoo.config.NetConfig` are passed as keyword
arguments (``shortcut="B"``, ``zero_init=True``, ``width=8``, ``in_channels=1``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from probe.errors import ProbeError, did_you_mean
from probe.zoo.config import NetConfig

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "register_family",
    "create",
    "list_models",
    "parse_name",
    "model_name",
    "IMAGENET_NAMES",
]

# He et al.'s depths plus the small ones the CPU studies use (any 6n+2 depth can be created).
STANDARD_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110, 1202)
_FAMILIES: dict[str, dict] = {}


def register_family(prefix: str, builder: Callable[..., nn.Module], **fixed: object) -> None:
    """Register ``prefix{depth}`` names; ``fixed`` options are applied before user options."""
    if prefix in _FAMILIES:
        raise ProbeError(f"Model family {prefix!r} is already registered.")
    _FAMILIES[prefix] = {"builder": builder, "fixed": fixed}


def _build(**options: object) -> nn.Module:
    # torch is loaded when a model is built, not when names are listed or parsed
    from probe.zoo.cifar_resnet import CifarResNet

    return CifarResNet(NetConfig(**options))


register_family("resnet", _build, residual=True, preact=False)
register_family("plain", _build, residual=False, preact=False)
register_family("preresnet", _build, residual=True, preact=True)
register_family("preplain", _build, residual=False, preact=True)

_NAME = re.compile(r"^([a-z]+?)(\d+)$")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names at the standard depths that match a glob ``pattern``, by family and then
    by depth (plain8 before plain20).

    Example:
        >>> list_models("plain*")[:3]
        ['plain8', 'plain14', 'plain20']
    """
    names = [(p, d) for p in sorted(_FAMILIES) for d in STANDARD_DEPTHS]
    return [f"{p}{d}" for p, d in names if fnmatch.fnmatchcase(f"{p}{d}", pattern)]


def parse_name(name: str) -> tuple[str, int]:
    """Split a model name into (family, depth); raise a helpful error for unknown names."""
    m = _NAME.match(name)
    if not m or m.group(1) not in _FAMILIES:
        raise ProbeError(
            f"Unknown model {name!r}; names are family+depth with families "
            f"{', '.join(sorted(_FAMILIES))} (e.g. 'resnet56', 'plain20').{did_you_mean(name, list_models())}"
            " See probe.zoo.list_models()."
        )
    return m.group(1), int(m.group(2))


def model_name(config: NetConfig) -> str:
    """The registry name of a config (options beyond family and depth are not encoded)."""
    family = ("pre" if config.preact else "") + ("resnet" if config.residual else "plain")
    return f"{family}{config.depth}"


# Names that mean torchvision's ImageNet ResNets to most users but are also valid 6n+2 depths here.
IMAGENET_NAMES = {"resnet50", "resnet152"}


def create(name: str, *, cifar: bool = False, **options: object) -> nn.Module:
    """Create a registered model by name.

    ``resnet50`` and ``resnet152`` are torchvision's ImageNet ResNets to most readers; the zoo
    builds its He et al. CIFAR net of those depths only when asked with ``cifar=True``.

    Example:
        >>> net = create("plain56")
        >>> net.config.residual, net.config.depth
        (False, 56)
    """
    if name in IMAGENET_NAMES and not cifar:
        raise ProbeError(
            f"{name!r} is torchvision's ImageNet {name.replace('resnet', 'ResNet-')} (bottleneck "
            f"blocks, 224x224 inputs); the zoo holds He et al.'s CIFAR nets. For torchvision's, use "
            f"torchvision.models.{name}(); for a CIFAR net of that depth, create({name!r}, "
            "cifar=True) (CLI: --opt cifar=true)."
        )
    family, depth = parse_name(name)
    if depth < 8 or (depth - 2) % 6:
        lower = max(8, depth - (depth - 2) % 6)
        near = sorted({f"{family}{lower}", f"{family}{lower + 6}"})
        raise ProbeError(
            f"Invalid depth in {name!r}: He et al. CIFAR nets have depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...). "
            f"Did you mean {' or '.join(repr(n) for n in near)}?"
        )
    entry = _FAMILIES[family]
    clash = set(options) & (set(entry["fixed"]) | {"depth"})
    if clash:
        raise ProbeError(
            f"Option(s) {sorted(clash)} are fixed by the name {name!r}; choose another name instead."
        )
    allowed = set(NetConfig.__dataclass_fields__)
    unknown = set(options) - allowed
    if unknown:
        bad = sorted(unknown)[0]
        raise ProbeError(
            f"Unknown model option {bad!r} for {name!r}; allowed: {', '.join(sorted(allowed - {'depth'}))}."
            + did_you_mean(bad, allowed)
        )
    return entry["builder"](depth=depth, **entry["fixed"], **options)
