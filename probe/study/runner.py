"""``probe study``: train the grid, capture along training, analyse, judge, report.

Layout of a study directory::

    runs/<model>-s<seed>/            training runs (resumable; finished runs are not retrained)
    captures/<model>-s<seed>-e<epoch>.h5      block probes
    captures/<model>-s<seed>-e<epoch>-bn.h5   BN outputs for Fig. 7
    tables/measures.csv, lesions-<model>-s<seed>.csv, degradation.csv, runs.csv, verdicts.json
    figures/*.png|svg|csv
    report.html, summary.md

Every step skips work whose output already exists and is valid, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from analyses.figure_reuse import render
from analyses.figures import plot_vs_depth
from analyses.lesions import checkpoint_lesions
from analyses.pipeline import measure_table, write_figures
from analyses.tidy import COLUMNS, run_key
from probe.data import data_root, load_dataset
from probe.errors import ProbeError
from probe.probes.registry import make_probe
from probe.probes.statistics import ChannelStats
from probe.store.reader import open_capture
from probe.study.files import (
    capture_done,
    capture_once,
    settings_key,
    stamp_path,
    stamped_table,
    write_csv,
    write_stamped_csv,
    write_text,
)
from probe.study.interventions import (
    InterventionData,
    ToyConfig,
    conditions_for,
    intervention_verdicts,
    link_tests,
    run_interventions,
    write_arm_figures,
)
from probe.study.interventions.runner import arm_tables
from probe.study.presets import StudyConfig
from probe.study.verdicts import Verdict, degradation_table, verdicts
from probe.train import TrainConfig, get_recipe, parse_save_at, train
from probe.train.graphs import check_graphable
from probe.train.runs import read_history
from probe.train.trainer import resolve_device, run_lock
from probe.zoo import parse_name

__all__ = [
    "StudyResult",
    "run_study",
    "capture_epochs",
    "grid_run",
    "grid_epochs",
    "grid_captures",
    "lesion_table",
    "lesion_path",
    "lesion_key",
    "CaptureSpec",
    "prepare_study",
    "study_dir",
    "run_study_here",
    "study_lock",
]

Callback = Callable[[str, dict], None]


@dataclass
class StudyResult:
    out: Path
    table: pd.DataFrame
    runs: pd.DataFrame
    degradation: pd.DataFrame
    verdicts: list[Verdict]
    report: Path
    summary: Path
    wall_s: float
    timings: dict[str, float] = field(default_factory=dict)
    arm_verdicts: list[Verdict] = field(default_factory=list)
    interventions: InterventionData | None = None


def capture_epochs(cfg: StudyConfig, epochs: int) -> list[int]:
    """Resolve ``capture_at`` ('0', 'mid', 'last', numbers) to sorted epochs."""
    return parse_save_at(",".join(str(t) for t in cfg.capture_at), epochs, what="capture_at")


LESION_COLUMNS = (*COLUMNS, "downsampling")


def _is_bn(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.BatchNorm2d)


def grid_epochs(cfg: StudyConfig, model: str) -> tuple[int, list[int]]:
    """(epochs the recipe trains ``model`` in the grid, the epochs its captures read)."""
    epochs = get_recipe(cfg.recipe, depth=parse_name(model)[1], **cfg.recipe_overrides).epochs
    return epochs, capture_epochs(cfg, epochs)


def grid_run(cfg: StudyConfig, out: Path, model: str, seed: int) -> TrainConfig:
    """The training run of ``model`` and ``seed`` in the study's grid."""
    epochs, at = grid_epochs(cfg, model)
    # arms construct from the grid's final nets and draw training curves at every epoch
    save_epochs = sorted({*at, epochs}) if cfg.arms else at
    return TrainConfig(
        model=model,
        dataset=cfg.dataset,
        train_limit=cfg.train_limit,
        recipe=cfg.recipe,
        seed=seed,
        model_options=dict(cfg.model_options),
        recipe_overrides=dict(cfg.recipe_overrides),
        save_at=",".join(str(e) for e in save_epochs),
        eval_at="all" if cfg.arms else "",
        out=str(out / "runs" / f"{model}-s{seed}"),
        device=cfg.device,
        cuda_graph=cfg.cuda_graph,
    )


