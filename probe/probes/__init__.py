"""Built-in probes and the base class for your own."""

from probe.probes.activations import Activations, Gradients
from probe.probes.base import BlockTensors, Call, Probe
from probe.probes.statistics import ChannelStats, GradNorms, ResidualNorms

__all__ = [
    "Activations",
    "BlockTensors",
    "Call",
    "ChannelStats",
    "GradNorms",
    "Gradients",
    "Probe",
    "ResidualNorms",
]
