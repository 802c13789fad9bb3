"""The degradation study: presets, runner, verdicts and report."""

from probe.study.presets import PRESETS, StudyConfig, get_preset
from probe.study.runner import StudyResult, capture_epochs, run_study
from probe.study.verdicts import Verdict, degradation_table, verdicts

__all__ = [
    "PRESETS",
    "StudyConfig",
    "StudyResult",
    "Verdict",
    "capture_epochs",
    "degradation_table",
    "get_preset",
    "run_study",
    "verdicts",
]
