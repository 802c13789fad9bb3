"""Intervention experiments: change one thing against the study's grid and watch the training error.

Arms (``StudyConfig.arms``; ``probe study --arm ...``): ``constructed`` (He et al.'s constructed
solution, run literally), ``skipinit`` (identity and zero initialisation), ``shortcut_scale``
(y = act(lambda x + F(x))), ``lr`` (learning rate), ``matched_loss`` (test error at equal training
loss) and ``toy`` (the scalar identity-versus-zero example). See docs/study.md.
"""

from probe.study.interventions.arms import ARMS, Arm, Condition, arm_conditions
from probe.study.interventions.figures import write_arm_figures
from probe.study.interventions.runner import InterventionData, conditions_for, run_interventions
from probe.study.interventions.toy import ToyConfig, ToyResult, run_toy
from probe.study.interventions.verdicts import (
    MARGIN,
    grad_slopes,
    intervention_verdicts,
    link_tests,
    matched_loss_table,
)

__all__ = [
    "ARMS",
    "MARGIN",
    "Arm",
    "Condition",
    "InterventionData",
    "ToyConfig",
    "ToyResult",
    "arm_conditions",
    "conditions_for",
    "grad_slopes",
    "intervention_verdicts",
    "link_tests",
    "matched_loss_table",
    "run_interventions",
    "run_toy",
    "write_arm_figures",
]
