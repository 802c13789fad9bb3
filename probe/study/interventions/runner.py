"""Train an intervention study's arms beside its grid, capture what the arms read, tabulate.

Layout inside the study directory (next to the grid's files; every step reuses what is whole)::

    runs/<key>-s<seed>/                          arm runs (grid keys are the grid's own runs)
    captures/interventions/<key>-s<seed>-e<epoch>.h5
    tables/conditions.csv, curves.csv, closeness.csv, grad_profile.csv, toy_*.csv
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from analyses.identity import identity_closeness
from analyses.signal import signal_propagation
from probe.data import ImageArrays
from probe.errors import ProbeError
from probe.probes.registry import make_probe
from probe.store.reader import open_capture
from probe.study.files import (
    capture_done,
    capture_once,
    stamp_path,
    stamped_table,
    write_csv,
    write_stamped_csv,
    write_text,
)
from probe.study.interventions.arms import Condition, arm_conditions
from probe.study.interventions.toy import ToyConfig, run_toy
from probe.train import Recipe, TrainConfig, TrainResult, get_recipe, parse_save_at, train
from probe.zoo import parse_name

__all__ = [
    "InterventionData",
    "run_interventions",
    "conditions_for",
    "train_condition",
    "condition_run",
    "condition_recipe",
    "arm_captures",
    "arm_capture",
    "arm_capture_done",
    "arm_tables",
    "toy",
    "toy_done",
]

Callback = Callable[[str, dict], None]
_CAPTURE_LIMIT = 256  # samples per intervention capture (closeness and gradient profiles)


@dataclass
class InterventionData:
    """Everything the arms' verdicts, figures and report read."""

    arms: tuple[str, ...]
    conditions: pd.DataFrame  # arm, key, label, model, seed, start_*, final_* ...
    curves: pd.DataFrame  # key, label, seed, epoch, step, train_error, train_loss, test_error, ...
    closeness: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # key, seed, epoch, step, blocks, closeness
    grad_profile: pd.DataFrame = field(
        default_factory=pd.DataFrame
    )  # key, lam, seed, epoch, layer_index, grad_norm
    toy: dict[str, pd.DataFrame] = field(default_factory=dict)  # steps, curves, weights, summary


def conditions_for(cfg) -> dict[str, tuple[Condition, dict[str, str]]]:
    """key -> (condition, {arm using it: its label there}), in the order they must train."""
    fam = (cfg.families[0], cfg.families[1])
    if any(a in cfg.arms for a in ("constructed", "skipinit")):
        pre = [f for f in fam if f.startswith("pre")]
        if pre:
            raise ProbeError(
                f"The constructed and skipinit arms need post-activation families (plain, resnet); "
                f"got {', '.join(pre)}: a pre-activation block applies ReLU(BN(x)) to a signed "
                "input, which no parameters make the identity."
            )
    out: dict[str, tuple[Condition, dict[str, str]]] = {}
    for arm in cfg.arms:
        for c in arm_conditions(arm, fam, cfg.depths, cfg):
            if c.key in out and replace(out[c.key][0], label="") != replace(c, label=""):
                # two arms describing one run differently would train it under one name
                raise ProbeError(f"Arms disagree about run {c.key!r}: {out[c.key][0]} vs {c}.")
            out.setdefault(c.key, (c, {}))[1][arm] = c.label
    for c, arms in out.values():  # a run that cannot save where its arm reads stops us now
        try:
            parse_save_at(c.save_at, condition_recipe(cfg, c).epochs)
        except ProbeError as e:
            raise ProbeError(
                f"The {', '.join(arms)} arm reads run {c.key} at epochs {c.save_at}: {e} Train "
                "longer (e.g. --set recipe_overrides='{\"epochs\": 6}')."
            ) from None
    return out


