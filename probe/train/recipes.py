"""Training recipes by name: the paper's schedule, a fast GPU schedule and the CPU digits default."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, NonNegativeFloat

from probe.errors import ProbeError, check_option, did_you_mean
from probe.validation import NonNegativeInt, PositiveFloat, PositiveInt, validate_fields

__all__ = ["Recipe", "RECIPES", "get_recipe", "lr_at"]


@dataclass(frozen=True)
class Recipe:
    """An optimisation recipe; iterations are counted in optimizer steps."""

    name: str
    epochs: NonNegativeInt  # training stops after this many epochs (or ``max_iters`` if set)
    batch_size: PositiveInt
    lr: PositiveFloat  # peak learning rate
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 1e-4
    schedule: str = (
        "step"  # "step" (divide by 10 at milestones) or "cosine" (linear warm-up, cosine)
    )
    milestones: tuple[PositiveInt, ...] = ()  # iterations at which "step" divides the lr by 10
    warmup_iters: NonNegativeInt = 0  # "cosine": ramp from 0; "step": constant warmup_lr this long
    warmup_lr: NonNegativeFloat = 0.0
    max_iters: PositiveInt | None = None  # hard stop in iterations (He et al. stop at 64k)
    wd_on_bn: bool = True  # apply weight decay to BN scales/shifts and biases too (He et al. do)

    def __post_init__(self) -> None:
        validate_fields(self)  # --set batch_size=-1 or lr=abc stop here, naming the field
        check_option("schedule", self.schedule, ["step", "cosine"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **kw: object) -> Recipe:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


RECIPES: dict[str, Recipe] = {
    # He et al. 2016, Sec. 4.2: batch 128, lr 0.1 /10 at 32k and 48k, stop at 64k iterations.
    "he2016": Recipe(
        "he2016",
        epochs=164,
        batch_size=128,
        lr=0.1,
        weight_decay=1e-4,
        schedule="step",
        milestones=(32000, 48000),
        max_iters=64000,
    ),
    # Minutes-scale GPU studies: large batch, one epoch of warm-up, cosine decay (cf. the anchor).
    "fast": Recipe(
        "fast",
        epochs=15,
        batch_size=512,
        lr=0.2,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_iters=98,
        wd_on_bn=False,
    ),
    # CPU default on the 8x8 digits: small batches so deep plain nets see enough steps to show
    # their optimisation difficulty within seconds.
    "digits": Recipe(
        "digits",
        epochs=12,
        batch_size=32,
        lr=0.05,
        nesterov=True,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_iters=45,
        wd_on_bn=False,
    ),
}


def get_recipe(name: str, depth: int | None = None, **overrides: object) -> Recipe:
    """Look up a recipe; ``he2016`` warms ResNet-110 and deeper up at lr 0.01 for 400 iterations.

    Example:
        >>> get_recipe("he2016", depth=110).warmup_iters
        400
    """
    if name not in RECIPES:
        raise ProbeError(
            f"Unknown recipe {name!r}; allowed: {', '.join(RECIPES)}." + did_you_mean(name, RECIPES)
        )
    recipe = RECIPES[name]
    if name == "he2016" and depth is not None and depth >= 110:
        # He et al.: "we use 0.01 to warm up the training until the training error is below 80%
        # (about 400 iterations), and then go back to 0.1".
        recipe = dataclasses.replace(recipe, warmup_iters=400, warmup_lr=0.01)
    try:
        return recipe.with_overrides(**overrides)
    except TypeError as e:
        raise ProbeError(f"Invalid recipe override {sorted(overrides)}: {e}") from e


def lr_at(recipe: Recipe, it: int, total_iters: int) -> float:
    """Learning rate at iteration ``it`` (0-based) of a run of ``total_iters`` iterations."""
    if recipe.schedule == "step":
        if it < recipe.warmup_iters:
            return recipe.warmup_lr
        return recipe.lr * 0.1 ** sum(it >= m for m in recipe.milestones)
    if recipe.schedule == "cosine":
        if it < recipe.warmup_iters:
            return recipe.lr * (it + 1) / recipe.warmup_iters
        span = max(1, total_iters - recipe.warmup_iters)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * (it - recipe.warmup_iters) / span))
    raise ProbeError(f"Unknown schedule {recipe.schedule!r}; allowed: step, cosine.")
