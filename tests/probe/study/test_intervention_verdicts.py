"""Each intervention arm's verdict rule on hand-made tables: every outcome, and too few seeds."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from probe.study.interventions import grad_slopes, intervention_verdicts, matched_loss_table
from probe.study.interventions.runner import InterventionData
from probe.study.interventions.toy import ACTIVATIONS, _forward
from probe.study.interventions.verdicts import _cross

CFG = SimpleNamespace(
    families=("plain", "resnet"), depths=(8, 32), lambdas=(0.0, 0.5, 1.0), lrs=(0.1, 0.01)
)


def _seeds(v: float, n: int = 3, spread: float = 0.001) -> list[float]:
    return [v + spread * (k - (n - 1) / 2) for k in range(n)]


def _data(
    arm: str, finals: dict[str, list[float]], starts: dict[str, list[float]] | None = None, **kw
):
    rows = []
    for key, vals in finals.items():
        for seed, v in enumerate(vals):
            start = (starts or {}).get(key, [np.nan] * len(vals))[seed]
            rows.append(
                {
                    "arm": arm,
                    "key": key,
                    "label": key,
                    "seed": seed,
                    "final_train_error": v,
                    "final_test_error": v,
                    "start_train_error": start,
                    "source_train_error": start,
                    "construct_eval_max_abs_diff": 1e-6,
                    "construct_train_rel_diff": 0.03,
                }
            )
    return InterventionData((arm,), pd.DataFrame(rows), kw.pop("curves", pd.DataFrame()), **kw)


def _verdict(data):
    (v,) = intervention_verdicts(data, CFG)
    return v


@pytest.mark.parametrize(
    "final,verdict",
    [
        (0.05, "SGD leaves it"),
        (0.0, "SGD stays at it"),
        (-0.05, "SGD improves on it"),
        (0.004, "inconclusive"),
    ],
)
def test_constructed_rule(final, verdict):
    spread = 0.0 if final == 0.0 else 0.004
    d = _data(
        "constructed",
        {
            "plain32-constructed": _seeds(0.1 + final, spread=spread),
            "resnet32-constructed": [0.1, 0.1, 0.1],
            "plain32": _seeds(0.1),
        },
        starts={"plain32-constructed": [0.1] * 3, "resnet32-constructed": [0.1] * 3},
    )
    assert _verdict(d).verdict == verdict


def test_constructed_rule_needs_two_seeds():
    d = _data(
        "constructed",
        {"plain32-constructed": [0.2], "resnet32-constructed": [0.0], "plain32": [0.1]},
        starts={"plain32-constructed": [0.0], "resnet32-constructed": [0.0]},
    )
    v = _verdict(d)
    assert v.verdict == "inconclusive" and "fewer than 2 seeds" in v.evidence["why inconclusive"]


@pytest.mark.parametrize(
    "identity,He,verdict",
    [(0.012, 0.10, "supported"), (0.09, 0.10, "not supported"), (0.01, 0.012, "inconclusive")],
)
def test_skipinit_rule(identity, He, verdict):
    d = _data(
        "skipinit",
        {
            "plain32": _seeds(He),
            "resnet32": _seeds(0.01),
            "plain32-identity": _seeds(identity),
            "plain32-dirac": _seeds(0.9),
            "resnet32-skipinit": _seeds(0.01),
        },
    )
    v = _verdict(d)
    assert v.verdict == verdict
    if verdict == "inconclusive":
        assert "no gap to close" in v.evidence["why inconclusive"]


@pytest.mark.parametrize("half,verdict", [(0.2, "supported"), (0.01, "not supported")])
def test_shortcut_scale_rule(half, verdict):
    d = _data(
        "shortcut_scale",
        {"plain32": _seeds(0.3), "resnet32-lambda0.5": _seeds(half), "resnet32": _seeds(0.01)},
    )
    assert _verdict(d).verdict == verdict


@pytest.mark.parametrize(
    "low,verdict",
    [((0.03, 0.01), "supported"), ((0.11, 0.01), "not supported"), ((0.9, 0.9), "inconclusive")],
)
def test_lr_rule(low, verdict):
    d = _data(
        "lr",
        {
            "plain32-lr0.1": _seeds(0.11),
            "resnet32-lr0.1": _seeds(0.01),
            "plain32-lr0.01": _seeds(low[0]),
            "resnet32-lr0.01": _seeds(low[1]),
        },
    )
    v = _verdict(d)
    assert v.verdict == verdict
    if verdict == "inconclusive":
        assert "did not train" in v.evidence["why inconclusive"]


def _curves(key: str, losses: list[float], errors: list[float], seed: int) -> list[dict]:
    return [
        {
            "key": key,
            "label": key,
            "seed": seed,
            "epoch": e,
            "step": 10 * e,
            "train_loss": l,
            "test_error": t,
        }
        for e, (l, t) in enumerate(zip(losses, errors))
    ]


def test_crossing_interpolates_in_log_loss():
    c = pd.DataFrame(_curves("a", [1.0, 0.1, 0.01], [0.5, 0.3, 0.1], 0))
    epoch, err = _cross(c, 10**-1.5)  # halfway between epochs 1 and 2 in log-loss
    assert epoch == pytest.approx(1.5) and err == pytest.approx(0.2)
    assert np.isnan(_cross(c, 1e-3)[0])


@pytest.mark.parametrize("plain_err,verdict", [(0.10, "supported"), (0.05, "not supported")])
def test_matched_loss_rule(plain_err, verdict):
    rows = []
    for seed in range(3):
        j = 0.002 * seed
        # plain reaches the loss later and (here) with a higher test error at the matched point
        rows += _curves(
            "plain32", [2.0, 0.5, 0.1, 0.05], [0.9, 0.3, plain_err + j, plain_err + j], seed
        )
        rows += _curves(
            "resnet32", [2.0, 0.1, 0.05, 0.02], [0.9, 0.06 + j, 0.05 + j, 0.05 + j], seed
        )
    curves = pd.DataFrame(rows)
    table, target = matched_loss_table(curves, ("plain32", "resnet32"))
    assert target == pytest.approx(0.05)
    d = _data("matched_loss", {"plain32": _seeds(0.05), "resnet32": _seeds(0.02)}, curves=curves)
    assert _verdict(d).verdict == verdict


def test_gradient_slopes_recover_the_product_of_lambdas():
    """||dL/dy_l|| = lambda^(L - l): the fitted slope per block is -ln(lambda), as predicted."""
    rows = [
        {
            "key": "k",
            "lam": 0.5,
            "seed": 0,
            "epoch": 0,
            "layer_index": i,
            "grad_norm": 0.5 ** (9 - i),
        }
        for i in range(10)
    ]
    s = grad_slopes(pd.DataFrame(rows))
    assert s["slope"].iloc[0] == pytest.approx(-np.log(0.5)) and s["first_over_last"].iloc[
        0
    ] == pytest.approx(0.5**9)


def _toy_steps(plain: list[float], skip: list[float]) -> pd.DataFrame:
    rows = [
        {"activation": a, "variant": v, "seed": i, "steps": s}
        for a in ("relu", "tanh")
        for v, vals in (("plain", plain), ("skip", skip))
        for i, s in enumerate(vals)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "plain,skip,verdict",
    [
        ([np.nan] * 40, [100.0] * 40, "supported"),
        ([100.0] * 40, [100.0] * 40, "not supported"),
        ([np.nan, 50.0] * 20, [50.0, np.nan] * 20, "inconclusive"),
    ],
)
def test_toy_rule(plain, skip, verdict):
    d = InterventionData(
        ("toy",), pd.DataFrame(), pd.DataFrame(), toy={"steps": _toy_steps(plain, skip)}
    )
    assert _verdict(d).verdict == verdict


def test_toy_solutions_are_exact():
    """The solutions the toy's argument names: plain middle layers w = 1, b = 0 (identity on the
    positive signal), skip middle layers w = 0, b = 0 (zero); both fit 4x + 3 exactly. (Through a
    tanh first layer 4x + 3 is only approximated: its toy has no exact solution.)"""
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    w = torch.tensor([[4.0, 1, 1, 1, 1, 1]], dtype=torch.float64)
    b = torch.tensor([[3.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    for act in ("relu", "linear"):
        torch.testing.assert_close(_forward(w, b, x, ACTIVATIONS[act], skip=False)[0], 4 * x + 3)
    w_skip = torch.tensor([[4.0, 0, 0, 0, 0, 1]], dtype=torch.float64)
    for act in ("relu", "linear"):
        torch.testing.assert_close(
            _forward(w_skip, b, x, ACTIVATIONS[act], skip=True)[0], 4 * x + 3
        )
