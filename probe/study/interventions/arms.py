"""The intervention experiments: each a named arm of the study with the runs it needs.

Every arm changes one thing against the study's grid (plain and residual nets at the shallowest
depth S and the deepest depth D of ``StudyConfig.depths``) and watches the training error. A run
is a :class:`Condition`; conditions whose ``key`` is a grid model (``plain32``) are the grid's own
runs, shared between arms, so the baselines are trained once.

References (science.md §2): He et al. 2016 §1 (the constructed solution); De & Smith 2020
(SkipInit), Zagoruyko & Komodakis 2017 (DiracNets) and Xiao et al. 2018 (delta-orthogonal) for
identity initialisation (E12); He et al. 2016b Table 1 for scaled shortcuts (E11); Li et al. 2018
for the learning-rate dependence (E13); Mehmeti-Göpel & Wand 2025 for matched training loss (E14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from probe.errors import ProbeError, did_you_mean

__all__ = ["Condition", "Arm", "ARMS", "arm_conditions", "check_arms", "lr_key", "scale_key"]


@dataclass(frozen=True)
class Condition:
    """One training run of an arm (repeated for every study seed)."""

    key: str  # run directory runs/<key>-s<seed>; a grid model name means the grid's run
    model: str  # registry name
    label: str  # how tables and figures name it
    model_options: dict = field(default_factory=dict)
    recipe_overrides: dict = field(default_factory=dict)
    init: str = "he"  # TrainConfig.init; "construct:@<key>" = that key's last checkpoint, same seed
    save_at: str = "0,last"  # checkpoints (captures read them)


@dataclass(frozen=True)
class Arm:
    name: str
    title: str
    question: str
    manipulation: str
    reference: str
    conditions: Callable[[tuple[str, str], int, int, object], list[Condition]]
    tests: tuple[str, ...] = ()  # correlational explanations (verdict titles' first words) it tests


def _baselines(fam: tuple[str, str], s: int, d: int) -> list[Condition]:
    p, r = fam
    return [
        Condition(f"{p}{d}", f"{p}{d}", f"{p}-{d}"),
        Condition(f"{r}{d}", f"{r}{d}", f"{r}-{d}"),
    ]


def _constructed(fam, s, d, cfg) -> list[Condition]:
    p, r = fam
    every = "0,1,2,mid,last"  # identity-closeness of the extra blocks over training
    return [
        Condition(f"{p}{s}", f"{p}{s}", f"{p}-{s}"),
        Condition(f"{r}{s}", f"{r}{s}", f"{r}-{s}"),
        *_baselines(fam, s, d),
        Condition(
            f"{p}{d}-constructed",
            f"{p}{d}",
            f"{p}-{d} from {p}-{s}",
            init=f"construct:@{p}{s}",
            save_at=every,
        ),
        Condition(
            f"{r}{d}-constructed",
            f"{r}{d}",
            f"{r}-{d} from {r}-{s}",
            init=f"construct:@{r}{s}",
            save_at=every,
        ),
    ]


def _skipinit(fam, s, d, cfg) -> list[Condition]:
    p, r = fam
    return [
        *_baselines(fam, s, d),
        Condition(f"{p}{d}-identity", f"{p}{d}", f"{p}-{d}, identity init", init="identity"),
        Condition(f"{p}{d}-dirac", f"{p}{d}", f"{p}-{d}, Dirac kernels only", init="dirac"),
        Condition(
            f"{r}{d}-skipinit", f"{r}{d}", f"{r}-{d}, SkipInit", model_options={"zero_init": True}
        ),
    ]


def scale_key(r: str, d: int, lam: float) -> str:
    return f"{r}{d}-lambda{lam:g}"


def _shortcut_scale(fam, s, d, cfg) -> list[Condition]:
    p, r = fam
    out = []
    for lam in cfg.lambdas:
        if lam == 0:  # y = act(F(x)): the plain net itself, weight for weight (tested)
            out.append(Condition(f"{p}{d}", f"{p}{d}", f"λ = 0 ({p}-{d})"))
        elif lam == 1:
            out.append(Condition(f"{r}{d}", f"{r}{d}", f"λ = 1 ({r}-{d})"))
        else:
            out.append(
                Condition(
                    scale_key(r, d, lam),
                    f"{r}{d}",
                    f"λ = {lam:g}",
                    model_options={"shortcut_scale": lam},
                )
            )
    return out


def lr_key(m: str, lr: float) -> str:
    return f"{m}-lr{lr:g}"


def _learning_rate(fam, s, d, cfg) -> list[Condition]:
    return [
        Condition(
            lr_key(f"{m}{d}", lr), f"{m}{d}", f"{m}-{d}, lr {lr:g}", recipe_overrides={"lr": lr}
        )
        for lr in cfg.lrs
        for m in fam
    ]


def _matched_loss(fam, s, d, cfg) -> list[Condition]:
    return _baselines(fam, s, d)


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm(
            "constructed",
            "Constructed solution (He et al. 2016, §1)",
            "Handed the solution the argument says exists -- the trained shallow net with identity "
            "extra blocks -- does SGD keep it, improve on it, or leave it?",
            "plain-D built from trained plain-S (first blocks of each stage copied, extra blocks "
            "Dirac convs with BNs set from measured batch statistics: exact in eval mode); the "
            "same from resnet-S with zero extra branches; then the normal recipe from step 0",
            "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, §1",
            _constructed,
            ("Identity is hard to learn",),
        ),
        Arm(
            "skipinit",
            "Identity and zero initialisation without a copy (E12)",
            "Does starting every block at the identity close the degradation gap?",
            "plain-D with every block the identity at step 0 (Dirac convs, BNs from measured "
            "statistics), plain-D with Dirac kernels only (BN at scale 1, shift 0), resnet-D with "
            "the last BN scale of every branch 0 (SkipInit)",
            "De & Smith, NeurIPS 2020 (SkipInit); Zagoruyko & Komodakis 2017 (DiracNets); "
            "Xiao et al., ICML 2018 (delta-orthogonal)",
            _skipinit,
            (
                "Identity is hard to learn",
                "Ill-conditioned Jacobians",
                "Residual branches stay small",
            ),
        ),
        Arm(
            "shortcut_scale",
            "Shortcut scaling (E11, He et al. 2016b)",
            "With y = act(λ·x + F(x)), how do training error and the gradient profile change with λ?",
            "resnet-D with the shortcut multiplied by λ (λ = 0 is plain-D, λ = 1 resnet-D)",
            "He, Zhang, Ren, Sun. Identity Mappings in Deep Residual Networks. ECCV 2016, Table 1, Eq. 4-5",
            _shortcut_scale,
            ("Vanishing gradients",),
        ),
        Arm(
            "lr",
            "Learning rate (E13)",
            "Is the plain-vs-residual gap smaller at lower learning rates?",
            "plain-D and resnet-D with the recipe's peak learning rate replaced",
            "Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape. NeurIPS 2018 "
            "(plain-110 at lr 0.01); Yang et al., ICLR 2019",
            _learning_rate,
            ("Degradation",),
        ),
        Arm(
            "matched_loss",
            "Matched training loss (E14)",
            "Stopped at the same training loss, does the plain net generalise worse?",
            "test error of plain-D and resnet-D read at the first epoch each reaches the same "
            "training loss (interpolated between evaluated epochs)",
            "Mehmeti-Göpel & Wand. ResNets Are Deeper Than You Think. NeurIPS 2025",
            _matched_loss,
            ("Degradation",),
        ),
        Arm(
            "toy",
            "The scalar toy: identity against zero",
            "In six scalar layers fitting 4x + 3, is learning four identities slower or less "
            "reliable than learning four zeros?",
            "the same stack and initial draws, with and without a skip around each middle layer",
            "He et al. 2016, §3.1 (the argument); probe.study.interventions.toy",
            lambda fam, s, d, cfg: [],
            ("Identity is hard to learn",),
        ),
    )
}


def check_arms(arms: tuple[str, ...]) -> None:
    for a in arms:
        if a not in ARMS:
            raise ProbeError(
                f"Unknown study arm {a!r}; arms: {', '.join(ARMS)} (or 'all')."
                + did_you_mean(a, ARMS)
            )


def arm_conditions(
    arm: str, families: tuple[str, str], depths: tuple[int, ...], cfg
) -> list[Condition]:
    """The conditions of ``arm`` for a study over ``families`` at ``depths`` (S = min, D = max)."""
    s, d = min(depths), max(depths)
    if s == d and arm == "constructed":
        raise ProbeError(
            f"The constructed arm needs two depths (a shallow net to copy and a deeper one); got "
            f"depths={depths}. Example: --set depths=8,32."
        )
    return ARMS[arm].conditions(families, s, d, cfg)
