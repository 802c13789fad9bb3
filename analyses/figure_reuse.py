"""Figures drawn again only when what they show could have changed.

A study or an analysis run again into its directory (to resume a killed run, to rewrite its
report) would otherwise draw every figure again, about a second each. :func:`render` keys a
figure by everything its pixels depend on -- the plotting function, its arguments, the plotted
numbers, matplotlib's settings, the package's source (which draws the figure and computes what
it plots) and the versions of resprobe and the plotting libraries -- and stamps the key into the
PNG and the SVG it writes. A figure is reused only when both files carry the key and the CSV
beside them holds the bytes the stamp names; anything else (a changed input, a damaged or
missing file, a file of another run) draws it again.

Example:
    >>> import tempfile, pathlib, pandas as pd
    >>> from analyses.figures import plot_vs_depth
    >>> d = pd.DataFrame({"quantity": "train_error", "depth": [8, 14], "value": [0.1, 0.2],
    ...                   "residual": [False, True], "seed": 0})
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> first = render(out, "err", plot_vs_depth, d, "train_error", "error", data=d)
    >>> stamp = first[0].stat().st_mtime_ns
    >>> again = render(out, "err", plot_vs_depth, d, "train_error", "error", data=d)
    >>> again == first, first[0].stat().st_mtime_ns == stamp
    (True, True)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from analyses import figures

__all__ = ["render", "figure_key", "stamped_figures"]

_LIBRARIES = ("matplotlib", "seaborn", "pandas", "numpy", "pillow")
_SVG_HEAD = 8192  # bytes read for the stamp: matplotlib writes the metadata before any drawing


def render(
    out_dir: Path,
    name: str,
    plot: Callable[..., Any],
    *args: Any,
    data: pd.DataFrame | None = None,
    **kwargs: Any,
) -> list[Path]:
    """``plot(*args, **kwargs)`` saved as ``name``.png/.svg (and .csv of ``data``) in
    ``out_dir``, or the files already there when they are this very figure. ``plot`` returns a
    figure, or (figure, plotted numbers) where it computes them (then ``data`` is None).
    -> the paths, as :func:`analyses.figures.save` gives them."""
    out_dir = Path(out_dir)
    key = figure_key(plot, args, kwargs, data)
    kept = _kept(out_dir, name, key)
    if kept is not None:
        return kept
    made = plot(*args, **kwargs)
    fig, table = made if isinstance(made, tuple) else (made, data)
    return figures.save(fig, out_dir, name, table, key=key)


def figure_key(
    plot: Callable[..., Any], args: tuple, kwargs: dict[str, Any], data: pd.DataFrame | None
) -> str:
    """sha256 of what a figure's files depend on (see the module); matplotlib's settings are
    read after :func:`analyses.figures.theme`, which every plot applies first."""
    h = hashlib.sha256()
    h.update(_code_digest().encode())
    h.update(_module_digest(plot.__module__).encode())
    h.update(f"{plot.__module__}.{plot.__qualname__}".encode())
    _feed(h, (args, sorted(kwargs.items()), data))
    figures.theme()
    h.update(repr(sorted(matplotlib.rcParams.items())).encode())
    return h.hexdigest()


def stamped_figures(out_dir: Path) -> list[Path]:
    """The PNGs in ``out_dir`` that :func:`render` drew (they carry its stamp), whatever run
    drew them: what a caller compares with the files it wrote to find an earlier run's."""
    mark = figures.STAMP_MARK + " "
    return [
        p for p in sorted(Path(out_dir).glob("*.png")) if (_png_stamp(p) or "").startswith(mark)
    ]


def _kept(out_dir: Path, name: str, key: str) -> list[Path] | None:
    """The figure's files if all carry ``key`` and its CSV is the one stamped, else None."""
    png, svg, csv = (out_dir / f"{name}.{ext}" for ext in ("png", "svg", "csv"))
    stamp = _png_stamp(png)
    if stamp is None:
        return None
    try:
        with svg.open("rb") as fh:
            if stamp.encode() not in fh.read(_SVG_HEAD):
                return None
        table = csv.read_bytes() if csv.exists() else None
    except OSError:
        return None
    if stamp != figures.figure_stamp(key, table):
        return None
    return [png, svg] + ([csv] if table is not None else [])


def _png_stamp(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency

    try:
        with Image.open(path) as im:
            stamp = im.info.get("Identifier")  # text before the pixels: read as it opens
            im.verify()  # a truncated or corrupted file raises here (its chunks' CRCs)
            return stamp
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None


@functools.cache
def _code_digest() -> str:
    """sha256 of the code that draws and of the numbers it computes on the way -- every module
    of :mod:`analyses` and :mod:`probe` (a plot may compute its table with a helper from either)
    -- and of the versions of resprobe and the libraries that draw: a change to any draws every
    figure anew. Computed once per process."""
    import probe

    h = hashlib.sha256(f"resprobe={probe.__version__};".encode())
    for lib in _LIBRARIES:
        try:
            h.update(f"{lib}={importlib.metadata.version(lib)};".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{lib}=?;".encode())
    packages = (Path(figures.__file__).parent, Path(probe.__file__).parent)
    for path in sorted(p for package in packages for p in package.rglob("*.py")):
        h.update(str(path.relative_to(path.parents[1])).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _module_digest(module: str) -> str:
    """sha256 of the source of the plot's own module (a plot written outside the package);
    empty where it has no file."""
    own = getattr(sys.modules.get(module), "__file__", None)
    return hashlib.sha256(Path(own).read_bytes()).hexdigest() if own else ""


def _feed(h: Any, obj: Any) -> None:
    """Add ``obj`` to the hash ``h``: tables by their values, index, columns and dtypes."""
    if isinstance(obj, pd.DataFrame):
        h.update(f"frame{list(obj.columns)!r}{list(map(str, obj.dtypes))!r}".encode())
        h.update(pd.util.hash_pandas_object(obj, index=True).to_numpy().tobytes())
    elif isinstance(obj, pd.Series):
        h.update(f"series{obj.name!r}{obj.dtype}".encode())
        h.update(pd.util.hash_pandas_object(obj, index=True).to_numpy().tobytes())
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        h.update(f"array{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        _feed(h, sorted(obj.items(), key=lambda kv: repr(kv[0])))
    elif obj is None or isinstance(obj, (str, int, float, bool, np.generic, Path)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(
            f"A figure's inputs are hashed to know when to draw it again; got a "
            f"{type(obj).__name__}, which has no hash of its values. Pass tables, arrays, "
            "numbers or strings."
        )
