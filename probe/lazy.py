"""Public names of a package loaded on first use (PEP 562), so that importing the package is
cheap: ``import probe`` and the command line's ``--help`` then load no torch.

:func:`attach` makes a package's ``__getattr__`` and ``__dir__`` from a table of where each name
lives. A submodule's import binds the submodule on its package, which would hide a function of
the same name (``probe.capture``, the module, over ``probe.capture``, the function); the
package's module class is therefore switched to one that leaves such a binding out.

Example:
    >>> import sys, types
    >>> pkg = types.ModuleType("demo")
    >>> sys.modules["demo"] = pkg
    >>> pkg.__getattr__, pkg.__dir__ = attach("demo", {"dumps": ("json", "dumps")})
    >>> pkg.dumps([1])
    '[1]'
    >>> del sys.modules["demo"]
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping

__all__ = ["attach", "names_in"]


def names_in(module: str, *names: str) -> dict[str, tuple[str, str]]:
    """Table entries for :func:`attach`: each of ``names`` is the attribute of that name in
    ``module``.

    Example:
        >>> names_in("json", "dumps", "loads")
        {'dumps': ('json', 'dumps'), 'loads': ('json', 'loads')}
    """
    return {n: (module, n) for n in names}


def attach(
    package: str, home: Mapping[str, tuple[str, str | None]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose name ``n`` is attribute ``home[n][1]``
    of module ``home[n][0]`` (the module itself when that is None), imported on first use."""
    module = sys.modules[package]

    def __getattr__(name: str) -> object:
        try:
            where, attr = home[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = importlib.import_module(where)
        if attr is not None:
            value = getattr(value, attr)
        module.__dict__[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__) | set(home))

    class _Package(type(module)):
        def __setattr__(self, name: str, value: object) -> None:
            if isinstance(value, types.ModuleType) and home.get(name, (None, None))[1] is not None:
                return  # a submodule's import, binding it over a public name that is no module
            super().__setattr__(name, value)

    module.__class__ = _Package
    return __getattr__, __dir__
