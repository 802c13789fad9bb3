"""resprobe: measure why deep plain networks degrade and residual networks do not.

Example:
    >>> import probe
    >>> model = probe.zoo.create("resnet20")
    >>> [n for n, _ in probe.list_layers(model, "stages.0.*")]
    ['stages.0.0', 'stages.0.1', 'stages.0.2']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probe.lazy import attach, names_in

if TYPE_CHECKING:  # for type checkers and editors; at run time each name loads on first use
    from probe import testing, zoo
    from probe.capture import capture
    from probe.conformance import check_sites
    from probe.errors import ProbeError
    from probe.hooks import (
        ResidualSpec,
        find_blocks,
        list_layers,
        register_residual,
        select_modules,
    )
    from probe.hooks.sites import discover_sites
    from probe.jacobian import JacobianNorms, SegmentJacobians, ShatteredGradients
    from probe.probes import (
        Activations,
        BlockTensors,
        Call,
        ChannelStats,
        Gradients,
        GradNorms,
        Probe,
        ResidualNorms,
    )
    from probe.probes.params import ParamGradNorms
    from probe.probes.registry import make_probe
    from probe.session import (
        HookSession,
        InPlaceWarning,
        NonFiniteWarning,
        NoResidualWarning,
        NothingRecordedWarning,
    )
    from probe.sources import load_model
    from probe.stats import Moments, response_std
    from probe.store import join_shards
    from probe.store import open_capture as open
    from probe.zoo import list_models


__version__ = "0.1.0"

__all__ = [
    "Activations",
    "BlockTensors",
    "Call",
    "ChannelStats",
    "GradNorms",
    "Gradients",
    "HookSession",
    "InPlaceWarning",
    "JacobianNorms",
    "Moments",
    "NonFiniteWarning",
    "NoResidualWarning",
    "NothingRecordedWarning",
    "ParamGradNorms",
    "Probe",
    "ProbeError",
    "ResidualNorms",
    "ResidualSpec",
    "SegmentJacobians",
    "ShatteredGradients",
    "capture",
    "check_sites",
    "discover_sites",
    "find_blocks",
    "join_shards",
    "list_layers",
    "list_models",
    "load_model",
    "make_probe",
    "open",
    "register_residual",
    "response_std",
    "select_modules",
    "testing",
    "zoo",
]

# Where each public name lives. ``import probe`` loads none of them (nor torch), so the command
# line answers --help and argument errors at once; each loads, with its module, on first use.
_HOME = {
    "testing": ("probe.testing", None),
    "zoo": ("probe.zoo", None),
    **names_in("probe.capture", "capture"),
    **names_in("probe.conformance", "check_sites"),
    **names_in("probe.errors", "ProbeError"),
    **names_in(
        "probe.hooks",
        "ResidualSpec",
        "find_blocks",
        "list_layers",
        "register_residual",
        "select_modules",
    ),
    **names_in("probe.hooks.sites", "discover_sites"),
    **names_in("probe.jacobian", "JacobianNorms", "SegmentJacobians", "ShatteredGradients"),
    **names_in(
        "probe.probes",
        "Activations",
        "BlockTensors",
        "Call",
        "ChannelStats",
        "Gradients",
        "GradNorms",
        "Probe",
        "ResidualNorms",
    ),
    **names_in("probe.probes.params", "ParamGradNorms"),
    **names_in("probe.probes.registry", "make_probe"),
    **names_in(
        "probe.session",
        "HookSession",
        "InPlaceWarning",
        "NonFiniteWarning",
        "NoResidualWarning",
        "NothingRecordedWarning",
    ),
    **names_in("probe.sources", "load_model"),
    **names_in("probe.stats", "Moments", "response_std"),
    **names_in("probe.store", "join_shards"),
    "open": ("probe.store", "open_capture"),
    **names_in("probe.zoo", "list_models"),
}


__getattr__, __dir__ = attach(__name__, _HOME)
