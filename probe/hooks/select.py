"""Select modules by dotted name: glob, regular expression (``re:`` prefix), list, or predicate.

Globs are dotted-name aware: ``*`` matches within one component (``stages.*.*`` selects blocks but
not their submodules), ``**`` matches across components (``**.bn1`` selects every ``bn1``) and
``?`` matches one character.

Dotted names from ``named_modules()`` are the one key everywhere: hooks, HDF5 groups, tables,
figure labels.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from torch import nn

from probe.errors import ProbeError, did_you_mean

__all__ = [
    "LayerSpec",
    "glob_regex",
    "list_layers",
    "named_root",
    "outline",
    "select_modules",
    "select_sites",
]

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


def named_root(model: nn.Module) -> nn.Module:
    """The module whose ``named_modules()`` name ``model``'s layers: ``model`` itself, or the
    module a wrapper runs -- ``torch.compile``'s (``_orig_mod``), ``nn.DataParallel``'s and
    ``DistributedDataParallel``'s (``module``) -- so that its layers keep the names they have
    unwrapped (``stages.0.0``, not ``_orig_mod.stages.0.0`` or ``module.stages.0.0``).

    Example:
        >>> type(named_root(nn.DataParallel(nn.Linear(2, 2)))).__name__
        'Linear'
    """
    # loaded once anything was compiled: no compiled model without it, and no import cost here
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", ())
    while True:
        if isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def glob_regex(pattern: str) -> re.Pattern:
    """Compile a dotted-name glob: ``*`` = one component's characters, ``**`` = anything.

    Example:
        >>> bool(glob_regex("stages.*.*").fullmatch("stages.0.1.branch"))
        False
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def list_layers(model: nn.Module, pattern: str = "**") -> list[tuple[str, str]]:
    """(dotted name, class name) of every submodule whose name matches the glob ``pattern``.

    Example:
        >>> from probe.zoo import create
        >>> list_layers(create("resnet20"), "stages.0.0.branch.*")[:2]
        [('stages.0.0.branch.conv1', 'Conv2d'), ('stages.0.0.branch.bn1', 'BatchNorm2d')]
    """
    rx = glob_regex(pattern)
    named = named_root(model).named_modules()
    return [(n, type(m).__name__) for n, m in named if n and rx.fullmatch(n)]


def outline(model: nn.Module, most: int = 8) -> str:
    """The model's top-level modules, for an error message: a CLI user has no
    :func:`list_layers` to call, and these names start every pattern.

    Example:
        >>> from probe.zoo import create
        >>> outline(create("resnet20"))
        'its top-level modules: stem (Sequential), stages (Sequential), head (Sequential)'
    """
    kids = [f"{n} ({type(m).__name__})" for n, m in named_root(model).named_children()]
    if not kids:
        return "it has no submodules"
    more = f", and {len(kids) - most} more" if len(kids) > most else ""
    return f"its top-level modules: {', '.join(kids[:most])}{more}"


def _matcher(spec: str) -> Callable[[str], bool]:
    if spec.startswith("re:"):
        try:
            rx = re.compile(spec[3:])
        except re.error as e:
            raise ProbeError(f"Invalid regular expression {spec[3:]!r} in layer spec: {e}.") from e
        return lambda name: rx.fullmatch(name) is not None
    rx = glob_regex(spec)
    return lambda name: rx.fullmatch(name) is not None


def select_modules(model: nn.Module, spec: LayerSpec) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` (in forward-definition order) selected by ``spec``.

    ``spec`` is a dotted glob (``"stages.*.*"``, ``"**.bn2"``), a regular expression prefixed ``re:``, a list of
    either (union), or a predicate ``(name, module) -> bool``. Raises :class:`ProbeError` with a
    did-you-mean hint when a pattern matches nothing.

    Example:
        >>> from probe.zoo import create
        >>> [n for n, _ in select_modules(create("resnet20"), "stages.2.*")]
        ['stages.2.0', 'stages.2.1', 'stages.2.2']
    """
    model = named_root(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    if callable(spec) and not isinstance(spec, str):
        return [(n, m) for n, m in named if spec(n, m)]
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ProbeError(
            "Empty layer selection; give at least one pattern. See probe.list_layers(model)."
        )
    chosen: set[str] = set()
    names = [n for n, _ in named]
    known = set(names)
    for pattern in patterns:
        if (
            isinstance(pattern, str)
            and not pattern.startswith("re:")
            and not set("*?") & set(pattern)
        ):
            # a plain dotted name (what a capture of listed blocks passes, one per block): found
            # directly, not by matching it against every module (1.2 -> 0.2 ms for ResNet-56)
            hits = {pattern} & known
        else:
            match = _matcher(pattern)
            hits = {n for n in names if match(n)}
        if not hits:
            # Suggest the closest names, and globs built from them (replace digits with '*').
            globs = sorted({re.sub(r"\d+", "*", n) for n in names})
            hint = did_you_mean(pattern, globs + names)
            raise ProbeError(
                f"No module matches {pattern!r} in {type(model).__name__} ({outline(model)}).{hint} "
                "See probe.list_layers(model) for every dotted name."
            )
        chosen |= hits
    return [(n, m) for n, m in named if n in chosen]


def select_sites(patterns: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The residual-site ``keys`` (in their order) that ``patterns`` match, each a glob or ``re:``
    expression over keys such as ``blocks.3#1`` (a module with several sites keys them
    ``name#0``, ``name#1``, … in forward order). Raises :class:`ProbeError` for a pattern that
    matches none, naming the keys there are.

    Example:
        >>> select_sites(["blocks.*#1"], ["blocks.0#0", "blocks.0#1", "blocks.1#0", "blocks.1#1"])
        ['blocks.0#1', 'blocks.1#1']
    """
    chosen: set[str] = set()
    for pattern in patterns:
        match = _matcher(pattern)
        hits = {k for k in keys if match(k)}
        if not hits:
            several = [k for k in keys if "#" in k]
            there = ", ".join(several[:6]) + (f" (6 of {len(several)})" if len(several) > 6 else "")
            raise ProbeError(
                f"No residual site is keyed {pattern!r}: a '#' in a layer pattern names sites of a "
                f"module with several (name#0, name#1, … in forward order), and this model's are "
                f"{there or 'none (select a module with one site by its name)'}. "
                "probe.discover_sites(model, (x,)) lists every site."
            )
        chosen |= hits
    return [k for k in keys if k in chosen]
