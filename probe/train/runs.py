"""What a training run is: its configuration, what identifies it, its result, and reading a run
another process trained from its directory (``run.json``, ``history.json``, ``checkpoints/``,
``resume.json``; see :mod:`probe.train.trainer`).

Example:
    >>> run_identity({"model": "plain20", "out": "/tmp/a", "device": "cuda"})["model"]
    'plain20'
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from probe.errors import ProbeError
from probe.train.recipes import Recipe, get_recipe
from probe.zoo import parse_name

__all__ = [
    "TrainConfig",
    "TrainResult",
    "run_identity",
    "run_finished",
    "read_run",
    "read_history",
    "is_history",
    "default_run_dir",
    "planned_epochs",
]


@dataclass
class TrainConfig:
    """What to train, on what, how; every field is recorded in ``run.json``."""

    model: str = "plain20"  # registry name, e.g. resnet56, plain56, preresnet110
    dataset: str = "digits"  # digits, cifar10, cifar100, or a path to an image tree / .tar.gz
    train_limit: int | None = None  # train on the first N training images only (CPU-sized runs)
    recipe: str = "digits"  # he2016, fast, digits
    seed: int = 0
    model_options: dict = field(default_factory=dict)  # NetConfig overrides (shortcut, width, ...)
    recipe_overrides: dict = field(default_factory=dict)  # Recipe overrides (epochs, lr, ...)
    save_at: str = "0,last"  # epochs to checkpoint; 0 is the initialisation, "last" the end
    eval_at: str = ""  # extra epochs ("all", "0,2,4") with eval-mode metrics but no checkpoint
    init: str = "he"  # he, dirac, identity, construct:<shallower checkpoint> (probe.train.init)
    out: str = ""  # run directory; default data/runs/<model>-<dataset>-<recipe>-s<seed>
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    compile: bool = False  # torch.compile the model (GPU)
    compile_mode: str | None = None  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
    cuda_graph: bool = False  # replay full batches' forward + backward as CUDA graphs (GPU)
    sync_bn: bool = False  # over several ranks: BN statistics of the global batch (GPUs only)
    eval_batch_size: int = 1024

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Where and how fast a run executes, not what it is: a run directory that was moved or copied,
# resumed on another device or with compilation, is the same run.
# Evaluating in eval mode at more epochs does not change the weights either.
# The number of ranks and sync_bn are recorded per epoch in the history instead.
_NOT_IDENTITY = (
    "out",
    "device",
    "compile",
    "compile_mode",
    "cuda_graph",
    "eval_batch_size",
    "eval_at",
    "sync_bn",
)


def run_identity(config: dict) -> dict:
    """The fields of a (stored) TrainConfig that define the run; fields added since the run was
    stored take their defaults (a run from before ``init`` existed used He init)."""
    defaults = TrainConfig().to_dict()
    full = {**{k: defaults[k] for k in defaults if k not in config}, **config}
    if str(full["init"]).startswith("construct:"):
        # The source checkpoint is identified by its digest (``init_source`` in run.json), not its
        # path, so a study directory that was moved still resumes.
        full["init"] = "construct"
    return {k: v for k, v in full.items() if k not in _NOT_IDENTITY}


def planned_epochs(recipe: Recipe, steps_per_epoch: int) -> int:
    if recipe.max_iters is None:
        return recipe.epochs
    return min(recipe.epochs, -(-recipe.max_iters // steps_per_epoch))


def run_finished(cfg: TrainConfig, n_train: int) -> bool:
    """Whether ``cfg``'s run directory holds this run trained to its last epoch (so ``train``
    would return at once), read from its files alone. ``n_train``: training images."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    try:
        resume = json.loads((run_dir / "resume.json").read_text())
        stored = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    recipe = get_recipe(cfg.recipe, depth=parse_name(cfg.model)[1], **cfg.recipe_overrides)
    mine = json.loads(json.dumps(cfg.to_dict(), default=str))
    return (
        isinstance(resume, dict)
        and isinstance(stored, dict)
        and resume.get("epoch") == planned_epochs(recipe, -(-n_train // recipe.batch_size))
        and run_identity(stored.get("config") or {}) == run_identity(mine)
    )


def is_history(doc: object) -> bool:
    """Whether ``doc`` is a run's history: a list of one record (a dict) per epoch, in order
    from epoch 0.

    Example:
        >>> is_history([{"epoch": 0}, {"epoch": 1}]), is_history([{"epoch": 1}])
        (True, False)
    """
    return isinstance(doc, list) and all(
        isinstance(r, dict) and r.get("epoch") == i for i, r in enumerate(doc)
    )


def read_history(path: str | Path) -> list[dict]:
    """The per-epoch records of a run's ``history.json``, refused with what to do where the file
    is missing or damaged (a run trained again with the same settings writes it anew from its
    resume checkpoint).

    Example:
        >>> read_history("data/runs/resnet8-digits-digits-s0/history.json")[0]["epoch"]  # doctest: +SKIP
        0
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        why = f"{type(e).__name__}: {e}"
    else:
        if is_history(doc) and doc:
            return doc
        why = "not a list of per-epoch records from epoch 0"
    raise ProbeError(
        f"{path} is missing or damaged ({why}). Train the run again with the same settings "
        "(probe train ..., or the study): it rewrites the history from its resume checkpoint."
    )


def read_run(run_dir: str | Path) -> TrainResult:
    """A run another process trained, as its files hold it: history and checkpoints (no model).

    Example:
        >>> read_run("data/runs/resnet8-digits-digits-s0").final["train_error"]  # doctest: +SKIP
        0.0
    """
    run_dir = Path(run_dir)
    history = read_history(run_dir / "history.json")
    checkpoints = {
        int(p.stem.split("-", 1)[1]): p
        for p in sorted((run_dir / "checkpoints").glob("epoch-*.json"))
        if p.stem.split("-", 1)[1].isdigit()
    }
    wall = sum(r.get("seconds", 0.0) + r.get("eval_seconds", 0.0) for r in history)
    return TrainResult(run_dir, history, checkpoints, wall)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    checkpoints: dict[int, Path]
    wall_s: float
    resumed_from: int | None = None
    model: nn.Module | None = field(default=None, repr=False)  # the trained net, in eval mode

    @property
    def final(self) -> dict:
        """The last epoch record that carries eval-mode metrics."""
        return next(r for r in reversed(self.history) if "train_error" in r)


def default_run_dir(cfg: TrainConfig) -> Path:
    from probe.data import data_root

    name = Path(cfg.dataset).name.split(".")[0]
    return data_root() / "runs" / f"{cfg.model}-{name}-{cfg.recipe}-s{cfg.seed}"