@dataclass(frozen=True)
class CaptureSpec:
    """One capture of a study: a checkpoint, the file it goes to, what it records."""

    path: Path
    checkpoint: Path
    text: str
    layers: object
    probes: tuple

    def run(self, cfg: StudyConfig, data, cb: Callback) -> None:
        capture_once(self.path, self.checkpoint, cfg, data, cb, self.text, **self._kwargs(cfg))

    def done(self, cfg: StudyConfig, data) -> bool:
        """Whether :meth:`run` would keep the capture already at ``path``."""
        return capture_done(self.path, self.checkpoint, cfg, data, **self._kwargs(cfg))

    def _kwargs(self, cfg: StudyConfig) -> dict:
        return {"limit": cfg.capture_limit, "layers": self.layers, "probes": list(self.probes)}


def grid_captures(
    cfg: StudyConfig, out: Path, model: str, seed: int, cks: dict[int, Path]
) -> list[CaptureSpec]:
    """The block and BN captures of a grid run at its capture epochs ``cks``."""
    probes = tuple(make_probe(s) for s in cfg.probes)
    specs = []
    for epoch, ck in cks.items():
        stem = out / "captures" / f"{model}-s{seed}-e{epoch:04d}"
        for suffix, layers, plist in (("", "auto", probes), ("-bn", _is_bn, (ChannelStats(),))):
            specs.append(
                CaptureSpec(
                    stem.with_name(stem.name + suffix + ".h5"),
                    ck,
                    f"capture {model} seed {seed} epoch {epoch}{suffix}",
                    layers,
                    plist,
                )
            )
    return specs


def lesion_path(out: Path, model: str, seed: int) -> Path:
    return out / "tables" / f"lesions-{model}-s{seed}.csv"


def lesion_table(
    cfg: StudyConfig, out: Path, data, model: str, seed: int, cks: dict[int, Path], cb: Callback
) -> pd.DataFrame:
    """The lesion table of a grid run's last capture checkpoint: reused when whole and made
    with these settings (:func:`lesion_key`), else computed and written."""
    path = lesion_path(out, model, seed)
    settings = lesion_key(cfg, data, seed, cks)
    done = stamped_table(path, LESION_COLUMNS, settings)
    if done is not None:
        return done
    cb("stage", {"text": f"lesions {model} seed {seed}"})
    key = {
        "model": model,
        "depth": parse_name(model)[1],
        "residual": not model.startswith(("plain", "preplain")),
        "seed": seed,
        "checkpoint": max(cks),
    }
    part = checkpoint_lesions(
        cks[max(cks)], key, data, cfg.device, seed=seed, limit=cfg.lesion_limit
    )
    write_stamped_csv(path, part, settings)
    return part


def lesion_key(cfg: StudyConfig, data, seed: int, cks: dict[int, Path]) -> str:
    """What a grid run's lesion table is reused under: its checkpoint's weights, the data, the
    number of test images and the seed of the lesion passes."""
    return settings_key(
        cks[max(cks)],
        dataset=data.name,
        train_limit=cfg.train_limit,
        lesion_limit=cfg.lesion_limit,
        seed=seed,
    )


def study_tables(cfg: StudyConfig) -> set[str]:
    """The files a study of ``cfg`` writes or reuses in its tables/."""
    names = {"measures.csv", "runs.csv", "degradation.csv", "verdicts.json"}
    if cfg.lesions:
        for seed in cfg.seeds:
            for model in cfg.models:
                path = lesion_path(Path(), model, seed)
                names |= {path.name, stamp_path(path).name}
    return names | arm_tables(tuple(cfg.arms))


def remove_other_tables(tables: Path, cfg: StudyConfig) -> list[Path]:
    """Delete the files in ``tables`` that a study of ``cfg`` neither writes nor reuses: an
    earlier study into the same directory left them (an arm's tables, lesion tables of other
    depths), and beside this study's they would read as its own. -> the paths deleted"""
    keep = study_tables(cfg)
    gone = [
        p
        for p in sorted(tables.iterdir())
        # a writer's temporary file is probe.tempfiles' to remove
        if p.is_file() and p.name not in keep and ".tmp-" not in p.name
    ]
    for path in gone:
        path.unlink()
    return gone


def remove_other_figures(figdir: Path, kept: list[Path]) -> list[Path]:
    """Delete the figures in ``figdir`` (PNG, SVG and their CSV) that this run did not draw or
    reuse: those of an earlier study into the same directory with other settings (other depths,
    probes or arms) would otherwise sit beside this study's, and its report shows every figure
    in the folder. -> the paths deleted"""
    keep = {p.resolve() for p in kept}
    gone = []
    for path in sorted(figdir.iterdir()):
        if path.suffix in (".png", ".svg", ".csv") and path.resolve() not in keep:
            path.unlink()
            gone.append(path)
    return gone


