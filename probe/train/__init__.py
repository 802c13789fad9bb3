"""Training: recipes, checkpoints (safetensors + JSON) and the resumable trainer."""

from probe.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from probe.train.recipes import RECIPES, Recipe, get_recipe, lr_at
from probe.train.runs import TrainConfig, TrainResult, read_run, run_finished
from probe.train.trainer import evaluate, parse_save_at, resolve_device, train

__all__ = [
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "get_recipe",
    "load_checkpoint",
    "lr_at",
    "parse_save_at",
    "read_checkpoint_meta",
    "read_run",
    "resolve_device",
    "run_finished",
    "save_checkpoint",
    "train",
]
