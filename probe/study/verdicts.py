"""Verdicts computed from the data, one per explanation of degradation, each with its stated rule.

Every verdict compares the deepest plain net with the deepest residual net (and, where the
explanation is about depth, with the shallowest net of the same family) using one value per run
(seed). The statistics, the same for every rule (see :mod:`analyses.stats`):

* a run set's value: mean over seeds with a Student-t 95 % interval clipped to the quantity's
  range (error rates in [0, 1], norms and ratios >= 0), shown with its n;
* a comparison ("plain above residual", "more than 2x"): Welch's t interval of
  mean(a) - k * mean(b); a rule is *supported* or *not supported* only when that interval lies
  wholly on one side of its threshold, else it is *inconclusive*;
* every rule needs at least ``MIN_SEEDS`` runs of each net it compares, and is inconclusive when a
  net it compares against did not train (final training error within 10 % of chance): the shallow
  nets for degradation, the deep residual net for every rule on trained nets, and the intact plain
  net for lesions (a net at chance cannot get worse). Rules on measures at initialisation
  (shattered gradients) need no trained net.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analyses.stats import POSITIVE, RATE, contrast_ci, seed_ci
from probe.study.references import published_test_error

__all__ = [
    "Verdict",
    "degradation_table",
    "verdicts",
    "MIN_SEEDS",
    "UNTRAINED",
    "judge",
    "make_verdict",
    "fmt_interval",
    "fmt_points",
]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
MIN_SEEDS = 2  # an interval across seeds needs at least two runs
UNTRAINED = 0.9  # a final training error >= 90 % of chance error counts as not trained
Interval = tuple[float, float, float]


@dataclass
class Verdict:
    explanation: str
    verdict: str  # supported / not supported / inconclusive (or present / absent for degradation)
    rule: str
    evidence: dict[str, str] = field(default_factory=dict)  # label -> "value [lo, hi] (n=k)"
    figures: list[str] = field(default_factory=list)
    arm: str = ""  # the intervention arm that produced it ('' for the correlational verdicts)
    tested_by: list[str] = field(default_factory=list)  # intervention arms that test this one


NOT_MEASURED = "not measured (see Measures skipped)"


def fmt_interval(v: Interval, n: int | None = None, pct: bool = False) -> str:
    """'value [lo, hi] (n=k)' of a (mean, low, high) interval, in percent with ``pct``.

    Example:
        >>> fmt_interval((0.02, 0.01, 0.03), 3, pct=True)
        '2.00% [1.00%, 3.00%] (n=3)'
    """
    m, lo, hi = v
    if np.isnan(m):
        return NOT_MEASURED
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.3g}")
    text = f(m) if np.isnan(lo) else f"{f(m)} [{f(lo)}, {f(hi)}]"
    return text if n is None else f"{text} (n={n})"


def fmt_points(v: Interval, n: int) -> str:
    """A difference of error rates in percentage points, with its interval and n."""
    m, lo, hi = (100 * x for x in v)
    if np.isnan(m):
        return NOT_MEASURED
    text = f"{m:+.2f}" if np.isnan(lo) else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    return f"{text} points (n={n})"


def judge(
    values: list[float],
    supported: bool,
    refuted: bool,
    outcomes: tuple[str, str] = (SUPPORTED, NOT_SUPPORTED),
    *,
    runs: dict[str, np.ndarray] | None = None,
    untrained: Sequence[str] = (),
) -> tuple[str, str]:
    """(verdict, why-inconclusive): ``outcomes[0]`` if ``supported``, else ``outcomes[1]`` if
    ``refuted``, else inconclusive -- and inconclusive whenever a needed value is missing (NaN),
    a compared net has fewer than ``MIN_SEEDS`` runs, a run's value is not finite, or a reference
    net did not train.

    A run whose value is NaN or infinite (a diverged seed, a non-finite capture) is not left out
    of the interval silently: the intervals would then speak for the other seeds alone while the
    evidence counted it, and a diverged seed is part of what the rule is about."""
    few = [m for m, v in (runs or {}).items() if len(v) < MIN_SEEDS]
    if few:
        return INCONCLUSIVE, f"fewer than {MIN_SEEDS} seeds of {', '.join(few)}"
    nonfinite = [
        f"{m} ({int((~np.isfinite(v)).sum())} of {len(v)})"
        for m, v in (runs or {}).items()
        if not np.isfinite(np.asarray(v, np.float64)).all()
    ]
    if nonfinite:
        return INCONCLUSIVE, f"runs with a value that is not finite: {', '.join(nonfinite)}"
    if untrained:
        return INCONCLUSIVE, f"{', '.join(untrained)} did not train (error near chance)"
    if any(np.isnan(v) for v in values):
        return INCONCLUSIVE, "a needed measure is missing"
    if supported:
        return outcomes[0], ""
    if refuted:
        return outcomes[1], ""
    return INCONCLUSIVE, "the intervals do not decide between the outcomes"


def make_verdict(
    explanation: str,
    judged: tuple[str, str],
    rule: str,
    evidence: dict[str, str],
    figures: list[str],
) -> Verdict:
    """A :class:`Verdict` from :func:`judge`'s (verdict, why); the why joins the evidence."""
    verdict, why = judged
    if why:
        evidence = {**evidence, "why inconclusive": why}
    return Verdict(explanation, verdict, rule, evidence, figures)


