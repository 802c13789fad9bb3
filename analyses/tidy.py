"""The tidy table every measure returns: one row per (run, layer, quantity) with a CI.

Columns: model, depth, residual, seed, checkpoint, layer, layer_index, stage, quantity, value,
ci_low, ci_high. Runs are identified from the capture's provenance.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import warnings
from collections.abc import Callable

import pandas as pd

from probe.errors import ProbeError
from probe.store.reader import CaptureReader

__all__ = [
    "COLUMNS",
    "MissingProbeWarning",
    "needs",
    "quietly",
    "source_of",
    "run_key",
    "identified",
    "check_poolable",
    "stage_of",
    "frame",
    "row",
    "per_layer",
    "layer_positions",
    "nan_ci",
]

COLUMNS = [
    "model",
    "depth",
    "residual",
    "seed",
    "checkpoint",
    "layer",
    "layer_index",
    "stage",
    "quantity",
    "value",
    "ci_low",
    "ci_high",
]
_STAGE = re.compile(r"(?:stages|layer)\.?(\d+)")


def identified(cap: CaptureReader) -> bool:
    """Whether the capture says which model it is (a zoo config, a checkpoint or a ``name=``),
    not only its class name."""
    prov = cap.provenance
    return bool(prov.get("model_name") or prov.get("model_config"))


def _block_residual(cap: CaptureReader) -> bool | None:
    """Residual or plain, read from the captured blocks' own flags (None: no block captured)."""
    flags = {int(cap.layer_attrs(l).get("residual", -1)) for l in cap.layers if l != "model"}
    flags.discard(-1)
    return None if not flags else 1 in flags


def _model_residual(cap: CaptureReader) -> bool | None:
    """Whether tracing found any residual add in the whole model (None: not traced), read from
    the layers' ``model_sites``."""
    for layer in cap.layers:
        sites = cap.layer_attrs(layer).get("model_sites")
        if sites is not None:
            return int(sites) > 0
    return None


def run_key(cap: CaptureReader) -> dict:
    """model, depth, residual, seed and checkpoint (epoch) of the run a capture was taken from.

    The model's configuration decides (zoo models and checkpoints record it); without one the
    residual flag comes from the captured blocks or, where none was captured (plain layers
    selected by name), from whether tracing found a residual add in the model; depth from a zoo-style name (``resnet56``,
    ``preplain20``) -- any other name's digits (``vit_b_16``: the patch size, ``mobilenet_v2``: a
    version) say nothing about depth, which is then -1 (unknown).
    """
    prov = cap.provenance
    cfg = prov.get("model_config") or {}
    name = prov.get("model_name") or prov.get("model_type", "model")
    depth = cfg.get("depth")
    if depth is None:
        m = re.fullmatch(r"(?:zoo:)?(?:pre)?(?:resnet|plain)(\d+)", str(name))
        depth = int(m.group(1)) if m else -1
    residual = cfg.get("residual")
    if residual is None:
        residual = _block_residual(cap)
    if residual is None:  # no block captured: whether the model has a residual add at all
        residual = _model_residual(cap)
    if residual is None:
        residual = not str(name).startswith(("plain", "preplain"))
    epoch = prov.get("epoch")
    seed = prov.get("seed")
    if seed is None and "weights" not in prov:  # --model with random weights: their seed
        seed = prov.get("model_seed")
    return {
        "model": str(name),
        "depth": int(depth),
        "residual": bool(residual),
        "seed": int(seed or 0),
        "checkpoint": -1 if epoch is None else int(epoch),
    }


def check_poolable(caps: list[CaptureReader] | tuple) -> None:
    """Refuse captures whose rows one table would pool wrongly: several captures when any of
    them does not say which model it is, or two captures of one run (model, seed, checkpoint)
    that both hold the same quantity of the same layer (e.g. two splits of one checkpoint)."""
    if len(caps) < 2:
        return
    anonymous = [source_of(c) for c in caps if not identified(c)]
    if anonymous:
        raise ProbeError(
            f"Cannot analyse {len(caps)} captures together: {', '.join(anonymous[:3])} do(es) not "
            "say which model it is (only its class), so different models would share one label. "
            "Name each capture: probe.capture(model, data, ..., name='plain20')."
        )
    owner: dict[tuple, CaptureReader] = {}
    for cap in caps:
        key = run_key(cap)
        ident = (key["model"], key["seed"], key["checkpoint"])
        for layer in cap.layers:
            for q in cap.quantities(layer):
                first = owner.setdefault((*ident, layer, q), cap)
                if first is not cap:
                    epoch = f" epoch {key['checkpoint']}" if key["checkpoint"] >= 0 else ""
                    raise ProbeError(
                        f"Captures {source_of(first)} and {source_of(cap)} are both "
                        f"{key['model']} seed {key['seed']}{epoch} and both hold {layer}/{q}: one "
                        "table would pool their rows. Analyse them separately, or give them "
                        "different names (probe capture --name, probe.capture(..., name=...))."
                    )


