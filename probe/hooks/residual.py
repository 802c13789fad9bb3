"""Residual adapters: blocks that say by module name which submodule is F and which is S.

Most models need none: :mod:`probe.hooks.sites` reads F(x) and S(x) at the residual add itself.
An adapter is for a block whose split the add cannot show -- a *plain* block that is measured
against a shortcut it does not compute (the zoo's plain nets), or an add whose two operands
cannot be told apart. It names the module whose output is F(x) and the module computing S(x)
(``None``: identity). Built in: the zoo's :class:`~probe.zoo.BasicBlock` (plain and residual alike,
so both nets are measured the same way); register your own with :func:`register_residual`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from probe.errors import ProbeError

__all__ = ["ResidualSpec", "register_residual", "residual_spec", "find_blocks", "inplace_modules"]

Resolver = str | None | Callable[[nn.Module], nn.Module | None]


@dataclass(frozen=True)
class ResidualSpec:
    """How to read F(x) and S(x) from a block.

    Attributes:
        branch: dotted name (or resolver) of the submodule whose output is F(x).
        shortcut: dotted name (or resolver) of the submodule computing S(x); ``None`` = identity.
        clone_branch: the block modifies F(x) in place after computing it (e.g. ``out += identity``),
            so the capture must copy it.
    """

    branch: Resolver
    shortcut: Resolver = None
    clone_branch: bool = True

    def resolve(
        self, block: nn.Module, name: str | None = None
    ) -> tuple[nn.Module, nn.Module | None]:
        """(branch module, shortcut module or None for the identity) of ``block``; ``name`` (its
        dotted name) goes into the error when the adapter does not fit this instance."""
        branch = self._get(block, self.branch, "branch", name)
        if branch is None:
            raise ProbeError(
                f"Residual adapter of {type(block).__name__}"
                + (f" {name!r}" if name else "")
                + f" names branch {self.branch!r}, which is None on this instance: the branch "
                "must be a module that runs in every call."
            )
        return branch, self._get(block, self.shortcut, "shortcut", name)

    @staticmethod
    def _get(block: nn.Module, ref: Resolver, role: str, name: str | None) -> nn.Module | None:
        if ref is None:
            return None
        if callable(ref):
            return ref(block)
        # An attribute set to None on this instance (a projection only some blocks have):
        # no module, i.e. the identity for a shortcut.
        parent, _, leaf = ref.rpartition(".")
        try:
            owner = block.get_submodule(parent) if parent else block
            if hasattr(owner, leaf) and getattr(owner, leaf) is None:
                return None
            return block.get_submodule(ref)
        except AttributeError as e:
            where = f"{type(block).__name__}" + (f" {name!r}" if name else "")
            raise ProbeError(
                f"Residual adapter names {role} {ref!r}, which {where} lacks. Name a submodule "
                "it has (probe.list_layers(block)), or a function block -> module."
            ) from e


_ADAPTERS: dict[str, ResidualSpec] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_residual(cls: type | str, spec: ResidualSpec) -> None:
    """Declare how to read a user block class (or its ``module.QualName`` string).

    Example:
        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.f = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.f(x)
        >>> register_residual(MyBlock, ResidualSpec(branch="f", shortcut=None, clone_branch=False))
        >>> residual_spec(MyBlock()) is not None
        True
    """
    _ADAPTERS[cls if isinstance(cls, str) else _key(cls)] = spec


register_residual(
    "probe.zoo.cifar_resnet.BasicBlock",
    ResidualSpec(branch="branch", shortcut="shortcut", clone_branch=False),
)

_LOOKS_RESIDUAL = re.compile(r"(Block|Bottleneck|Residual|Res[A-Z]|Unit)", re.ASCII)


def residual_spec(module: nn.Module) -> ResidualSpec | None:
    """The adapter for ``module``'s class (looked up along its MRO), or ``None``."""
    for cls in type(module).__mro__:
        spec = _ADAPTERS.get(_key(cls))
        if spec is not None:
            return spec
    return None


def find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module, ResidualSpec]], list[str]]:
    """Residual blocks found automatically, and names of modules that look like blocks but have
    no adapter (so the caller can say clearly that they could not be classified).

    Example:
        >>> from probe.zoo import create
        >>> blocks, unknown = find_blocks(create("resnet20"))
        >>> len(blocks), unknown
        (9, [])
    """
    blocks, unknown = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        spec = residual_spec(module)
        if spec is not None:
            blocks.append((name, module, spec))
        elif _LOOKS_RESIDUAL.search(type(module).__name__) and not isinstance(
            module, nn.Sequential
        ):
            unknown.append(name)
    # Do not report modules nested inside an adapted block (their parent is handled).
    inside = tuple(n + "." for n, _, _ in blocks)
    return blocks, [u for u in unknown if not u.startswith(inside)]


def inplace_modules(module: nn.Module) -> list[str]:
    """Dotted names of submodules configured to modify their input in place (``inplace=True``)."""
    return [
        n or type(module).__name__
        for n, m in module.named_modules()
        if getattr(m, "inplace", False)
    ]
