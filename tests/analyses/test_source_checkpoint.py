"""A capture's checkpoint is found from any working directory and after its folder moved, and
never when other weights stand at its path: measures read from it (BN scales, lesions, the
training history) are then left out with a warning, not computed on another model."""

import shutil
import warnings

import pytest

import probe
from analyses.checkpoints import CheckpointMissingWarning, source_checkpoint
from analyses.residual import response_std_table
from probe.loading import capture_checkpoint
from probe.train import TrainConfig, train
from probe.train.checkpoint import load_checkpoint, save_checkpoint


def _bn(name, module):
    import torch

    return isinstance(module, torch.nn.BatchNorm2d)


def _study(root, seed=0):
    """A run folder with an initialisation checkpoint and a BN capture of it, both given by
    paths relative to ``root`` (the working directory then)."""
    cfg = TrainConfig(model="resnet8", model_options={"width": 4}, seed=seed,
                      recipe_overrides={"epochs": 0}, save_at="0", out="s/runs/r")  # fmt: skip
    ck = train(cfg).checkpoints[0]
    capture_checkpoint(ck, limit=16, layers=_bn, probes=[probe.ChannelStats()],
                       out="s/captures/c.h5").close()  # fmt: skip
    return root / "s"


def _gamma_rows(path):
    with probe.open(path) as cap:
        table = response_std_table(cap)
    return int((table["quantity"] == "bn_gamma_abs").sum())


def test_found_from_another_directory_and_after_the_folder_moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path)
    want = _gamma_rows(study / "captures" / "c.h5")
    assert want == 7  # the stem's BN and two per block
    monkeypatch.chdir("/")
    assert _gamma_rows(study / "captures" / "c.h5") == want
    moved = shutil.move(study, tmp_path / "elsewhere")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointMissingWarning)
        assert _gamma_rows(f"{moved}/captures/c.h5") == want
        with probe.open(f"{moved}/captures/c.h5") as cap:
            assert source_checkpoint(cap).is_relative_to(moved)


def test_other_weights_at_the_recorded_path_are_not_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = _study(tmp_path)
    ck = study / "runs" / "r" / "checkpoints" / "epoch-0000.json"
    model, meta = load_checkpoint(ck)
    for p in model.parameters():
        p.data.mul_(2)  # a retrained run in the same folder: other weights, same path
    save_checkpoint(ck.with_suffix(""), model, meta)
    with pytest.warns(CheckpointMissingWarning, match="holds other weights"):
        assert _gamma_rows(study / "captures" / "c.h5") == 0