def study_dir(cfg: StudyConfig, out: str | Path | None) -> Path:
    return Path(out) if out else data_root() / "studies" / cfg.name


def prepare_study(cfg: StudyConfig, out: Path) -> None:
    """Check ``cfg`` can run and lay out ``out``: nothing trains before an invalid study stops."""
    for sub in ("runs", "captures", "tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if len(cfg.families) != 2:
        raise ProbeError(f"A study compares two families (plain, residual); got {cfg.families}.")
    for m in cfg.models:
        parse_name(m)
    for s in cfg.probes:
        make_probe(s)
    conditions_for(cfg)  # an arm that cannot run stops the study before anything trains
    write_text(out / "study.json", json.dumps(cfg.to_dict(), indent=2))


def run_study(
    cfg: StudyConfig,
    out: str | Path | None = None,
    callback: Callback | None = None,
    *,
    distributed: bool | None = None,
) -> StudyResult | None:
    """Run (or resume) the study described by ``cfg`` in ``out`` (default data/studies/<name>).

    ``callback(event, info)`` gets 'stage' events (a person-readable step) and the trainer's
    events, for progress bars; the library itself never prints.

    Under an initialised process group with several ranks (torchrun; ``distributed=None``, the
    default) the study's runs, captures and lesion tables are spread over the ranks and rank 0
    then writes tables, figures and report (:mod:`probe.study.distributed`); ranks other than 0
    return None.
    """
    from probe.distributed.group import alone, grouped

    if cfg.cuda_graph:  # refused before the study directory is made
        check_graphable(resolve_device(cfg.device))
    if distributed is not False and grouped():
        from probe.study.distributed import run_study_over_ranks

        return run_study_over_ranks(cfg, study_dir(cfg, out), callback)
    out = study_dir(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    # alone: every run and capture below is this process's own
    with study_lock(out), alone():
        return run_study_here(cfg, out, callback)


def study_lock(out: Path) -> AbstractContextManager[None]:
    """The study directory's lock, held while a study writes there: a second study into the same
    directory (also one started while ranks of a killed job still run) stops at once instead of
    mixing its tables with that one's."""
    return run_lock(out, who="study")


def run_study_here(
    cfg: StudyConfig, out: Path, callback: Callback | None, before: dict[str, float] | None = None
) -> StudyResult:
    """The whole study in this process (each step reuses what its files already hold). Call it
    inside :func:`probe.distributed.group.alone` under a process group. ``before``: seconds
    each stage already took elsewhere (on the ranks), added to this run's timings."""
    before = before or {}
    t0 = time.perf_counter() - before.get("total", 0.0)
    cb = callback or (lambda event, info: None)
    prepare_study(cfg, out)
    timings: dict[str, float] = {}
    data = load_dataset(cfg.dataset).subset(cfg.train_limit)

    # 1. Train (or reuse) every model.
    ts = time.perf_counter()
    run_rows, checkpoints, grid = [], {}, {}
    for seed in cfg.seeds:
        for model in cfg.models:
            _, depth = parse_name(model)
            _, at = grid_epochs(cfg, model)
            cb("stage", {"text": f"train {model} seed {seed}"})
            res = train(grid_run(cfg, out, model, seed), callback=cb, data=data)
            final = res.final
            run_rows.append(
                {
                    "model": model,
                    "family": model[: -len(str(depth))],
                    "depth": depth,
                    "seed": seed,
                    "residual": not model.startswith(("plain", "preplain")),
                    "train_error": final["train_error"],
                    "train_loss": final["train_loss"],
                    "test_error": final["test_error"],
                    "test_loss": final["test_loss"],
                    "wall_s": sum(
                        h.get("seconds", 0.0) + h.get("eval_seconds", 0.0) for h in res.history
                    ),
                    "epochs": final["epoch"],
                }
            )
            checkpoints[(model, seed)] = {e: res.checkpoints[e] for e in at if e in res.checkpoints}
            grid[(model, seed)] = res
    runs = pd.DataFrame(run_rows)
    timings["train"] = time.perf_counter() - ts
    arms = None
    if cfg.arms:
        ts = time.perf_counter()
        arms = run_interventions(cfg, out, data, grid, cb)
        timings["interventions"] = time.perf_counter() - ts

    # 2. Capture at the chosen epochs.
    ts = time.perf_counter()
    caps = []
    for (model, seed), cks in checkpoints.items():
        for spec in grid_captures(cfg, out, model, seed, cks):
            spec.run(cfg, data, cb)
            caps.append(open_capture(spec.path))
    timings["capture"] = time.perf_counter() - ts

    # 3. Measures and lesions.
    ts = time.perf_counter()
    cb("stage", {"text": "measures"})
    table = measure_table(caps)
    last_epoch = {m: max(cks) for (m, _), cks in checkpoints.items()}
    lesion_parts = []
    if cfg.lesions:
        for (model, seed), cks in checkpoints.items():
            lesion_parts.append(lesion_table(cfg, out, data, model, seed, cks, cb))
    lesions = pd.concat(lesion_parts, ignore_index=True) if lesion_parts else None
    if lesions is not None:
        table = pd.concat([table, lesions], ignore_index=True)
        table["downsampling"] = table["downsampling"].astype("boolean").fillna(False).astype(bool)
    write_csv(out / "tables" / "measures.csv", table)
    write_csv(out / "tables" / "runs.csv", runs)
    deg = degradation_table(runs, data.name)
    write_csv(out / "tables" / "degradation.csv", deg)
    timings["analysis"] = time.perf_counter() - ts

    # 4. Figures: final checkpoints, initialisation, training curves, degradation against depth.
    ts = time.perf_counter()
    cb("stage", {"text": "figures"})
    figdir = out / "figures"
    first = min(min(c) for c in checkpoints.values())
    last = min(last_epoch.values())
    final_caps = [
        c
        for c in caps
        if run_key(c)["checkpoint"] == last
        and run_key(c)["seed"] == cfg.seeds[0]
        and run_key(c)["depth"] == max(cfg.depths)
    ]
    hist = []
    for (model, seed), _ in checkpoints.items():
        h = pd.DataFrame(read_history(out / "runs" / f"{model}-s{seed}" / "history.json"))
        h["model"], h["seed"] = model, seed
        hist.append(h)
    files, skipped = write_figures(
        table[table["checkpoint"] == last],
        figdir,
        final_caps,
        pd.concat(hist, ignore_index=True),
        lesions,
        prefix="final_",
    )
    init_table = table[
        (table["checkpoint"] == first)
        & table["quantity"].isin(
            ["grad_norm", "cos_lag", "corr_length", "act_norm", "av", "closeness"]
        )
    ]
    f2, _ = write_figures(init_table, figdir, prefix="init_")
    files += [f for f in f2 if not f.name.startswith("init_training")]
    rt = runs.rename(columns={"train_error": "value"}).assign(quantity="train_error")
    files += render(
        figdir,
        "degradation_vs_depth",
        plot_vs_depth,
        rt,
        "train_error",
        "final training error (eval mode)",
        data=rt,
    )
    timings["figures"] = time.perf_counter() - ts

    # 5. Verdicts and report.
    plain_fam, res_fam = cfg.families
    vs = verdicts(
        table, runs, (plain_fam, res_fam), cfg.depths, first, last, num_classes=data.num_classes
    )
    arm_verdicts: list[Verdict] = []
    if arms is not None:
        cb("stage", {"text": "interventions: verdicts and figures"})
        arm_verdicts = intervention_verdicts(arms, cfg, num_classes=data.num_classes)
        link_tests(vs, arm_verdicts)
        files += write_arm_figures(
            arms, figdir, cfg.families, max(cfg.depths), ToyConfig(seeds=cfg.toy_seeds).steps
        )
        write_text(
            out / "tables" / "intervention_verdicts.json",
            json.dumps([v.__dict__ for v in arm_verdicts], indent=2),
        )
    write_text(out / "tables" / "verdicts.json", json.dumps([v.__dict__ for v in vs], indent=2))
    remove_other_figures(figdir, files)
    remove_other_tables(out / "tables", cfg)
    for c in caps:
        c.close()
    for stage, seconds in before.items():
        if stage != "total":
            timings[stage] = timings.get(stage, 0.0) + seconds
    timings["total"] = time.perf_counter() - t0
    from probe.study.report import write_report

    report, summary = write_report(
        out, cfg, runs, deg, vs, figdir, skipped, timings, arm_verdicts, arms
    )
    return StudyResult(
        out,
        table,
        runs,
        deg,
        vs,
        report,
        summary,
        time.perf_counter() - t0,
        timings,
        arm_verdicts,
        arms,
    )
