"""The degradation study: presets, runner, verdicts and report."""

from probe.study.presets import PRESETS, StudyConfig, get_preset
from probe.study.references import PUBLISHED_CIFAR10, published_test_error
from probe.study.runner import StudyResult, capture_epochs, run_study
from probe.study.verdicts import Verdict, degradation_table, verdicts

__all__ = [
    "PRESETS",
    "PUBLISHED_CIFAR10",
    "StudyConfig",
    "StudyResult",
    "Verdict",
    "capture_epochs",
    "degradation_table",
    "get_preset",
    "published_test_error",
    "run_study",
    "verdicts",
]