def degradation_table(runs: pd.DataFrame, dataset: str = "") -> pd.DataFrame:
    """Train/test error by architecture and depth from final checkpoints: mean, std and the 95%
    interval over seeds (the verdicts' and figures' interval: Student t within [0, 1]), with the
    published test error (percent) and its source where ``dataset`` has one."""
    g = runs.groupby(["family", "depth"])
    out = g.agg(
        seeds=("seed", "nunique"),
        train_error=("train_error", "mean"),
        train_error_std=("train_error", "std"),
        train_loss=("train_loss", "mean"),
        test_error=("test_error", "mean"),
        test_error_std=("test_error", "std"),
        wall_s=("wall_s", "mean"),
    ).reset_index()
    for col in ("train_error", "test_error"):
        cis = [seed_ci(v.to_numpy(np.float64), bounds=RATE) for _, v in g[col]]
        out[f"{col}_low"] = [c[1] for c in cis]
        out[f"{col}_high"] = [c[2] for c in cis]
    published = [published_test_error(dataset, f, int(d)) for f, d in zip(out.family, out.depth)]
    out["dataset"] = dataset
    out["published_test_error"] = [p[0] if p else float("nan") for p in published]
    out["published_source"] = [p[1] if p else "" for p in published]
    return out.sort_values(["family", "depth"])


def _per_run(
    table: pd.DataFrame,
    quantity: str,
    model: str,
    checkpoint: int,
    reduce: Callable[[np.ndarray], float] = np.mean,
    min_layers: int = 1,
) -> np.ndarray:
    """One number per seed: ``quantity`` of ``model`` at ``checkpoint``, its per-layer values (in
    layer order) reduced by ``reduce``; seeds with fewer than ``min_layers`` layers are skipped."""
    d = table[
        (table["quantity"] == quantity)
        & (table["model"] == model)
        & (table["checkpoint"] == checkpoint)
    ]
    vals = []
    for _, ds in d.groupby("seed"):
        v = ds.sort_values("layer_index")["value"].to_numpy()
        if len(v) >= min_layers:
            vals.append(reduce(v))
    return np.array(vals)


def _first_over_last(v: np.ndarray) -> float:
    return v[0] / max(v[-1], 1e-30)


def _anisotropy(table: pd.DataFrame, model: str, checkpoint: int) -> np.ndarray:
    """Per seed: sum over blocks of log(sigma_max^2 / mean sigma^2), the accumulated anisotropy."""
    at = table[(table["model"] == model) & (table["checkpoint"] == checkpoint)]
    top, msv = at[at["quantity"] == "jac_top_sv"], at[at["quantity"] == "jac_msv"]
    m = top.merge(msv, on=["seed", "layer"], suffixes=("_top", "_msv"))
    return np.array(
        [np.log(ds["value_top"] ** 2 / ds["value_msv"]).sum() for _, ds in m.groupby("seed")]
    )


def _lesion_increase(table: pd.DataFrame, model: str, checkpoint: int) -> np.ndarray:
    """Per seed: the median test-error increase over single non-downsampling block lesions."""
    d = table[(table["model"] == model) & (table["checkpoint"] == checkpoint)]
    vals = []
    for _, ds in d.groupby("seed"):
        base = ds[ds["quantity"] == "lesion_baseline"]["value"]
        les = ds[
            (ds["quantity"] == "lesion_error")
            & ~ds.get("downsampling", pd.Series(False, index=ds.index)).astype(bool)
        ]
        if len(base) and len(les):
            vals.append(float(np.median(les["value"] - base.iloc[0])))
    return np.array(vals)


