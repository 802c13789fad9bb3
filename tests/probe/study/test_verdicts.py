"""Verdict rules on hand-made tables: each outcome of the degradation and lesion rules."""

import pandas as pd
import pytest

from probe.study.verdicts import verdicts

DEPTHS = (20, 56)


def _runs(errors: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": m, "seed": 0, "train_error": e, "test_error": e} for m, e in errors.items()]
    )


def _lesions(model: str, baseline: float, deltas: list[float]) -> list[dict]:
    key = {"model": model, "seed": 0, "checkpoint": 12, "downsampling": False}
    rows = [{**key, "quantity": "lesion_baseline", "layer": "none", "value": baseline}]
    rows += [
        {**key, "quantity": "lesion_error", "layer": f"b{i}", "value": baseline + d}
        for i, d in enumerate(deltas)
    ]
    return rows


def _verdict(runs, table, name):
    out = verdicts(table, runs, ("plain", "resnet"), DEPTHS, 0, 12, num_classes=10)
    return next(v for v in out if v.explanation.startswith(name))


EMPTY = pd.DataFrame(columns=["model", "seed", "checkpoint", "quantity", "layer", "value"])


@pytest.mark.parametrize(
    "errors, expected",
    [
        # plain +34 points, residual +0.9: the shortcut removes 97% of the depth penalty
        ({"plain20": 0.307, "plain56": 0.649, "resnet20": 0.236, "resnet56": 0.245}, "present"),
        ({"plain20": 0.10, "plain56": 0.20, "resnet20": 0.08, "resnet56": 0.07}, "present"),
        # both degrade, the residual net by 40% of the plain gap: neither outcome
        ({"plain20": 0.10, "plain56": 0.20, "resnet20": 0.08, "resnet56": 0.12}, "inconclusive"),
        ({"plain20": 0.10, "plain56": 0.09, "resnet20": 0.08, "resnet56": 0.07}, "absent"),
        ({"plain20": 0.10, "plain56": 0.12, "resnet20": 0.08, "resnet56": 0.11}, "absent"),
    ],
)
def test_degradation_rule(errors, expected):
    assert _verdict(_runs(errors), EMPTY, "Degradation").verdict == expected


def test_degradation_tolerance_is_at_least_half_a_point():
    errors = {"plain20": 0.10, "plain56": 0.11, "resnet20": 0.08, "resnet56": 0.0849}
    assert _verdict(_runs(errors), EMPTY, "Degradation").verdict == "present"


RUNS = _runs({"plain20": 0.1, "plain56": 0.3, "resnet20": 0.1, "resnet56": 0.1})


@pytest.mark.parametrize(
    "plain, resnet, expected",
    [
        ((0.05, [0.85, 0.80, 0.84]), (0.05, [0.002, 0.004, 0.0]), "supported"),
        # plain net already at 65% error cannot lose 20 points, but it reaches chance
        ((0.65, [0.25, 0.24, 0.25]), (0.30, [0.002, 0.004, 0.0]), "supported"),
        ((0.65, [0.10, 0.12, 0.11]), (0.30, [0.002, 0.004, 0.0]), "inconclusive"),
        ((0.65, [0.25, 0.24, 0.25]), (0.30, [0.03, 0.02, 0.04]), "inconclusive"),
        ((0.05, [0.02, 0.03, 0.02]), (0.05, [0.05, 0.06, 0.05]), "not supported"),
    ],
)
def test_lesion_rule(plain, resnet, expected):
    table = pd.DataFrame(_lesions("plain56", *plain) + _lesions("resnet56", *resnet))
    assert _verdict(RUNS, table, "Ensemble").verdict == expected


def test_lesion_rule_without_lesions_is_inconclusive():
    assert _verdict(RUNS, EMPTY, "Ensemble").verdict == "inconclusive"


def test_degradation_table_shows_published_cifar10_errors_only_for_cifar10():
    from probe.study.report import _degradation_html
    from probe.study.verdicts import degradation_table

    runs = pd.DataFrame(
        [
            {
                "family": f,
                "depth": 56,
                "seed": 0,
                "train_error": 0.1,
                "train_loss": 0.3,
                "test_error": 0.12,
                "wall_s": 1.0,
            }
            for f in ("plain", "resnet")
        ]
    )
    page = _degradation_html(degradation_table(runs, "cifar10-jpg"))
    assert "published test error" in page and "6.97% (He et al. 2016, Table 6)" in page
    assert "12.95%" in page
    assert "published" not in _degradation_html(degradation_table(runs, "digits"))
