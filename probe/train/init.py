"""Initialisations the trainer applies at step 0 (``TrainConfig.init``).

* ``he``: the zoo's He (Kaiming) normal init; BN statistics calibrated on the training images.
* ``dirac``: Dirac kernels in every block conv (:func:`probe.zoo.identity.dirac_`), BN at its
  default (scale 1, shift 0): the "delta" init of DiracNets / Xiao et al. (2018) without any
  data-dependent step.
* ``identity``: every block computes y = x on the training data at step 0
  (:func:`probe.zoo.identity.identity_blocks_`): Dirac convs with BNs set from measured batch
  statistics in plain nets, zero last branch scale (SkipInit-like) in residual nets. The net then
  computes stem + pooling + classifier, the function of the shallowest net of its family.
* ``construct:<checkpoint>``: the trained shallower net of that checkpoint copied into the first
  blocks of each stage, extra blocks identities (:func:`probe.zoo.identity.construct_deeper_`);
  the deep net's eval-mode function equals the shallow net's exactly.

Example:
    >>> check_init("construct:runs/plain8/checkpoints/epoch-0012.json")
    ('construct', 'runs/plain8/checkpoints/epoch-0012.json')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from probe.errors import ProbeError, did_you_mean
from probe.zoo import CifarResNet
from probe.zoo.identity import (
    check_constructible,
    check_postact,
    construct_deeper_,
    dirac_,
    identity_blocks_,
)

__all__ = ["INITS", "Init", "check_init", "prepare_init"]

INITS = ("he", "dirac", "identity", "construct:<checkpoint>")


def check_init(spec: str) -> tuple[str, str]:
    """(kind, argument) of an init spec; a clear error for anything else."""
    kind, _, arg = str(spec).partition(":")
    if kind in ("he", "dirac", "identity") and not arg:
        return kind, ""
    if kind == "construct" and arg:
        return kind, arg
    raise ProbeError(
        f"Invalid init {spec!r}; allowed: {', '.join(INITS)} (e.g. "
        "construct:data/runs/plain8-digits-digits-s0/checkpoints/epoch-0012.json)."
        + did_you_mean(kind, ("he", "dirac", "identity", "construct"))
    )


@dataclass
class Init:
    """A validated init spec, with the shallower net already loaded for ``construct``.

    Made by :func:`prepare_init` before a run writes anything, so that a wrong spec or a damaged
    checkpoint stops the run before its directory exists.
    """

    spec: str
    kind: str
    shallow: CifarResNet | None = None
    meta: dict = field(default_factory=dict)

    def apply(
        self,
        model: CifarResNet,
        batches: Callable[[], Sequence[torch.Tensor]],
        calibrate: Callable[[], None],
    ) -> dict:
        """Initialise ``model``; returns the record kept in the run's history.

        ``batches()`` gives training batches at the recipe's batch size (for measured
        statistics), ``calibrate()`` sets every BN's running statistics from the training images.
        """
        record: dict = {"kind": self.kind}
        if self.kind == "dirac":
            dirac_(model)
        if self.kind in ("he", "dirac"):
            calibrate()
        elif self.kind == "identity":
            calibrate()  # the stem's BN; the blocks' BNs are then set to the identity
            identity_blocks_(model, model.blocks(), batches())
        else:
            assert self.shallow is not None
            built = construct_deeper_(model, self.shallow.to(_device(model)), batches())
            record.update(
                {
                    "from": self.spec.partition(":")[2],
                    "from_model": self.meta.get("model_name"),
                    "from_epoch": self.meta.get("epoch"),
                    "from_metrics": self.meta.get("metrics", {}),
                    **built.to_dict(),
                }
            )
        return record


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_init(spec: str, model: CifarResNet) -> Init:
    """Validate ``spec`` against ``model`` (the freshly created net); load a ``construct`` source."""
    kind, arg = check_init(spec)
    if kind != "he":  # every construction needs ReLU after the add
        check_postact(model.blocks())
    if kind != "construct":
        return Init(spec, kind)
    from probe.train.checkpoint import load_checkpoint

    shallow, meta = load_checkpoint(arg)
    check_constructible(model, shallow)
    return Init(spec, kind, shallow.eval(), meta)
