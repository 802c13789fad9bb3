"""Verdict rules on hand-made tables: each outcome of the degradation and lesion rules."""

import pandas as pd
import pytest

from probe.study.verdicts import verdicts

DEPTHS = (20, 56)


def _runs(errors: dict[str, list[float] | float]) -> pd.DataFrame:
    """One row per (model, seed); a float is one seed, a list one value per seed."""
    rows = []
    for m, e in errors.items():
        for seed, v in enumerate(e if isinstance(e, list) else [e]):
            rows.append({"model": m, "seed": seed, "train_error": v, "test_error": v})
    return pd.DataFrame(rows)


def _lesions(model: str, baseline: float, deltas: list[float], seed: int = 0) -> list[dict]:
    key = {"model": model, "seed": seed, "checkpoint": 12, "downsampling": False}
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


def _seeds(v: float, spread: float = 0.002, n: int = 3) -> list[float]:
    return [v + spread * k for k in range(-(n // 2), n - n // 2)]


@pytest.mark.parametrize(
    "errors, expected",
    [
        # plain +34 points, residual +0.9: the shortcut removes 97% of the depth penalty
        (
            {"plain20": 0.307, "plain56": 0.649, "resnet20": 0.236, "resnet56": 0.245},
            "present",
        ),
        ({"plain20": 0.10, "plain56": 0.20, "resnet20": 0.08, "resnet56": 0.07}, "present"),
        # both degrade, the residual net by 40% of the plain gap: neither outcome
        ({"plain20": 0.10, "plain56": 0.20, "resnet20": 0.08, "resnet56": 0.12}, "inconclusive"),
        # plain +0.35 points, residual 60% of it: not "removed" (a 0.5-point floor called this present)
        (
            {"plain20": 0.10, "plain56": 0.1035, "resnet20": 0.08, "resnet56": 0.0821},
            "inconclusive",
        ),
        ({"plain20": 0.10, "plain56": 0.09, "resnet20": 0.08, "resnet56": 0.07}, "absent"),
        ({"plain20": 0.10, "plain56": 0.12, "resnet20": 0.08, "resnet56": 0.11}, "absent"),
    ],
)
def test_degradation_rule_with_three_seeds(errors, expected):
    runs = _runs({m: _seeds(e, spread=0.0005) for m, e in errors.items()})
    assert _verdict(runs, EMPTY, "Degradation").verdict == expected


def test_one_seed_is_never_enough():
    errors = {"plain20": 0.307, "plain56": 0.649, "resnet20": 0.236, "resnet56": 0.245}
    v = _verdict(_runs(errors), EMPTY, "Degradation")
    assert v.verdict == "inconclusive" and "fewer than 2 seeds" in v.evidence["why inconclusive"]


def test_two_noisy_seeds_whose_interval_includes_zero_are_inconclusive():
    errors = {
        "plain20": [0.10, 0.10],
        "plain56": [0.09, 0.13],  # +1 point on average, but seeds disagree by 4 points
        "resnet20": [0.08, 0.08],
        "resnet56": [0.08, 0.08],
    }
    v = _verdict(_runs(errors), EMPTY, "Degradation")
    assert v.verdict == "inconclusive" and "(n=2)" in v.evidence["depth penalty plain"]


def test_two_consistent_seeds_decide():
    errors = {
        "plain20": [0.100, 0.101],
        "plain56": [0.200, 0.202],
        "resnet20": [0.080, 0.081],
        "resnet56": [0.080, 0.081],
    }
    assert _verdict(_runs(errors), EMPTY, "Degradation").verdict == "present"


def test_intervals_of_error_rates_stay_within_zero_and_one():
    errors = {
        "plain20": [0.0, 0.03],
        "plain56": [0.5, 0.99],
        "resnet20": [0.0, 0.0],
        "resnet56": [0.01, 0.0],
    }
    v = _verdict(_runs(errors), EMPTY, "Degradation")
    for label in ("train error plain20", "train error plain56"):
        lo, hi = (
            float(x.rstrip("%")) for x in v.evidence[label].split("[")[1].split("]")[0].split(", ")
        )
        assert 0.0 <= lo <= hi <= 100.0, (label, v.evidence[label])


def test_shallow_nets_at_chance_make_degradation_inconclusive():
    errors = {m: _seeds(0.9) for m in ("plain20", "plain56", "resnet20", "resnet56")}
    errors["plain56"] = _seeds(0.9)
    v = _verdict(_runs(errors), EMPTY, "Degradation")
    assert v.verdict == "inconclusive" and "did not train" in v.evidence["why inconclusive"]


RUNS = _runs(
    {
        "plain20": _seeds(0.1),
        "plain56": _seeds(0.3),
        "resnet20": _seeds(0.1),
        "resnet56": _seeds(0.1),
    }
)


def _lesion_table(plain, resnet, seeds=3):
    rows = []
    for s in range(seeds):
        jitter = [0.001 * s] * 3
        rows += _lesions("plain56", plain[0], [d + j for d, j in zip(plain[1], jitter)], s)
        rows += _lesions("resnet56", resnet[0], [d + j for d, j in zip(resnet[1], jitter)], s)
    return pd.DataFrame(rows)


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
    assert _verdict(RUNS, _lesion_table(plain, resnet), "Ensemble").verdict == expected


def test_lesions_of_a_plain_net_already_at_chance_are_inconclusive():
    # deleting a block cannot raise a 90%-error net's error; that is no evidence against ensembles
    v = _verdict(
        RUNS, _lesion_table((0.90, [0.0, 0.0, 0.0]), (0.05, [0.002, 0.0, 0.001])), "Ensemble"
    )
    assert v.verdict == "inconclusive" and "plain56" in v.evidence["why inconclusive"]


def test_lesion_rule_without_lesions_is_inconclusive():
    assert _verdict(RUNS, EMPTY, "Ensemble").verdict == "inconclusive"


def test_lesion_rule_with_one_seed_is_inconclusive():
    table = _lesion_table((0.05, [0.85, 0.80, 0.84]), (0.05, [0.002, 0.004, 0.0]), seeds=1)
    assert _verdict(RUNS, table, "Ensemble").verdict == "inconclusive"


def _closeness(plain: list[float], resnet: list[float]) -> pd.DataFrame:
    rows = [
        {
            "model": m,
            "seed": s,
            "checkpoint": 12,
            "quantity": "closeness",
            "layer": "b0",
            "layer_index": 0,
            "value": v,
        }
        for m, vals in (("plain56", plain), ("resnet56", resnet))
        for s, v in enumerate(vals)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "plain, resnet, expected",
    [
        ([1.2, 1.25, 1.18], [0.30, 0.34, 0.32], "supported"),
        ([0.30, 0.31, 0.29], [0.32, 0.33, 0.34], "not supported"),
        ([1.2, 0.2, 1.3], [0.30, 0.34, 0.32], "inconclusive"),  # one seed disagrees
        ([1.2], [0.3], "inconclusive"),
    ],
)
def test_identity_rule(plain, resnet, expected):
    assert _verdict(RUNS, _closeness(plain, resnet), "Identity").verdict == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_run_whose_value_is_not_finite_is_not_left_out_silently(bad):
    """Three seeds that support the rule, plus a fourth whose value is NaN or infinite (a diverged
    seed, a non-finite capture): the verdict is inconclusive and says why, and the evidence
    counts only the runs its interval is made of. Left out, the other seeds decided alone while
    the evidence said n=4."""
    good = _verdict(RUNS, _closeness([1.2, 1.25, 1.18], [0.30, 0.34, 0.32]), "Identity")
    assert good.verdict == "supported"
    v = _verdict(RUNS, _closeness([1.2, 1.25, 1.18, bad], [0.30, 0.34, 0.32, 0.31]), "Identity")
    assert v.verdict == "inconclusive"
    assert (
        v.evidence["why inconclusive"] == "runs with a value that is not finite: plain56 (1 of 4)"
    )
    assert v.evidence["d plain56"].endswith("(n=3); 1 run(s) not finite")
    assert v.evidence["d resnet56"].endswith("(n=4)")


def test_every_rule_is_inconclusive_when_the_residual_reference_did_not_train():
    runs = _runs(
        {
            "plain20": _seeds(0.1),
            "plain56": _seeds(0.3),
            "resnet20": _seeds(0.1),
            "resnet56": _seeds(0.89),
        }
    )
    v = _verdict(runs, _closeness([1.2, 1.25, 1.18], [0.30, 0.34, 0.32]), "Identity")
    assert (
        v.verdict == "inconclusive" and "resnet56 did not train" in v.evidence["why inconclusive"]
    )


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
