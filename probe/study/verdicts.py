"""Verdicts computed from the data, one per explanation of degradation, each with its stated rule.

Every verdict compares the deepest plain net with the deepest residual net (and, where the
explanation is about depth, with the shallowest net of the same family) using per-run values
averaged over seeds, with a 95% Student-t interval across seeds where several seeds exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analyses.stats import seed_ci
from probe.study.references import published_test_error

__all__ = ["Verdict", "degradation_table", "verdicts"]

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass
class Verdict:
    explanation: str
    verdict: str  # supported / not supported / inconclusive (or present / absent for degradation)
    rule: str
    evidence: dict[str, str] = field(default_factory=dict)  # label -> "value [lo, hi]"
    figures: list[str] = field(default_factory=list)


def _fmt(v: tuple[float, float, float], pct: bool = False) -> str:
    m, lo, hi = v
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.3g}")
    return f(m) if np.isnan(lo) else f"{f(m)} [{f(lo)}, {f(hi)}]"


def _judge(
    values: list[float],
    supported: bool,
    refuted: bool,
    outcomes: tuple[str, str] = (SUPPORTED, NOT_SUPPORTED),
) -> str:
    """The verdict of one rule: ``outcomes[0]`` if ``supported``, else ``outcomes[1]`` if
    ``refuted``, else inconclusive -- and inconclusive whenever a needed value is missing (NaN)."""
    if any(np.isnan(v) for v in values):
        return INCONCLUSIVE
    return outcomes[0] if supported else outcomes[1] if refuted else INCONCLUSIVE


def degradation_table(runs: pd.DataFrame, dataset: str = "") -> pd.DataFrame:
    """Train/test error by architecture and depth: mean and std over seeds, from final checkpoints,
    with the published test error (percent) and its source where ``dataset`` has one."""
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
    ``num_classes`` sets chance-level error for the lesion rule."""
    plain, res = families
    d_lo, d_hi = min(depths), max(depths)
    p_deep, r_deep, p_shallow, r_shallow = (
        f"{plain}{d_hi}",
        f"{res}{d_hi}",
        f"{plain}{d_lo}",
        f"{res}{d_lo}",
    )
    out = []

    def err(model):
        return runs[runs["model"] == model]["train_error"].to_numpy()

    # 0. Is there degradation at all? The residual net "does not degrade" within a tolerance that
    # scales with the effect being explained: a shortcut that removes >= 90% of the plain net's depth
    # penalty removes the phenomenon, and a fixed 0.5 points is below seed noise on CIFAR.
    pd_, ps_, rd_, rs_ = (seed_ci(err(m)) for m in (p_deep, p_shallow, r_deep, r_shallow))
    plain_gap, res_gap = pd_[0] - ps_[0], rd_[0] - rs_[0]
    present = _judge(
        [plain_gap, res_gap],
        plain_gap > 0 and res_gap <= max(0.005, 0.1 * plain_gap),
        plain_gap <= 0 or res_gap >= plain_gap,
        outcomes=("present", "absent"),
    )
    out.append(
        Verdict(
            "Degradation (the phenomenon to explain)",
            present,
            f"present if the mean final training error (eval mode) of {p_deep} exceeds {p_shallow}'s and "
            f"{r_deep} exceeds {r_shallow}'s by at most max(0.5 points, 10% of the plain gap); absent if "
            f"the plain net does not degrade or the residual net degrades as much",
            {
                **{
                    f"train error {m}": _fmt(v, pct=True)
                    for m, v in ((p_shallow, ps_), (p_deep, pd_), (r_shallow, rs_), (r_deep, rd_))
                },
                "depth penalty plain": f"{100 * plain_gap:+.2f} points",
                "depth penalty residual": f"{100 * res_gap:+.2f} points",
            },
            ["final_training_batch_error"],
        )
    )

    # 1. Identity is hard to learn: deep plain blocks stay far from the identity a shallower net implies.
    pd1, rd1 = (seed_ci(_per_run(table, "closeness", m, last)) for m in (p_deep, r_deep))
    v = _judge([pd1[0], rd1[0]], pd1[0] > 2 * rd1[0] and pd1[0] >= 0.5, pd1[0] <= rd1[0])
    out.append(
        Verdict(
            "Identity is hard to learn (identity-closeness)",
            v,
            f"supported if the mean block closeness d = ||y - S(x)||/||S(x)|| of {p_deep} is >= 0.5 and > 2x that of "
            f"{r_deep}; not supported if it is <= the residual net's",
            {
                f"d {p_deep}": _fmt(pd1),
                f"d {r_deep}": _fmt(rd1),
                f"||J-P||/||P|| {p_deep}": _fmt(
                    seed_ci(_per_run(table, "jac_rel_dev", p_deep, last))
                ),
                f"||J-P||/||P|| {r_deep}": _fmt(
                    seed_ci(_per_run(table, "jac_rel_dev", r_deep, last))
                ),
            },
            ["final_identity_closeness", "final_jacobian_deviation"],
        )
    )

    # 2. Residual branches stay small (He et al. Fig. 7; Jastrzebski et al. 2018).
    rr_deep, rr_shallow = (
        seed_ci(_per_run(table, "residual_ratio", m, last)) for m in (r_deep, r_shallow)
    )
    std_r, std_p = (
        seed_ci(_per_run(table, "response_std_pooled", m, last)) for m in (r_deep, p_deep)
    )
    v = _judge(
        [rr_deep[0], rr_shallow[0], std_r[0], std_p[0]],
        rr_deep[0] < 1 and rr_deep[0] < rr_shallow[0] and std_r[0] < std_p[0],
        rr_deep[0] >= 1,
    )
    out.append(
        Verdict(
            "Residual branches stay small (residual magnitude, Fig. 7)",
            v,
            f"supported if ||F||/||S|| of {r_deep} < 1, smaller than {r_shallow}'s, and its mean response std is below "
            f"{p_deep}'s; not supported if ||F||/||S|| >= 1",
            {
                f"||F||/||S|| {r_shallow}": _fmt(rr_shallow),
                f"||F||/||S|| {r_deep}": _fmt(rr_deep),
                f"response std {p_deep}": _fmt(std_p),
                f"response std {r_deep}": _fmt(std_r),
            },
            ["final_residual_ratio", "final_fig7_response_std", "final_fig7_bn_gamma"],
        )
    )

    # 3. Vanishing gradients: the first block's gradient is orders of magnitude below the last's.
    def grad_ratio(model, ck):
        return seed_ci(_per_run(table, "grad_norm", model, ck, _first_over_last, min_layers=2))

    gi_p, ge_p, ge_r = grad_ratio(p_deep, first), grad_ratio(p_deep, last), grad_ratio(r_deep, last)
    v = _judge(
        [gi_p[0], ge_p[0]],
        min(gi_p[0], ge_p[0]) < 0.1 and not ge_r[0] < 0.1,
        min(gi_p[0], ge_p[0]) >= 0.1,
    )
    out.append(
        Verdict(
            "Vanishing gradients (gradient norms against depth)",
            v,
            f"supported if ||dL/dy|| at the first block of {p_deep} is < 0.1x that at its last block (at init or at the end) "
            "while the residual net's is not; not supported if the ratio stays >= 0.1 (He et al.: 'healthy norms')",
            {
                f"first/last gradient norm {p_deep} (init)": _fmt(gi_p),
                f"first/last gradient norm {p_deep} (end)": _fmt(ge_p),
                f"first/last gradient norm {r_deep} (end)": _fmt(ge_r),
                # The opposite failure is worth naming: BN nets without shortcuts can explode toward
                # the input at initialisation (Yang et al., ICLR 2019).
                "reading": "gradients grow toward the input (exploding, > 10x) at init"
                if gi_p[0] > 10
                else "no order-of-magnitude growth toward the input at init",
            },
            ["init_gradient_norms", "final_gradient_norms"],
        )
    )

    # 4. Shattered gradients (Balduzzi et al. 2017): short correlation length in deep plain nets at init.
    cl = {m: seed_ci(_per_run(table, "corr_length", m, first)) for m in (p_shallow, p_deep, r_deep)}
    v = _judge(
        [c[0] for c in cl.values()],
        cl[p_deep][0] < 0.5 * cl[r_deep][0] and cl[p_deep][0] < cl[p_shallow][0],
        cl[p_deep][0] >= cl[r_deep][0],
    )
    out.append(
        Verdict(
            "Shattered gradients (input-gradient correlation at init)",
            v,
            f"supported if the gradient correlation length of {p_deep} at init is < 0.5x that of {r_deep} and below "
            f"{p_shallow}'s; not supported if it is >= the residual net's",
            {f"correlation length {m}": _fmt(c) for m, c in cl.items()},
            ["init_shattered_gradients"],
        )
    )

    # 5. Jacobian conditioning: accumulated anisotropy sum_blocks log(sigma_max^2 / mean sigma^2).
    def aniso(model):
        top = table[
            (table["quantity"] == "jac_top_sv")
            & (table["model"] == model)
            & (table["checkpoint"] == last)
        ]
        msv = table[
            (table["quantity"] == "jac_msv")
            & (table["model"] == model)
            & (table["checkpoint"] == last)
        ]
        m = top.merge(msv, on=["seed", "layer"], suffixes=("_top", "_msv"))
        vals = [np.log(ds["value_top"] ** 2 / ds["value_msv"]).sum() for _, ds in m.groupby("seed")]
        return seed_ci(np.array(vals))

    ap, ar = aniso(p_deep), aniso(r_deep)
    v = _judge([ap[0], ar[0]], ap[0] > 1.5 * ar[0] and ap[0] - ar[0] > 1, ap[0] <= ar[0])
    out.append(
        Verdict(
            "Ill-conditioned Jacobians (block spectra)",
            v,
            f"supported if the summed log anisotropy sum_blocks log(sigma_max^2 / mean sigma^2) of {p_deep} exceeds 1.5x "
            f"(and by > 1 nat) that of {r_deep}; not supported if it is <= the residual net's",
            {
                f"summed log anisotropy {p_deep}": _fmt(ap),
                f"summed log anisotropy {r_deep}": _fmt(ar),
            },
            ["final_jacobian_top_sv", "final_jacobian_spectra", "final_segment_isometry_in"],
        )
    )

    # 6. Ensemble-like behaviour (Veit et al. 2016): single non-downsampling lesions.
    def lesion_delta(model):
        d = table[(table["model"] == model) & (table["checkpoint"] == last)]
        vals = []
        for _, ds in d.groupby("seed"):
            base = ds[ds["quantity"] == "lesion_baseline"]["value"]
            les = ds[
                (ds["quantity"] == "lesion_error")
                & ~ds.get("downsampling", pd.Series(False, index=ds.index))
            ]
            if len(base) and len(les):
                vals.append(float(np.median(les["value"] - base.iloc[0])))
        return seed_ci(np.array(vals))

    # The plain criterion is "near chance" (Veit: VGG goes to ~90% error), read as closing >= 80% of
    # the gap between the intact net's error and chance, since a net that is already far from perfect
    # cannot lose 20 points.
    def lesion_baseline(model):
        d = table[
            (table["model"] == model)
            & (table["checkpoint"] == last)
            & (table["quantity"] == "lesion_baseline")
        ]
        return float(d["value"].mean()) if len(d) else float("nan")

    lp, lr = lesion_delta(p_deep), lesion_delta(r_deep)
    chance = 1.0 - 1.0 / num_classes
    base_p = lesion_baseline(p_deep)
    headroom = chance - base_p
    near_chance = lp[0] > 0.2 or (headroom > 0 and lp[0] >= 0.8 * headroom)
    v = _judge([lp[0], lr[0], base_p], lr[0] < 0.01 and near_chance, lr[0] >= lp[0])
    out.append(
        Verdict(
            "Ensemble-like behaviour (lesions)",
            v,
            f"supported if deleting one non-downsampling block of {r_deep} raises test error by < 1 point (median) while "
            f"it raises {p_deep}'s by > 20 points or by >= 80% of the way to chance ({100 * chance:.0f}% error); "
            "not supported if the residual net suffers at least as much",
            {
                f"median error increase {p_deep}": _fmt(lp, pct=True),
                f"median error increase {r_deep}": _fmt(lr, pct=True),
                f"intact test error {p_deep}": f"{100 * base_p:.2f}%",
            },
            ["final_lesions"],
        )
    )
    return out
