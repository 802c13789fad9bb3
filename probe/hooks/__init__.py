"""Module selection and residual-block adapters."""

from probe.hooks.residual import (
    ResidualSpec,
    find_blocks,
    inplace_modules,
    register_residual,
    residual_spec,
)
from probe.hooks.select import LayerSpec, list_layers, select_modules

__all__ = [
    "LayerSpec",
    "ResidualSpec",
    "find_blocks",
    "inplace_modules",
    "list_layers",
    "register_residual",
    "residual_spec",
    "select_modules",
]
