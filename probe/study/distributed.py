"""A study over the ranks of a process group (``torchrun ... -m probe study``).

The study's independent units -- one training run, one capture, one lesion table, the toy -- are
spread over the ranks, stage by stage: (0) the grid's runs and the toy; (1) the arms' runs, some
of which start from a grid net; (2) captures and lesion tables, which read finished runs. Every
rank runs its units in this process alone, exactly as a one-process study runs them (same files,
same numbers); a barrier ends each stage, and a unit that fails on any rank stops every rank
after that stage with its message. Then rank 0 runs the ordinary study, which finds every unit
done and reuses it, and writes the measures, verdicts, figures and report.

Units are balanced by a rough cost (depth x epochs x images for training; depth x samples for
captures; depth x blocks x images for lesions), longest first onto the least loaded rank. The
units' files are the study's whole state: a study interrupted under any number of ranks resumes
under any other number, or in one process; rank 0 decides which units are left, so every rank
sees the same plan.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from probe.data import ImageArrays, load_dataset
from probe.distributed.group import agree, alone, broadcast, main_first, on_main, ranks
from probe.study.files import stamped_table
from probe.study.interventions.runner import (
    arm_capture,
    arm_capture_done,
    arm_captures,
    condition_recipe,
    condition_run,
    conditions_for,
    toy,
    toy_done,
    train_condition,
)
from probe.study.presets import StudyConfig
from probe.study.runner import (
    LESION_COLUMNS,
    StudyResult,
    grid_captures,
    grid_epochs,
    grid_run,
    lesion_key,
    lesion_path,
    lesion_table,
    prepare_study,
    run_study_here,
    study_lock,
)
from probe.train import read_run, run_finished, train
from probe.zoo import parse_name

__all__ = ["Unit", "STAGES", "study_units", "assign", "run_study_over_ranks"]

Callback = Callable[[str, dict], None]
STAGES = ("training", "training the arms", "captures and lesions")
_TIMING = ("train", "interventions", "capture")  # the report's timing each stage adds to
_HEAVY = ("jacobian", "shattered", "segments", "param_grads")  # probes with many passes per sample


@dataclass(frozen=True)
class Unit:
    """One independent piece of a study: what it is, its stage, a rough cost, how to run it and
    how to tell it is done (its files are there and whole)."""

    stage: int
    name: str
    cost: float
    run: Callable[[], object]
    done: Callable[[], bool]


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each unit: longest first, each onto the least loaded rank (ties: lowest).

    Example:
        >>> assign([5, 1, 4, 2, 3], 2)
        [0, 0, 1, 0, 1]
    """
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def _grid_checkpoints(cfg: StudyConfig, out: Path, model: str, seed: int) -> dict[int, Path]:
    folder = out / "runs" / f"{model}-s{seed}" / "checkpoints"
    return {e: folder / f"epoch-{e:04d}.json" for e in grid_epochs(cfg, model)[1]}


def _capture_cost(cfg: StudyConfig, model: str, n: int, probes: tuple[str, ...]) -> float:
    heavy = sum(p.split(":")[0] in _HEAVY for p in probes)
    return parse_name(model)[1] * n * (1 + 4 * heavy)