def condition_run(cfg, c: Condition, seed: int, out: Path, init: str | None = None) -> TrainConfig:
    """The training run of condition ``c`` (``init``: its resolved init, for constructed runs
    the source checkpoint's path)."""
    return TrainConfig(
        model=c.model,
        dataset=cfg.dataset,
        train_limit=cfg.train_limit,
        recipe=cfg.recipe,
        seed=seed,
        model_options={**cfg.model_options, **c.model_options},
        recipe_overrides={**cfg.recipe_overrides, **c.recipe_overrides},
        save_at=c.save_at,
        eval_at="all",
        init=init or c.init,
        out=str(out / "runs" / f"{c.key}-s{seed}"),
        device=cfg.device,
        cuda_graph=cfg.cuda_graph,
    )


def train_condition(
    cfg, c: Condition, seed: int, out: Path, data: ImageArrays, grid, cb
) -> TrainResult:
    """Train (or reuse) the run of condition ``c``; ``grid`` maps (model, seed) to the grid's
    results, which constructed runs start from."""
    init = c.init
    if init.startswith("construct:@"):
        source = grid[(init.split("@", 1)[1], seed)]
        init = f"construct:{source.checkpoints[max(source.checkpoints)]}"
    cb("stage", {"text": f"train {c.key} seed {seed}"})
    return train(condition_run(cfg, c, seed, out, init), callback=cb, data=data)


def toy_done(cfg, tables: Path) -> bool:
    """Whether the toy's tables are there, whole, for ``cfg``'s settings."""
    return _toy_tables(cfg, tables) is not None


def shortcut_scale(c: Condition) -> float:
    """λ of a run's y = act(λ·S(x) + F(x)): its option, else 1 for a residual net, 0 for a plain one."""
    return c.model_options.get("shortcut_scale", 1.0 if "resnet" in c.model else 0.0)


def condition_recipe(cfg, c: Condition) -> Recipe:
    """The recipe condition ``c`` trains with: the study's, with the arm's overrides."""
    overrides = {**cfg.recipe_overrides, **c.recipe_overrides}
    return get_recipe(cfg.recipe, depth=parse_name(c.model)[1], **overrides)


