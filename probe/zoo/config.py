"""The configuration of a zoo network, apart from the network: what names, checkpoints and the
registry read without building a model (and without loading torch).

Example:
    >>> NetConfig(depth=56, residual=False).blocks_per_stage
    9
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from probe.errors import ProbeError, check_option
from probe.validation import validate_fields

__all__ = ["NetConfig"]


@dataclass(frozen=True)
class NetConfig:
    """Everything that defines an architecture; serialised next to every checkpoint."""

    depth: int = 20  # 6n+2: 20, 32, 44, 56, 110, 1202 in He et al. (2016)
    residual: bool = True  # False gives the plain counterpart with identical module names
    shortcut: str = "A"  # "A": subsample + zero-pad channels (parameter-free); "B": 1x1 conv + BN
    preact: bool = False  # pre-activation blocks (He et al. 2016b) instead of the original ones
    width: int = 16  # channels of the first stage; stages use width, 2*width, 4*width
    num_classes: int = 10
    in_channels: int = 3
    zero_init: bool = False  # zero the last scale of every branch so each block starts as act(S(x))
    shortcut_scale: float = (
        1.0  # lambda in y = act(lambda * S(x) + F(x)) (He et al. 2016b, Table 1)
    )

    def __post_init__(self) -> None:
        validate_fields(self)  # types first: width=2.5 or depth="x" from a JSON or --opt
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ProbeError(
                f"Invalid depth {self.depth}: He et al. CIFAR nets have depth 6n+2 with n >= 1 "
                "(8, 14, 20, 32, 44, 56, 110, ...)."
            )
        check_option("shortcut", self.shortcut, ["A", "B"])
        if self.width < 1 or self.num_classes < 1 or self.in_channels < 1:
            raise ProbeError(
                f"width, num_classes and in_channels must be positive; got width={self.width}, "
                f"num_classes={self.num_classes}, in_channels={self.in_channels}."
            )

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