def study_units(cfg: StudyConfig, out: Path, data: ImageArrays, cb: Callback) -> list[Unit]:
    """Every unit of the study, in a fixed order (the same on every rank)."""
    n_train, n_split = len(data.y_train), len(data.split(cfg.split)[1])
    n_capture = min(n_split, cfg.capture_limit or n_split)
    conds = conditions_for(cfg)
    units: list[Unit] = []
    for seed in cfg.seeds:
        for model in cfg.models:
            tc = grid_run(cfg, out, model, seed)
            units.append(
                Unit(
                    0,
                    f"train {model} seed {seed}",
                    parse_name(model)[1] * grid_epochs(cfg, model)[0] * n_train,
                    lambda tc=tc, name=f"train {model} seed {seed}": (
                        cb("stage", {"text": name}),
                        train(tc, callback=cb, data=data),
                    ),
                    lambda tc=tc: run_finished(tc, n_train),
                )
            )
    if "toy" in cfg.arms:
        tables = out / "tables"
        units.append(
            Unit(
                0,
                "toy",
                200.0 * cfg.toy_seeds,
                lambda: toy(cfg, tables, cb),
                lambda: toy_done(cfg, tables),
            )
        )
    grid = {(m, s) for s in cfg.seeds for m in cfg.models}
    for seed in cfg.seeds:
        for key, (c, _) in conds.items():
            if (key, seed) in grid:
                continue
            units.append(
                Unit(
                    1,
                    f"train {key} seed {seed}",
                    parse_name(c.model)[1] * condition_recipe(cfg, c).epochs * n_train,
                    lambda c=c, seed=seed: train_condition(
                        cfg, c, seed, out, data, _GridRuns(out), cb
                    ),
                    lambda c=c, seed=seed: run_finished(condition_run(cfg, c, seed, out), n_train),
                )
            )
    for seed in cfg.seeds:
        for model in cfg.models:
            cks = _grid_checkpoints(cfg, out, model, seed)
            for spec in grid_captures(cfg, out, model, seed, cks):
                probes = cfg.probes if not spec.path.stem.endswith("-bn") else ("channel",)
                units.append(
                    Unit(
                        2,
                        spec.text,
                        _capture_cost(cfg, model, n_capture, probes),
                        lambda spec=spec: spec.run(cfg, data, cb),
                        lambda spec=spec: spec.done(cfg, data),
                    )
                )
            if cfg.lesions:
                depth = parse_name(model)[1]
                n_lesion = min(len(data.y_test), cfg.lesion_limit or len(data.y_test))
                units.append(
                    Unit(
                        2,
                        f"lesions {model} seed {seed}",
                        depth * depth * n_lesion / 2,
                        lambda model=model, seed=seed, cks=cks: lesion_table(
                            cfg, out, data, model, seed, cks, cb
                        ),
                        lambda model=model, seed=seed, cks=cks: (
                            stamped_table(
                                lesion_path(out, model, seed),
                                LESION_COLUMNS,
                                lesion_key(cfg, data, seed, cks),
                                warn=False,  # lesion_table says so when it recomputes
                            )
                            is not None
                        ),
                    )
                )
    return units + _arm_capture_units(cfg, out, data, conds, cb)


def _arm_capture_units(cfg, out: Path, data, conds, cb) -> list[Unit]:
    """Captures the arms read; listed from the runs' files, so only once their runs are done."""
    if not cfg.arms:
        return []
    results = {}
    for seed in cfg.seeds:
        for key in conds:
            run_dir = out / "runs" / f"{key}-s{seed}"
            if not (run_dir / "history.json").is_file():
                return []  # stage 2 is planned after stage 1: then every run is there
            results[(key, seed)] = read_run(run_dir)
    n = min(256, cfg.capture_limit or 256)

    def model_of(ck: Path) -> str:  # runs/<key>-s<seed>/checkpoints/epoch-E.json
        return conds[ck.parent.parent.name.rsplit("-s", 1)[0]][0].model

    return [
        Unit(
            2,
            f"capture {path.stem}",
            _capture_cost(cfg, model_of(ck), n, (probe,)),
            lambda ck=ck, path=path, probe=probe: arm_capture(ck, path, probe, cfg, data, cb),
            lambda ck=ck, path=path, probe=probe: arm_capture_done(ck, path, probe, cfg, data),
        )
        for ck, path, probe in arm_captures(cfg, conds, results, out)
    ]


class _GridRuns:
    """The grid's finished runs, read from their directories when a constructed run asks."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __getitem__(self, key: tuple[str, int]):
        model, seed = key
        return read_run(self.out / "runs" / f"{model}-s{seed}")


def run_study_over_ranks(
    cfg: StudyConfig, out: Path, callback: Callback | None = None
) -> StudyResult | None:
    """Run the study's units on this rank's share, then (rank 0) the analysis and report."""
    cb = callback or (lambda event, info: None)
    r = ranks()
    t0 = time.perf_counter()
    before: dict[str, float] = {}
    result: dict = {}
    with contextlib.ExitStack() as held:

        def prepare() -> None:  # rank 0 holds the study's lock until the report is written
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(study_lock(out))
            prepare_study(cfg, out)

        on_main("preparing the study", prepare)
        data = main_first(
            "loading the data", lambda: load_dataset(cfg.dataset).subset(cfg.train_limit)
        )
        held.enter_context(alone())  # each unit is this rank's own run or capture
        for stage, title in enumerate(STAGES):
            ts = time.perf_counter()
            units = [u for u in study_units(cfg, out, data, cb) if u.stage == stage]
            done = broadcast([u.done() for u in units] if r.is_main else None)
            todo = [u for u, d in zip(units, done) if not d]
            owners = assign([u.cost for u in todo], r.world)
            mine = [u for u, o in zip(todo, owners) if o == r.rank]
            if todo:
                cb("stage", {"text": f"{title}: {len(mine)} of {len(todo)} units on {r}"})
            agree(title, lambda mine=mine: [u.run() for u in mine])
            if units:  # a stage with no units (no arms) is no stage of this study
                before[_TIMING[stage]] = time.perf_counter() - ts

        def report() -> None:
            before["total"] = time.perf_counter() - t0
            result["study"] = run_study_here(cfg, out, callback, before)

        on_main("tables, figures and report", report)
    return result.get("study")
