"""What a newcomer types in a notebook works, or says what was wrong."""

import warnings

import numpy as np
import pytest
import torch

import analyses
import probe
from analyses.tidy import MissingProbeWarning
from probe.errors import ProbeError


def _model():
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval()


def _batch(n=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]


def test_top_level_names():
    assert probe.JacobianNorms and probe.ShatteredGradients and probe.SegmentJacobians
    assert probe.ParamGradNorms and probe.make_probe("residual")
    assert probe.list_models("plain2*") == ["plain20", "plain26"]


def test_probes_may_be_spec_strings_classes_or_instances():
    cap = probe.capture(
        _model(), _batch(), probes=["residual", probe.ChannelStats, "jacobian:n_probes=2"]
    )
    assert cap.has("stages.0.0", "f_norm") and cap.has("stages.0.0", "channel_var")
    assert cap.has("stages.0.0", "jac_fro2")
    assert cap.config["probes"][2]["n_probes"] == 2


@pytest.mark.parametrize("bad", [[3], ["resdual"], [probe.Probe.forward]])
def test_anything_else_is_refused_with_the_choices(bad):
    with pytest.raises(ProbeError, match="residual"):
        probe.capture(_model(), _batch(), probes=bad)


def test_a_capture_reads_like_a_dict_and_exports_a_tidy_frame():
    cap = probe.capture(
        _model(), _batch(), probes=["residual", "jacobian:n_probes=2,max_samples=3"]
    )
    assert "stages.0.0" in cap and set(cap["stages.0.0"]) >= {"f_norm", "jac_fro2"}
    assert np.array_equal(cap["stages.0.0"]["f_norm"], cap.read("stages.0.0", "f_norm"))
    df = cap.to_frame()
    assert len(df) == 3 * 5 and {"layer", "sample_index", "label", "f_norm"} <= set(df.columns)
    one = df[df["layer"] == "stages.1.0"]
    assert np.allclose(one["f_norm"], cap.read("stages.1.0", "f_norm"))
    assert one["jac_fro2"].isna().sum() == 2  # capped at 3 of 5 samples


def test_cka_matrix_takes_a_memory_capture():
    cap = probe.capture(_model(), _batch(8), probes=[probe.Activations(dtype="fp32")])
    mat = analyses.cka_matrix(cap)
    assert mat.shape == (3, 3) and np.allclose(np.diag(mat), 1.0)
    with pytest.raises(ProbeError, match="activations"):
        analyses.cka_matrix(probe.capture(_model(), _batch(), probes=["residual"]))


def test_a_measure_without_its_probe_warns_and_names_the_probe():
    cap = probe.capture(_model(), _batch(), probes=["channel"])
    with pytest.warns(MissingProbeWarning, match="'shattered'"):
        assert len(analyses.shattered_table(cap)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingProbeWarning)
        analyses.measure_table([cap])  # the pipeline lists what it skipped itself


def test_analyze_says_when_two_probes_of_one_measure_are_in_different_files(tmp_path):
    m = _model()
    a = probe.capture(m, _batch(), probes=["jacobian:n_probes=2"], out=tmp_path / "a.h5")
    b = probe.capture(m, _batch(), probes=["residual"], out=tmp_path / "b.h5")
    res = analyses.analyze([a, b], tmp_path / "fig", lesions=False)
    assert (
        "in one capture; they are in different files" in res.skipped["gradient_scale_coefficient"]
    )


def test_train_returns_the_trained_model(tmp_path):
    from probe.train import TrainConfig, train

    cfg = TrainConfig(
        model="plain8", recipe_overrides={"epochs": 1, "batch_size": 512}, out=str(tmp_path / "r")
    )
    res = train(cfg)
    assert isinstance(res.model, torch.nn.Module) and not res.model.training


def test_a_second_writer_to_one_run_directory_is_refused(tmp_path):
    from filelock import FileLock

    from probe.train import TrainConfig, train

    out = tmp_path / "r"
    out.mkdir()
    with FileLock(out / ".lock"):  # another process is training here
        cfg = TrainConfig(model="plain8", recipe_overrides={"epochs": 1}, out=str(out))
        with pytest.raises(ProbeError, match="Another training process"):
            train(cfg)
