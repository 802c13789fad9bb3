"""Model zoo: plain and residual CIFAR networks that differ only by the shortcut.

Each name loads with its module on first use (:mod:`probe.lazy`): listing or naming models
(``probe models``) loads no torch, which only building one needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.lazy import attach, names_in

if TYPE_CHECKING:
    from probe.zoo.cifar_resnet import BasicBlock, CifarResNet, OptionA, OptionB
    from probe.zoo.config import NetConfig
    from probe.zoo.registry import create, list_models, model_name, parse_name, register_family

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "NetConfig",
    "OptionA",
    "OptionB",
    "create",
    "list_models",
    "model_name",
    "parse_name",
    "register_family",
]

_HOME = {
    **names_in("probe.zoo.cifar_resnet", "BasicBlock", "CifarResNet", "OptionA", "OptionB"),
    **names_in("probe.zoo.config", "NetConfig"),
    **names_in(
        "probe.zoo.registry", "create", "list_models", "model_name", "parse_name", "register_family"
    ),
}
__getattr__, __dir__ = attach(__name__, _HOME)
