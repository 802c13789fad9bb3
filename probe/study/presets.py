"""Study presets are data: a :class:`StudyConfig` per name; every field can be overridden.

``default``: the offline digits study on the CPU -- plain and residual nets at depths 8, 20 and 32,
two seeds, captures at initialisation, mid-training and the end. ``he2016``: CIFAR-10, depths
20/32/44/56 with the ``fast`` recipe on a GPU (set ``depths`` to add 110, ``recipe`` to use he2016).
``interventions``: every intervention arm (probe.study.interventions) on digits, three seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from probe.errors import ProbeError, did_you_mean

__all__ = ["StudyConfig", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class StudyConfig:
    """Everything a degradation study does; recorded in the report's provenance."""

    name: str = "default"
    dataset: str = "digits"  # digits, cifar10, cifar100, or a path to an image tree / .tar.gz
    train_limit: int | None = None  # train on the first N training images (CPU-sized CIFAR studies)
    families: tuple[str, ...] = ("plain", "resnet")  # registry families compared at each depth
    depths: tuple[int, ...] = (8, 20, 32)  # 6n+2
    seeds: tuple[int, ...] = (0, 1)
    recipe: str = "digits"  # he2016, fast, digits
    recipe_overrides: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)  # e.g. {"shortcut": "B"}
    capture_at: tuple[str, ...] = ("0", "mid", "last")  # epochs: numbers, "mid" or "last"
    split: str = "test"  # the split probes run on
    capture_limit: int | None = None  # samples per capture (None: the whole split)
    batch_size: int = 512
    probes: tuple[str, ...] = (
        "residual",
        "channel",
        "grad",
        "activations:dtype=fp16,max_samples=256",
        "jacobian:n_probes=8,max_samples=32,top_k=1,iters=10,slq_steps=8,spectrum_samples=8",
        "shattered:n_points=64,max_lag=16,max_samples=8",
        "segments:n_probes=8,max_samples=8",
        "param_grads:max_samples=32",
    )
    lesions: bool = True
    lesion_limit: int | None = None  # test images per lesion pass (None: the whole test split)
    device: str = "auto"
    cuda_graph: bool = False  # train with CUDA graphs (one GPU; docs/training.md)
    # Intervention arms (probe.study.interventions.ARMS, or "all"), trained beside the grid at the
    # shallowest (S) and deepest (D) depth; their settings:
    arms: tuple[str, ...] = ()
    lambdas: tuple[float, ...] = (0.0, 0.5, 1.0)  # shortcut_scale arm: y = act(lambda x + F(x))
    lrs: tuple[float, ...] = (0.1, 0.03, 0.01)  # lr arm: peak learning rates
    toy_seeds: int = 200  # toy arm: initialisations

    def __post_init__(self) -> None:
        from probe.study.interventions.arms import ARMS, check_arms

        if self.arms == ("all",):
            object.__setattr__(self, "arms", tuple(ARMS))
        check_arms(self.arms)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: object) -> StudyConfig:
        fields = {f.name: f for f in dataclasses.fields(self)}
        clean = {}
        for key, value in overrides.items():
            if key not in fields:
                raise ProbeError(
                    f"Unknown study field {key!r}; fields: {', '.join(fields)}."
                    + did_you_mean(key, fields)
                )
            if isinstance(getattr(self, key), tuple) and not isinstance(value, tuple):
                value = (
                    tuple(value)
                    if isinstance(value, list)
                    else tuple(v.strip() for v in str(value).split(","))
                )
                kind = {"depths": int, "seeds": int, "lambdas": float, "lrs": float}.get(key)
                if kind is not None:
                    try:
                        value = tuple(kind(v) for v in value)
                    except ValueError as e:
                        example = "20,32" if kind is int else "0.1,0.01"
                        raise ProbeError(
                            f"Study field {key!r} takes {'integers' if kind is int else 'numbers'}, "
                            f"e.g. {key}={example}; got "
                            f"{overrides[key]!r}."
                        ) from e
            clean[key] = value
        return dataclasses.replace(self, **clean)

    @property
    def models(self) -> list[str]:
        return [f"{fam}{d}" for d in self.depths for fam in self.families]


PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "he2016": StudyConfig(
        name="he2016",
        dataset="cifar10",
        depths=(20, 32, 44, 56),
        seeds=(0,),
        recipe="fast",
        capture_limit=1000,
        batch_size=500,
        probes=(
            "residual",
            "channel",
            "grad",
            "activations:dtype=fp16,max_samples=500",
            "jacobian:n_probes=16,max_samples=64,top_k=1,iters=15,slq_steps=20,spectrum_samples=16",
            "shattered:n_points=128,max_lag=32,max_samples=8",
            "segments:n_probes=8,max_samples=16",
            "param_grads:max_samples=64",
        ),
    ),
    # Every intervention arm on digits, three seeds, in minutes on a CPU: the grid is plain and
    # residual nets at depths 8 and 32 with a 6-epoch schedule (at 12 epochs plain-32 nearly
    # catches up on digits, leaving too small a gap to intervene on) and light probes.
    "interventions": StudyConfig(
        name="interventions",
        depths=(8, 32),
        seeds=(0, 1, 2),
        recipe_overrides={"epochs": 6},
        capture_at=("0", "last"),
        capture_limit=256,
        probes=("residual", "grad"),
        lesions=False,
        arms=("all",),
    ),
}


def get_preset(name: str, **overrides: object) -> StudyConfig:
    if name not in PRESETS:
        raise ProbeError(
            f"Unknown study preset {name!r}; presets: {', '.join(PRESETS)}."
            + did_you_mean(name, PRESETS)
        )
    return PRESETS[name].with_overrides(**overrides)
