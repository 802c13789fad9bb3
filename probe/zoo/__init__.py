"""Model zoo: plain and residual CIFAR networks that differ only by the shortcut."""

from probe.zoo.cifar_resnet import BasicBlock, CifarResNet, NetConfig, OptionA, OptionB
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