def _steps_per_epoch(cfg, c: Condition, n_train: int) -> int:
    return -(-n_train // condition_recipe(cfg, c).batch_size)


def _rows(cfg, conds, results, n_train: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, curves = [], []
    for (key, seed), res in results.items():
        c, arms = conds[key]
        spe = _steps_per_epoch(cfg, c, n_train)
        start, final = res.history[0], res.final
        init = start.get("init", {})
        base = {"key": key, "label": c.label, "model": c.model, "seed": seed}
        for arm, label in arms.items():
            rows.append(
                {
                    "arm": arm,
                    **base,
                    "label": label,
                    "residual": not c.model.startswith(("plain", "preplain")),
                    "init": c.init,
                    "shortcut_scale": shortcut_scale(c),
                    "lr": condition_recipe(cfg, c).lr,
                    "start_train_error": start.get("train_error", float("nan")),
                    "start_train_loss": start.get("train_loss", float("nan")),
                    "source_train_error": init.get("from_metrics", {}).get(
                        "train_error", float("nan")
                    ),
                    "construct_eval_max_abs_diff": init.get("eval_max_abs_diff", float("nan")),
                    "construct_train_rel_diff": init.get("train_rel_diff", float("nan")),
                    **{
                        f"final_{k}": final[k]
                        for k in ("train_error", "train_loss", "test_error", "test_loss")
                    },
                    "epochs": final["epoch"],
                }
            )
        for r in res.history:
            if "train_error" in r:
                curves.append(
                    {
                        **base,
                        "epoch": r["epoch"],
                        "step": r["epoch"] * spe,
                        **{
                            k: r[k]
                            for k in ("train_error", "train_loss", "test_error", "test_loss")
                        },
                        "batch_error": r.get("batch_error", float("nan")),
                    }
                )
    return pd.DataFrame(rows), pd.DataFrame(curves)


def arm_captures(cfg, conds, results, out: Path) -> list[tuple[Path, Path, str]]:
    """(checkpoint, capture file, probe) of every capture the arms read: identity-closeness of
    each constructed run at its checkpoints, gradient profiles of each shortcut-scale run at its
    first and last."""
    jobs = []
    for (key, seed), res in results.items():
        c, arms = conds[key]
        folder = out / "captures" / "interventions"
        if "constructed" in cfg.arms and c.init.startswith("construct:"):
            for epoch, ck in res.checkpoints.items():
                jobs.append((ck, folder / f"{key}-s{seed}-e{epoch:04d}.h5", "residual"))
        if "shortcut_scale" in cfg.arms and "shortcut_scale" in arms:
            for epoch in sorted({min(res.checkpoints), max(res.checkpoints)}):
                path = folder / f"{key}-s{seed}-e{epoch:04d}-grad.h5"
                jobs.append((res.checkpoints[epoch], path, "grad"))
    return jobs


def arm_capture(ck: Path, path: Path, probe: str, cfg, data: ImageArrays, cb) -> None:
    """One of :func:`arm_captures`, unless a whole capture of these settings is there."""
    capture_once(path, ck, cfg, data, cb, f"capture {path.stem}", **_arm_kwargs(cfg, probe))


def arm_capture_done(ck: Path, path: Path, probe: str, cfg, data: ImageArrays) -> bool:
    """Whether :func:`arm_capture` would keep the capture already at ``path``."""
    return capture_done(path, ck, cfg, data, **_arm_kwargs(cfg, probe))


def _arm_kwargs(cfg, probe: str) -> dict:
    limit = min(cfg.capture_limit or _CAPTURE_LIMIT, _CAPTURE_LIMIT)
    return {"limit": limit, "layers": "auto", "probes": [make_probe(probe)]}


def _closeness(cfg, conds, results, out, data, n_train, cb) -> pd.DataFrame:
    """Identity-closeness d of the extra and the copied blocks of each constructed run over epochs."""
    rows = []
    for (key, seed), res in results.items():
        c, _ = conds[key]
        if not c.init.startswith("construct:"):
            continue
        extra = set(res.history[0].get("init", {}).get("extra", []))
        spe = _steps_per_epoch(cfg, c, n_train)
        for epoch, ck in res.checkpoints.items():
            path = out / "captures" / "interventions" / f"{key}-s{seed}-e{epoch:04d}.h5"
            arm_capture(ck, path, "residual", cfg, data, cb)
            with open_capture(path) as cap:
                t = identity_closeness(cap)
            t = t[t["quantity"] == "closeness"]
            for blocks, part in (
                ("extra", t[t["layer"].isin(extra)]),
                ("copied", t[~t["layer"].isin(extra)]),
            ):
                if len(part):
                    rows.append(
                        {
                            "key": key,
                            "label": c.label,
                            "seed": seed,
                            "epoch": epoch,
                            "step": epoch * spe,
                            "blocks": blocks,
                            "closeness": float(part["value"].mean()),
                        }
                    )
    return pd.DataFrame(rows)


def _grad_profile(cfg, conds, results, out, data, cb) -> pd.DataFrame:
    """||dL/dy|| per block at the first and last checkpoint of every shortcut-scale run."""
    rows = []
    for (key, seed), res in results.items():
        c, arms = conds[key]
        if "shortcut_scale" not in arms:
            continue
        lam = shortcut_scale(c)
        for epoch in sorted({min(res.checkpoints), max(res.checkpoints)}):
            path = out / "captures" / "interventions" / f"{key}-s{seed}-e{epoch:04d}-grad.h5"
            arm_capture(res.checkpoints[epoch], path, "grad", cfg, data, cb)
            with open_capture(path) as cap:
                t = signal_propagation(cap)
            t = t[t["quantity"] == "grad_norm"]
            for r in t.itertuples():
                rows.append(
                    {
                        "key": key,
                        "label": c.label,
                        "lam": lam,
                        "seed": seed,
                        "epoch": epoch,
                        "layer": r.layer,
                        "layer_index": r.layer_index,
                        "grad_norm": r.value,
                    }
                )
    return pd.DataFrame(rows)


_TOY_TABLES = ("steps", "curves", "weights", "summary")


def arm_tables(arms: tuple[str, ...]) -> set[str]:
    """The files the arms ``arms`` write into a study's tables/ (none without arms).

    Example:
        >>> sorted(arm_tables(("constructed",)))
        ['closeness.csv', 'conditions.csv', 'curves.csv', 'intervention_verdicts.json']
    """
    if not arms:
        return set()
    names = {"conditions.csv", "curves.csv", "intervention_verdicts.json"}
    if "constructed" in arms:
        names.add("closeness.csv")
    if "shortcut_scale" in arms:
        names.add("grad_profile.csv")
    if "toy" in arms:
        for n in _TOY_TABLES:
            names |= {f"toy_{n}.csv", stamp_path(Path(f"toy_{n}.csv")).name}
        names.add("toy.json")
    return names


def _toy_tables(cfg, tables: Path) -> dict[str, pd.DataFrame] | None:
    """The toy's tables when whole and made with the settings ``cfg`` asks for, else None."""
    tc = ToyConfig(seeds=cfg.toy_seeds)
    want = _toy_stamp(tc)
    try:  # bytes that are not text are a damaged stamp: the toy runs again
        made_under = (tables / "toy.json").read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        made_under = None
    if made_under != want:
        return None
    found = {
        n: stamped_table(tables / f"toy_{n}.csv", ("activation", "variant"), want)
        for n in _TOY_TABLES
    }
    return found if all(t is not None for t in found.values()) else None


def _toy_stamp(tc: ToyConfig) -> str:
    return json.dumps(tc.__dict__, sort_keys=True, default=list)


def toy(cfg, tables: Path, cb) -> dict[str, pd.DataFrame]:
    """Run the toy, or reuse its tables when they were made with the same settings."""
    found = _toy_tables(cfg, tables)
    if found is not None:
        return found
    tc = ToyConfig(seeds=cfg.toy_seeds)
    stamp, want = tables / "toy.json", _toy_stamp(tc)
    cb("stage", {"text": f"toy: {tc.seeds} seeds x {len(tc.activations)} activations"})
    res = run_toy(tc)
    found = {n: getattr(res, n) for n in _TOY_TABLES}
    for n, t in found.items():  # each with its digest: a table changed since is redone
        write_stamped_csv(tables / f"toy_{n}.csv", t, want)
    write_text(stamp, want)  # last: the stamp says the tables beside it are whole
    return found


def run_interventions(
    cfg,
    out: Path,
    data: ImageArrays,
    grid: dict[tuple[str, int], TrainResult],
    callback: Callback | None = None,
) -> InterventionData:
    """Train every arm's runs (reusing the grid's), capture, and write the arms' tables."""
    cb = callback or (lambda event, info: None)
    conds = conditions_for(cfg)
    (out / "captures" / "interventions").mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], TrainResult] = {}
    for seed in cfg.seeds:
        for key, (c, _) in conds.items():
            if (key, seed) in grid:
                results[(key, seed)] = grid[(key, seed)]
            else:
                results[(key, seed)] = train_condition(cfg, c, seed, out, data, grid, cb)
    n_train = len(data.y_train)
    table, curves = _rows(cfg, conds, results, n_train)
    tables = out / "tables"
    write_csv(tables / "conditions.csv", table)
    write_csv(tables / "curves.csv", curves)
    res = InterventionData(tuple(cfg.arms), table, curves)
    if "constructed" in cfg.arms:
        res.closeness = _closeness(cfg, conds, results, out, data, n_train, cb)
        write_csv(tables / "closeness.csv", res.closeness)
    if "shortcut_scale" in cfg.arms:
        res.grad_profile = _grad_profile(cfg, conds, results, out, data, cb)
        write_csv(tables / "grad_profile.csv", res.grad_profile)
    if "toy" in cfg.arms:
        res.toy = toy(cfg, tables, cb)
    return res