def _lesion_baseline(table: pd.DataFrame, model: str, checkpoint: int) -> float:
    d = table[
        (table["model"] == model)
        & (table["checkpoint"] == checkpoint)
        & (table["quantity"] == "lesion_baseline")
    ]
    return float(d["value"].mean()) if len(d) else float("nan")


def verdicts(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    families: tuple[str, str],
    depths: tuple[int, ...],
    first: int,
    last: int,
    num_classes: int = 10,
) -> list[Verdict]:
    """All verdicts. ``families`` = (plain family, residual family); ``first``/``last`` = epochs;
    ``num_classes`` sets chance-level error (the lesion rule and the untrained-net guard)."""
    plain, res = families
    d_lo, d_hi = min(depths), max(depths)
    p_deep, r_deep, p_shallow, r_shallow = (
        f"{plain}{d_hi}",
        f"{res}{d_hi}",
        f"{plain}{d_lo}",
        f"{res}{d_lo}",
    )
    chance = 1.0 - 1.0 / num_classes
    out = []

    def err(model: str) -> np.ndarray:
        return runs[runs["model"] == model]["train_error"].to_numpy(np.float64)

    def untrained(*models: str) -> list[str]:
        return [m for m in models if len(err(m)) and float(err(m).mean()) >= UNTRAINED * chance]

    def per_run(quantity: str, model: str, ck: int, **kw) -> np.ndarray:
        return _per_run(table, quantity, model, ck, **kw)

    def value(v: np.ndarray, bounds=POSITIVE, pct: bool = False) -> str:
        finite = int(np.isfinite(v).sum())  # the runs the interval is made of
        text = fmt_interval(seed_ci(v, bounds=bounds), finite, pct)
        return text if finite == len(v) else f"{text}; {len(v) - finite} run(s) not finite"

    # 0. Is there degradation at all? The plain net's depth penalty must be positive beyond seed
    # noise, and the shortcut must remove >= 90 % of it (the residual penalty <= 10 % of the plain).
    e = {m: err(m) for m in (p_shallow, p_deep, r_shallow, r_deep)}
    gp, gr = contrast_ci(e[p_deep], e[p_shallow]), contrast_ci(e[r_deep], e[r_shallow])
    judged = judge(
        [gp[0], gr[0]],
        gp[1] > 0 and gr[0] <= 0.1 * gp[0],
        gp[2] <= 0 or (gr[1] > 0 and gr[0] >= gp[0]),
        outcomes=("present", "absent"),
        runs=e,
        untrained=untrained(p_shallow, r_shallow),
    )
    out.append(
        make_verdict(
            "Degradation (the phenomenon to explain)",
            judged,
            f"present if the depth penalty (mean final training error, eval mode) of {p_deep} over "
            f"{p_shallow} has a 95% interval above 0 and the penalty of {r_deep} over {r_shallow} is "
            "at most 10% of it (the shortcut removes >= 90%); absent if the plain penalty's interval "
            "lies at or below 0, or the residual net degrades significantly and as much",
            {
                **{f"train error {m}": value(v, RATE, pct=True) for m, v in e.items()},
                "depth penalty plain": fmt_points(gp, min(map(len, (e[p_deep], e[p_shallow])))),
                "depth penalty residual": fmt_points(gr, min(map(len, (e[r_deep], e[r_shallow])))),
            },
            ["final_training_batch_error"],
        )
    )

    # 1. Identity is hard to learn: deep plain blocks stay far from the identity a shallower net implies.
    cp, cr = per_run("closeness", p_deep, last), per_run("closeness", r_deep, last)
    twice, above = contrast_ci(cp, cr, k=2.0), contrast_ci(cp, cr)
    judged = judge(
        [twice[0], above[0]],
        twice[1] > 0 and cp.mean() >= 0.5,
        above[2] <= 0,
        runs={p_deep: cp, r_deep: cr},
        untrained=untrained(r_deep),
    )
    out.append(
        make_verdict(
            "Identity is hard to learn (identity-closeness)",
            judged,
            f"supported if the mean block closeness d = ||y - S(x)||/||S(x)|| of {p_deep} is >= 0.5 and "
            f"d({p_deep}) - 2 d({r_deep}) has a 95% interval above 0; not supported if "
            f"d({p_deep}) - d({r_deep}) has one at or below 0",
            {
                f"d {p_deep}": value(cp),
                f"d {r_deep}": value(cr),
                f"||J-P||/||P|| {p_deep}": value(per_run("jac_rel_dev", p_deep, last)),
                f"||J-P||/||P|| {r_deep}": value(per_run("jac_rel_dev", r_deep, last)),
            },
            ["final_identity_closeness", "final_jacobian_deviation"],
        )
    )

    # 2. Residual branches stay small (He et al. Fig. 7; Jastrzebski et al. 2018).
    rr_deep, rr_shallow = (per_run("residual_ratio", m, last) for m in (r_deep, r_shallow))
    std_r, std_p = (per_run("response_std_pooled", m, last) for m in (r_deep, p_deep))
    rr = seed_ci(rr_deep, bounds=POSITIVE)
    smaller, quieter = contrast_ci(rr_deep, rr_shallow), contrast_ci(std_r, std_p)
    judged = judge(
        [rr[0], smaller[0], quieter[0]],
        rr[2] < 1 and smaller[2] < 0 and quieter[2] < 0,
        rr[1] >= 1,
        runs={
            r_deep: rr_deep,
            r_shallow: rr_shallow,
            f"{r_deep} response std": std_r,
            p_deep: std_p,
        },
        untrained=untrained(r_deep, r_shallow),
    )
    out.append(
        make_verdict(
            "Residual branches stay small (residual magnitude, Fig. 7)",
            judged,
            f"supported if the 95% intervals put ||F||/||S|| of {r_deep} below 1 and below "
            f"{r_shallow}'s, and its mean response std below {p_deep}'s; not supported if the "
            "interval of ||F||/||S|| lies at or above 1",
            {
                f"||F||/||S|| {r_shallow}": value(rr_shallow),
                f"||F||/||S|| {r_deep}": value(rr_deep),
                f"response std {p_deep}": value(std_p),
                f"response std {r_deep}": value(std_r),
            },
            ["final_residual_ratio", "final_fig7_response_std", "final_fig7_bn_gamma"],
        )
    )

    # 3. Vanishing gradients: the first block's gradient is orders of magnitude below the last's.
    def grad_ratio(model: str, ck: int) -> np.ndarray:
        return per_run("grad_norm", model, ck, reduce=_first_over_last, min_layers=2)

    gi_p, ge_p, ge_r = grad_ratio(p_deep, first), grad_ratio(p_deep, last), grad_ratio(r_deep, last)
    ci_i, ci_e = seed_ci(gi_p, bounds=POSITIVE), seed_ci(ge_p, bounds=POSITIVE)
    judged = judge(
        [ci_i[0], ci_e[0], float(np.mean(ge_r)) if len(ge_r) else float("nan")],
        min(ci_i[2], ci_e[2]) < 0.1 and not ge_r.mean() < 0.1,
        min(ci_i[1], ci_e[1]) >= 0.1,
        runs={f"{p_deep} at init": gi_p, p_deep: ge_p, r_deep: ge_r},
        untrained=untrained(r_deep),
    )
    out.append(
        make_verdict(
            "Vanishing gradients (gradient norms against depth)",
            judged,
            f"supported if the 95% interval of ||dL/dy|| at the first block over that at the last block of "
            f"{p_deep} lies below 0.1 (at init or at the end) while the residual net's ratio is not below "
            "0.1; not supported if both intervals lie at or above 0.1 (He et al.: 'healthy norms')",
            {
                f"first/last gradient norm {p_deep} (init)": value(gi_p),
                f"first/last gradient norm {p_deep} (end)": value(ge_p),
                f"first/last gradient norm {r_deep} (end)": value(ge_r),
                # The opposite failure is worth naming: BN nets without shortcuts can explode toward
                # the input at initialisation (Yang et al., ICLR 2019).
                "reading": "gradients grow toward the input (exploding, > 10x) at init"
                if ci_i[0] > 10
                else "no order-of-magnitude growth toward the input at init",
            },
            ["init_gradient_norms", "final_gradient_norms"],
        )
    )

    # 4. Shattered gradients (Balduzzi et al. 2017): short correlation length in deep plain nets at
    # init. An initialisation measure: no net needs to have trained.
    cl = {m: per_run("corr_length", m, first) for m in (p_shallow, p_deep, r_deep)}
    half, below_shallow = (
        contrast_ci(cl[p_deep], cl[r_deep], k=0.5),
        contrast_ci(cl[p_deep], cl[p_shallow]),
    )
    not_shorter = contrast_ci(cl[p_deep], cl[r_deep])
    judged = judge(
        [half[0], below_shallow[0]],
        half[2] < 0 and below_shallow[2] < 0,
        not_shorter[1] >= 0,
        runs=cl,
    )
    out.append(
        make_verdict(
            "Shattered gradients (input-gradient correlation at init)",
            judged,
            f"supported if, at init, the 95% intervals put the gradient correlation length of {p_deep} "
            f"below 0.5x that of {r_deep} and below {p_shallow}'s; not supported if "
            f"{p_deep}'s minus {r_deep}'s has an interval at or above 0",
            {f"correlation length {m}": value(c) for m, c in cl.items()},
            ["init_shattered_gradients"],
        )
    )

    # 5. Jacobian conditioning: accumulated anisotropy sum_blocks log(sigma_max^2 / mean sigma^2).
    ap, ar = _anisotropy(table, p_deep, last), _anisotropy(table, r_deep, last)
    times, by = contrast_ci(ap, ar, k=1.5), contrast_ci(ap, ar)
    judged = judge(
        [times[0], by[0]],
        times[1] > 0 and by[1] > 1,
        by[2] <= 0,
        runs={p_deep: ap, r_deep: ar},
        untrained=untrained(r_deep),
    )
    out.append(
        make_verdict(
            "Ill-conditioned Jacobians (block spectra)",
            judged,
            f"supported if the summed log anisotropy sum_blocks log(sigma_max^2 / mean sigma^2) of {p_deep} "
            f"exceeds 1.5x that of {r_deep} and exceeds it by > 1 nat, both with 95% intervals; not "
            f"supported if {p_deep}'s minus {r_deep}'s has an interval at or below 0",
            {
                f"summed log anisotropy {p_deep}": value(ap),
                f"summed log anisotropy {r_deep}": value(ar),
            },
            ["final_jacobian_top_sv", "final_jacobian_spectra", "final_segment_isometry_in"],
        )
    )

    # 6. Ensemble-like behaviour (Veit et al. 2016): single non-downsampling lesions. The plain
    # criterion is "near chance" (Veit: VGG goes to ~90% error), read as closing >= 80% of the gap
    # between the intact net's error and chance, since a net far from perfect cannot lose 20 points;
    # a plain net already at chance cannot show anything.
    lp, lr = _lesion_increase(table, p_deep, last), _lesion_increase(table, r_deep, last)
    base_p = _lesion_baseline(table, p_deep, last)
    headroom = chance - base_p
    ci_p, ci_r = seed_ci(lp, bounds=(-1.0, 1.0)), seed_ci(lr, bounds=(-1.0, 1.0))
    near_chance = ci_p[1] > 0.2 or (headroom > 0 and ci_p[1] >= 0.8 * headroom)
    intact_at_chance = [p_deep] if base_p >= UNTRAINED * chance else []
    judged = judge(
        [ci_p[0], ci_r[0], base_p],
        ci_r[2] < 0.01 and near_chance,
        contrast_ci(lr, lp)[1] >= 0,
        runs={p_deep: lp, r_deep: lr},
        untrained=intact_at_chance + untrained(r_deep),
    )
    out.append(
        make_verdict(
            "Ensemble-like behaviour (lesions)",
            judged,
            f"supported if the 95% intervals put the median test-error increase from deleting one "
            f"non-downsampling block of {r_deep} below 1 point and that of {p_deep} above 20 points or "
            f"above 80% of the way to chance ({100 * chance:.0f}% error); not supported if the residual "
            "net's increase minus the plain net's has an interval at or above 0; inconclusive when the "
            "intact plain net is already at chance",
            {
                f"median error increase {p_deep}": fmt_interval(ci_p, len(lp), pct=True),
                f"median error increase {r_deep}": fmt_interval(ci_r, len(lr), pct=True),
                f"intact test error {p_deep}": NOT_MEASURED
                if np.isnan(base_p)
                else f"{100 * base_p:.2f}%",
            },
            ["final_lesions"],
        )
    )
    return out
