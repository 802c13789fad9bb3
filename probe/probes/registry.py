"""Probes by name for the CLI: ``name`` or ``name:key=value,key=value``."""

from __future__ import annotations

import dataclasses
import json

from probe.errors import ProbeError, did_you_mean
from probe.probes.activations import Activations, Gradients
from probe.probes.base import Probe
from probe.probes.statistics import ChannelStats, GradNorms, ResidualNorms

__all__ = ["PROBES", "register_probe", "make_probe", "as_probes"]

PROBES: dict[str, type[Probe]] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Make a probe class available to ``--probe NAME`` (usable as a decorator)."""
    if cls.name in PROBES and PROBES[cls.name] is not cls:
        raise ProbeError(
            f"A probe named {cls.name!r} is already registered ({PROBES[cls.name].__name__})."
        )
    PROBES[cls.name] = cls
    return cls


for _cls in (ResidualNorms, ChannelStats, GradNorms, Activations, Gradients):
    register_probe(_cls)


def _register_all() -> None:
    """Probes defined beside the engine (Jacobians, parameter gradients) register on import."""
    from probe.jacobian import probes as _jacobian_probes  # noqa: F401
    from probe.probes import params as _param_probes  # noqa: F401


def make_probe(spec: str) -> Probe:
    """Build a probe from ``name[:key=value,...]``.

    Example:
        >>> make_probe("activations:dtype=bf16,max_samples=64")
        Activations(dtype='bf16', channel_stride=1, spatial_stride=1, max_samples=64, which='output', layout='auto')
    """
    name, _, args = spec.partition(":")
    if name not in PROBES:
        _register_all()
    if name not in PROBES:
        raise ProbeError(
            f"Unknown probe {name!r}; available: {', '.join(sorted(PROBES))}."
            + did_you_mean(name, PROBES)
        )
    cls = PROBES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ProbeError(
                f"Invalid option {item!r} for probe {name!r}; options: {', '.join(sorted(fields)) or 'none'} "
                f"(write {name}:key=value,key=value)." + (did_you_mean(key, fields) if eq else "")
            )
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ProbeError(f"Invalid options for probe {name!r}: {e}") from e


def as_probes(probes: object) -> list[Probe]:
    """Probe instances from what a user may pass: instances, probe classes (built with their
    defaults) or spec strings (``"residual"``, ``"jacobian:n_probes=8"``), alone or in a list.

    Example:
        >>> [type(p).__name__ for p in as_probes(["residual", ChannelStats, GradNorms()])]
        ['ResidualNorms', 'ChannelStats', 'GradNorms']
    """
    items = [probes] if isinstance(probes, (str, Probe, type)) else list(probes or ())
    out = []
    for p in items:
        if isinstance(p, Probe):
            out.append(p)
        elif isinstance(p, str):
            out.append(make_probe(p))
        elif isinstance(p, type) and issubclass(p, Probe):
            out.append(p())
        else:
            _register_all()
            raise ProbeError(
                f"Invalid probe {p!r} ({type(p).__name__}): give a probe instance "
                "(probe.ResidualNorms()), a probe class, or a spec string ('residual', "
                f"'jacobian:n_probes=8'); registered: {', '.join(sorted(PROBES))}."
            )
    return out
