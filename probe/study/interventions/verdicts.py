"""One verdict per intervention arm, each with its rule stated beside it.

The statistics are the correlational verdicts' (:mod:`probe.study.verdicts`): one value per run
(seed), 95 % Student-t intervals across seeds, Welch(-Satterthwaite) intervals for contrasts,
and a claim is *supported* / *not supported* only when the interval lies wholly on one side of the
threshold. Where a rule asks whether an effect is absent, "absent" means within ``MARGIN`` (half a
point of error rate): two nets whose interval of difference lies below half a point are taken
to train alike. The toy's intervals are paired percentile bootstraps over its initialisations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.stats import POSITIVE, RATE, bootstrap_ci, contrast_ci, linear_contrast_ci, seed_ci
from probe.study.interventions.arms import ARMS, arm_conditions, lr_key
from probe.study.interventions.runner import InterventionData, shortcut_scale
from probe.study.interventions.toy import VARIANTS
from probe.study.verdicts import (
    INCONCLUSIVE,
    UNTRAINED,
    Verdict,
    fmt_interval,
    fmt_points,
    judge,
    make_verdict,
)

__all__ = ["intervention_verdicts", "link_tests", "matched_loss_table", "grad_slopes", "MARGIN"]

MARGIN = 0.005  # half a point of error rate: "no worse" / "the same" below it
_UNDECIDED = "the intervals do not decide between the outcomes"  # judge's reason


def _final(data: InterventionData, key: str, col: str = "final_train_error") -> np.ndarray:
    t = data.conditions.drop_duplicates(["key", "seed"])
    return t[t["key"] == key].sort_values("seed")[col].to_numpy(np.float64)


def _pct(v: np.ndarray) -> str:
    return fmt_interval(seed_ci(v, bounds=RATE), len(v), pct=True)


def _constructed(data, p, r, s, d) -> Verdict:
    pc, rc = f"{p}{d}-constructed", f"{r}{d}-constructed"
    left = _final(data, pc) - _final(data, pc, "start_train_error")  # per seed: paired
    left_r = _final(data, rc) - _final(data, rc, "start_train_error")
    L, Lr = seed_ci(left), seed_ci(left_r)
    vs_r = contrast_ci(left, left_r)
    judged = judge(
        [L[0], vs_r[0]],
        L[1] > MARGIN and vs_r[1] > 0,
        L[2] < -MARGIN or -MARGIN <= L[1] <= L[2] <= MARGIN,
        outcomes=("SGD leaves it", "SGD stays at it"),
        runs={pc: left, rc: left_r},
    )
    if judged[0] == "SGD stays at it" and L[2] < -MARGIN:
        judged = ("SGD improves on it", "")
    cl = data.closeness
    ev = {
        f"train error at step 0, {pc} (= {p}{s}'s final)": _pct(
            _final(data, pc, "start_train_error")
        ),
        f"{p}{s}'s own final train error": _pct(_final(data, pc, "source_train_error")),
        "largest eval-mode logit difference from the shallow net at step 0": fmt_interval(
            (float(np.nanmax(_final(data, pc, "construct_eval_max_abs_diff"))), np.nan, np.nan)
        ),
        "train-mode relative logit difference at step 0 (batch statistics)": fmt_interval(
            seed_ci(_final(data, pc, "construct_train_rel_diff"), bounds=POSITIVE)
        ),
        f"final train error {pc}": _pct(_final(data, pc)),
        f"final train error {p}{d} (He init)": _pct(_final(data, f"{p}{d}")),
        f"final train error {rc}": _pct(_final(data, rc)),
        f"final − step 0, {pc}": fmt_points(L, len(left)),
        f"final − step 0, {rc}": fmt_points(Lr, len(left_r)),
        f"{pc} − {p}{d} (He), final": fmt_points(
            contrast_ci(_final(data, pc), _final(data, f"{p}{d}")), len(left)
        ),
    }
    if len(cl):
        for key in (pc, rc):
            part = cl[(cl["key"] == key) & (cl["blocks"] == "extra")]
            for tag, ep in (("step 0", part["epoch"].min()), ("end", part["epoch"].max())):
                v = part[part["epoch"] == ep]["closeness"].to_numpy()
                ev[f"closeness d of the extra blocks, {key}, {tag}"] = fmt_interval(
                    seed_ci(v, bounds=POSITIVE), len(v)
                )
    return make_verdict(
        ARMS["constructed"].title,
        judged,
        f"'SGD leaves it' if the final training error of {pc} minus its step-0 error (paired per "
        f"seed) has a 95% interval above {100 * MARGIN:.1f} point and above {rc}'s; 'SGD improves "
        f"on it' if the interval lies below −{100 * MARGIN:.1f} point; 'SGD stays at it' if it lies "
        f"within ±{100 * MARGIN:.1f} point",
        ev,
        ["arm_constructed_training_error", "arm_constructed_closeness"],
    )


def _skipinit(data, p, r, s, d) -> Verdict:
    ph, rh = _final(data, f"{p}{d}"), _final(data, f"{r}{d}")
    pi, pdirac, rs = (
        _final(data, f"{p}{d}-identity"),
        _final(data, f"{p}{d}-dirac"),
        _final(data, f"{r}{d}-skipinit"),
    )
    gap, left = contrast_ci(ph, rh), contrast_ci(pi, rh)
    closes = linear_contrast_ci([ph, rh, pi], [0.1, 0.9, -1.0])  # >= 0: at least 90 % closed
    half = linear_contrast_ci([pi, rh, ph], [1.0, -0.5, -0.5])  # > 0: less than half closed
    judged = judge(
        [gap[0], closes[0]],
        gap[1] > MARGIN and closes[1] > 0,
        gap[1] > MARGIN and half[1] > 0,
        runs={f"{p}{d}": ph, f"{r}{d}": rh, f"{p}{d}-identity": pi},
    )
    if judged == (INCONCLUSIVE, _UNDECIDED) and not gap[1] > MARGIN:
        judged = (
            INCONCLUSIVE,
            f"no gap to close: {p}{d} − {r}{d} is not above {100 * MARGIN:.1f} point",
        )
    frac = (gap[0] - left[0]) / gap[0] if gap[0] > 0 else float("nan")
    return make_verdict(
        ARMS["skipinit"].title,
        judged,
        f"supported (identity init closes the gap) if {p}{d} − {r}{d} (He init, final training error) "
        f"has a 95% interval above {100 * MARGIN:.1f} point and the identity-initialised {p}{d} is "
        f"within 10% of that gap of {r}{d} (0.1·{p}{d} + 0.9·{r}{d} − identity {p}{d} above 0); "
        "not supported if it closes less than half the gap (identity − ½·He plain − ½·resnet above 0)",
        {
            f"final train error {p}{d} (He)": _pct(ph),
            f"final train error {r}{d} (He)": _pct(rh),
            f"final train error {p}{d}, identity init": _pct(pi),
            f"final train error {p}{d}, Dirac kernels only": _pct(pdirac),
            f"final train error {r}{d}, SkipInit": _pct(rs),
            "gap plain − residual, He init": fmt_points(gap, len(ph)),
            "gap identity plain − residual": fmt_points(left, len(pi)),
            "fraction of the gap closed (estimate)": "not defined (no gap)"
            if np.isnan(frac)
            else f"{100 * frac:.0f}%",
            f"SkipInit {r}{d} − He {r}{d}": fmt_points(contrast_ci(rs, rh), len(rs)),
        },
        ["arm_skipinit_training_error"],
    )


def grad_slopes(profile: pd.DataFrame, epoch: int | None = None) -> pd.DataFrame:
    """Per run: the least-squares slope of log ||dL/dy|| against block index (per block) at its
    first checkpoint (or ``epoch``). Backpropagating through y = act(lambda x + F(x)) along the
    shortcut alone multiplies the gradient by lambda per block (He et al. 2016b, Eq. 5), so the
    shortcut path predicts slope -ln(lambda): gradients shrink toward the input for lambda < 1."""
    rows = []
    for (key, lam, seed), g in profile.groupby(["key", "lam", "seed"]):
        at = g[g["epoch"] == (g["epoch"].min() if epoch is None else epoch)].sort_values(
            "layer_index"
        )
        y = np.log(np.maximum(at["grad_norm"].to_numpy(np.float64), 1e-30))
        if len(y) >= 2:
            slope = float(np.polyfit(np.arange(len(y)), y, 1)[0])
            rows.append(
                {
                    "key": key,
                    "lam": lam,
                    "seed": seed,
                    "slope": slope,
                    "first_over_last": float(np.exp(y[0] - y[-1])),
                }
            )
    return pd.DataFrame(rows)


def _shortcut_scale(data, p, r, s, d, lambdas, cfg) -> Verdict:
    # the runs the arm defined, by their λ (λ = 0 and 1 are the grid's plain and residual nets)
    keys = {
        shortcut_scale(c): c.key for c in arm_conditions("shortcut_scale", (p, r), cfg.depths, cfg)
    }
    mid = sorted(lam for lam in lambdas if 0 < lam < 1)
    ev = {f"final train error λ = {lam:g}": _pct(_final(data, k)) for lam, k in keys.items()}
    slopes = grad_slopes(data.grad_profile) if len(data.grad_profile) else pd.DataFrame()
    for lam in lambdas:
        sl = slopes[slopes["lam"] == lam]["slope"].to_numpy() if len(slopes) else np.array([])
        pred = "∞" if lam == 0 else f"{abs(np.log(lam)) if lam == 1 else -np.log(lam):.3g}"
        ev[
            f"slope of ln||∂L/∂y|| per block at init, λ = {lam:g} (shortcut path predicts {pred})"
        ] = fmt_interval(seed_ci(sl), len(sl))
    if not mid or 1.0 not in keys:
        return make_verdict(
            ARMS["shortcut_scale"].title,
            (INCONCLUSIVE, "needs λ = 1 and a λ strictly between 0 and 1"),
            "compares the smallest λ in (0, 1) with λ = 1",
            ev,
            ["arm_shortcut_scale_training_error", "arm_shortcut_scale_gradients"],
        )
    lam = mid[0]
    a, b = _final(data, keys[lam]), _final(data, keys[1.0])
    hurt = contrast_ci(a, b)
    judged = judge(
        [hurt[0]], hurt[1] > MARGIN, hurt[2] <= MARGIN, runs={keys[lam]: a, keys[1.0]: b}
    )
    ev[f"λ = {lam:g} − λ = 1, final train error"] = fmt_points(hurt, min(len(a), len(b)))
    return make_verdict(
        ARMS["shortcut_scale"].title,
        judged,
        f"supported (a scaled shortcut hurts optimisation) if the final training error at λ = {lam:g} "
        f"minus λ = 1 has a 95% interval above {100 * MARGIN:.1f} point; not supported if at or below it",
        ev,
        ["arm_shortcut_scale_training_error", "arm_shortcut_scale_gradients"],
    )


def _lr(data, p, r, s, d, lrs, chance) -> Verdict:
    ev, finals = {}, {}
    for lr in lrs:
        finals[lr] = (_final(data, lr_key(f"{p}{d}", lr)), _final(data, lr_key(f"{r}{d}", lr)))
        ev[f"gap {p}{d} − {r}{d} at lr {lr:g}"] = fmt_points(
            contrast_ci(*finals[lr]), len(finals[lr][0])
        )
        ev[f"final train error at lr {lr:g}: {p}{d} / {r}{d}"] = (
            f"{_pct(finals[lr][0])} / {_pct(finals[lr][1])}"
        )
    hi, lo = max(lrs), min(lrs)
    shrink = linear_contrast_ci([*finals[hi], *finals[lo]], [1.0, -1.0, -1.0, 1.0])
    ev[f"gap at lr {hi:g} − gap at lr {lo:g}"] = fmt_points(shrink, len(finals[hi][0]))
    untrained = [
        f"{r}{d} at lr {lr:g}"
        for lr in lrs
        if len(finals[lr][1]) and finals[lr][1].mean() >= UNTRAINED * chance
    ]
    judged = judge(
        [shrink[0]],
        shrink[1] > MARGIN,
        shrink[2] <= MARGIN,
        runs={f"{p}{d} lr {hi:g}": finals[hi][0], f"{p}{d} lr {lo:g}": finals[lo][0]},
        untrained=untrained,
    )
    return make_verdict(
        ARMS["lr"].title,
        judged,
        f"supported (the gap is partly an optimisation-stability effect) if the plain − residual gap in "
        f"final training error at lr {hi:g} minus the gap at lr {lo:g} has a 95% interval above "
        f"{100 * MARGIN:.1f} point; not supported if at or below it; inconclusive if the residual net "
        "does not train at some lr",
        ev,
        ["arm_lr_training_error"],
    )


def _cross(c: pd.DataFrame, target: float) -> tuple[float, float]:
    """(epoch, test error) where the training loss first reaches ``target``, interpolating
    linearly in log-loss between evaluated epochs; (nan, nan) if it never does."""
    c = c.sort_values("epoch")
    loss, err, ep = (c[k].to_numpy(np.float64) for k in ("train_loss", "test_error", "epoch"))
    hit = np.flatnonzero(loss <= target)
    if not len(hit):
        return float("nan"), float("nan")
    i = int(hit[0])
    if i == 0 or loss[i] == target:
        return float(ep[i]), float(err[i])
    la, lb = np.log(loss[i - 1]), np.log(max(loss[i], 1e-300))
    t = (la - np.log(target)) / (la - lb)
    return float(ep[i - 1] + t * (ep[i] - ep[i - 1])), float(err[i - 1] + t * (err[i] - err[i - 1]))


def matched_loss_table(curves: pd.DataFrame, keys: tuple[str, str]) -> tuple[pd.DataFrame, float]:
    """Test error of every run of ``keys`` at the lowest training loss all of them reach."""
    c = curves[curves["key"].isin(keys)]
    if c.empty:
        return pd.DataFrame(columns=["key", "seed", "epoch", "test_error"]), float("nan")
    target = float(c.groupby(["key", "seed"])["train_loss"].min().max())
    rows = [
        {"key": k, "seed": seed, **dict(zip(("epoch", "test_error"), _cross(g, target)))}
        for (k, seed), g in c.groupby(["key", "seed"])
    ]
    return pd.DataFrame(rows), target


def _matched_loss(data, p, r, s, d) -> Verdict:
    pk, rk = f"{p}{d}", f"{r}{d}"
    t, target = matched_loss_table(data.curves, (pk, rk))
    tp, tr = (
        t[t["key"] == k].sort_values("seed")["test_error"].to_numpy(np.float64) for k in (pk, rk)
    )
    gap = contrast_ci(tp, tr)
    judged = judge([gap[0]], gap[1] > MARGIN, gap[2] <= MARGIN, runs={pk: tp, rk: tr})
    ep = {k: t[t["key"] == k]["epoch"].to_numpy() for k in (pk, rk)}
    return make_verdict(
        ARMS["matched_loss"].title,
        judged,
        f"supported (a generalisation gap beyond optimisation) if the test error of {pk} minus {rk}, "
        f"each read where its training loss first reaches the lowest loss all runs reach, has a 95% "
        f"interval above {100 * MARGIN:.1f} point; not supported if at or below it",
        {
            "matched training loss": f"{target:.4g}",
            f"epoch reached, {pk}": fmt_interval(seed_ci(ep[pk], bounds=POSITIVE), len(ep[pk])),
            f"epoch reached, {rk}": fmt_interval(seed_ci(ep[rk], bounds=POSITIVE), len(ep[rk])),
            f"test error at matched loss, {pk}": _pct(tp),
            f"test error at matched loss, {rk}": _pct(tr),
            "gap at matched loss": fmt_points(gap, min(len(tp), len(tr))),
            "gap in final test error (unmatched)": fmt_points(
                contrast_ci(
                    _final(data, pk, "final_test_error"), _final(data, rk, "final_test_error")
                ),
                len(tp),
            ),
        },
        ["arm_matched_loss"],
    )


def _mean_diff(a, b, axis=-1):
    return np.mean(a - b, axis=axis)


def _toy(data) -> Verdict:
    st = data.toy["steps"]
    ev, lows, highs = {}, [], []
    for act, g in st.groupby("activation", sort=False):
        solved = {
            v: g[g["variant"] == v].sort_values("seed")["steps"].notna().to_numpy(float)
            for v in VARIANTS
        }
        diff = bootstrap_ci(_mean_diff, solved["skip"], solved["plain"])
        med = {v: g[(g["variant"] == v)]["steps"].median() for v in VARIANTS}
        ev[f"{act}: seeds solved, plain / skip"] = (
            f"{100 * solved['plain'].mean():.1f}% / {100 * solved['skip'].mean():.1f}% (n={len(solved['plain'])})"
        )
        ev[f"{act}: skip − plain, fraction solved"] = fmt_points(
            diff, len(solved["plain"])
        ).replace(" points", " points of seeds")
        ev[f"{act}: median steps of the solved seeds, plain / skip"] = " / ".join(
            "none solved" if np.isnan(med[v]) else f"{med[v]:.0f}" for v in VARIANTS
        )
        if act != "linear":
            lows.append(diff[1])
            highs.append(diff[2])
    judged = judge(
        [*lows, *highs],
        bool(lows) and all(lo > 0 for lo in lows),
        bool(highs) and all(hi <= 0 for hi in highs),
    )
    return make_verdict(
        ARMS["toy"].title,
        judged,
        "supported (zero is easier to learn than identity) if, for every nonlinear activation, the "
        "skip stack solves a larger fraction of the same initialisations (paired bootstrap 95% "
        "interval of the difference above 0); not supported if for every one the interval is at or "
        "below 0; the linear stack is shown for the depth-product effect alone",
        ev,
        ["arm_toy_solved", "arm_toy_loss"],
    )


def intervention_verdicts(data: InterventionData, cfg, num_classes: int = 10) -> list[Verdict]:
    """The verdict of every arm in ``data.arms``, in the order the arms ran."""
    p, r = cfg.families[0], cfg.families[1]
    s, d = min(cfg.depths), max(cfg.depths)
    make = {
        "constructed": lambda: _constructed(data, p, r, s, d),
        "skipinit": lambda: _skipinit(data, p, r, s, d),
        "shortcut_scale": lambda: _shortcut_scale(data, p, r, s, d, cfg.lambdas, cfg),
        "lr": lambda: _lr(data, p, r, s, d, cfg.lrs, 1 - 1 / num_classes),
        "matched_loss": lambda: _matched_loss(data, p, r, s, d),
        "toy": lambda: _toy(data),
    }
    out = []
    for arm in data.arms:
        v = make[arm]()
        v.arm = arm
        out.append(v)
    return out


def link_tests(correlational: list[Verdict], arms: list[Verdict]) -> None:
    """Point each correlational verdict at the intervention arms that test it (``tested_by``)."""
    ran = {v.arm for v in arms}
    for v in correlational:
        v.tested_by = [
            a for a in ARMS if a in ran and any(v.explanation.startswith(t) for t in ARMS[a].tests)
        ]