def source_of(cap: CaptureReader) -> str:
    """How messages name a capture: its file, or that it lives in memory."""
    return str(getattr(cap, "path", "<in-memory capture>"))


class MissingProbeWarning(UserWarning):
    """A measure got a capture without the probe it needs and returns an empty table."""


_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet_measures", default=False)


@contextlib.contextmanager
def quietly():
    """Silence :class:`MissingProbeWarning` (the pipeline runs every measure on every capture and
    lists what it skipped itself)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def needs(probes: str):
    """Decorate a measure ``fn(cap, ...) -> DataFrame``: an empty result warns which probe the
    capture lacked, instead of returning an empty table in silence."""

    def wrap(fn):
        @functools.wraps(fn)
        def measure(cap, *args, **kwargs):
            out = fn(cap, *args, **kwargs)
            if len(out) == 0 and not _QUIET.get():
                warnings.warn(
                    f"{fn.__name__}: {source_of(cap)} holds nothing it measures; capture with "
                    f"{probes}.",
                    MissingProbeWarning,
                    stacklevel=2,
                )
            return out

        return measure

    return wrap


def stage_of(layer: str) -> int:
    """Stage index of a dotted name ('stages.1.3' -> 1, torchvision 'layer2.0' -> 2); -1 if none."""
    m = _STAGE.match(layer)
    return int(m.group(1)) if m else -1


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype(
        {"depth": int, "seed": int, "checkpoint": int, "layer_index": int, "stage": int}
    )


def row(
    key: dict,
    layer: str,
    layer_index: int,
    stage: int,
    quantity: str,
    ci: tuple[float, float, float],
) -> dict:
    """One tidy row: the run ``key``, where (layer, index, stage), what, and (value, low, high).

    Example:
        >>> row({"model": "resnet8"}, "stages.0.0", 0, 0, "closeness", nan_ci(0.5))["value"]
        0.5
    """
    v, lo, hi = ci
    return {
        **key,
        "layer": layer,
        "layer_index": int(layer_index),
        "stage": int(stage),
        "quantity": quantity,
        "value": float(v),
        "ci_low": float(lo),
        "ci_high": float(hi),
    }


def per_layer(
    cap: CaptureReader,
    quantity: str,
    needs: tuple[str, ...],
    measure: Callable[[CaptureReader, str], tuple[float, float, float] | None],
    blocks_only: bool = False,
) -> list[dict]:
    """Rows of ``quantity`` for each layer holding all of ``needs``; ``measure`` returns (v, lo, hi)."""
    key = run_key(cap)
    positions = layer_positions(cap)
    rows = []
    for layer in positions:
        if not all(cap.has(layer, q) for q in needs):
            continue
        if blocks_only and not cap.layer_attrs(layer).get("is_block"):
            continue
        out = measure(cap, layer)
        if out is None:
            continue
        rows.append(row(key, layer, positions[layer], stage_of(layer), quantity, out))
    return rows


def layer_positions(cap: CaptureReader) -> dict[str, int]:
    """Layer key -> its depth, the ``layer_index`` each layer's attributes record (the order
    the forward pass produced the results in), in capture order; "model" left out.

    Captures written before ``layer_index`` became that order numbered a module's place in
    the selection, the same for every call of a module called several times (shared weights):
    where positions repeat, the capture order is used instead, which is the forward pass's.

    Example:
        >>> import numpy as np
        >>> from probe.store.reader import MemoryCapture
        >>> old = {"b": {"layer_index": 0}, "b@1": {"layer_index": 0}}  # one module, two calls
        >>> cap = MemoryCapture({"b": {}, "b@1": {}}, old, np.arange(0), np.arange(0), {})
        >>> layer_positions(cap)
        {'b': 0, 'b@1': 1}
    """
    layers = [l for l in cap.layers if l != "model"]
    recorded = {l: cap.layer_attrs(l).get("layer_index") for l in layers}
    if None in recorded.values() or len(set(recorded.values())) < len(layers):
        return {l: i for i, l in enumerate(layers)}
    return {l: int(i) for l, i in recorded.items()}


def nan_ci(v: float) -> tuple[float, float, float]:
    """A point value without an interval, in the (value, low, high) form :func:`row` takes."""
    return float(v), float("nan"), float("nan")
