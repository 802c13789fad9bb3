import numpy as np
import pytest
import torch

import analyses
import probe
from probe.errors import ProbeError


def _loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]


def test_deleting_a_zero_branch_residual_block_changes_nothing():
    model = probe.zoo.create("resnet14", in_channels=1, width=4).eval()
    model.stages[0][1].zero_init_()
    base = analyses.error_rate(model, _loader())
    with analyses.deleted(model, ["stages.0.1"]):
        with torch.no_grad():
            x = _loader()[0][0]
            assert torch.allclose(model(x), model(x))
        assert analyses.error_rate(model, _loader()) == base


def test_deleted_restores_the_model_even_on_error():
    model = probe.zoo.create("resnet8", in_channels=1, width=4)
    before = [type(m) for m in model.modules()]
    with pytest.raises(RuntimeError), analyses.deleted(model, ["stages.0.0"]):
        raise RuntimeError("boom")
    assert [type(m) for m in model.modules()] == before


def test_deleting_an_unknown_block_is_a_clear_error():
    with (
        pytest.raises(ProbeError, match="not a recognised block"),
        analyses.deleted(probe.zoo.create("resnet8"), ["stem"]),
    ):
        pass


def test_lesion_study_rows():
    model = probe.zoo.create("plain14", in_channels=1, width=4).eval()
    key = {"model": "plain14", "depth": 14, "residual": False, "seed": 0, "checkpoint": 0}
    df = analyses.lesion_study(model, _loader(), key, n_random=(2,), repeats=2)
    assert set(df["quantity"]) == {"lesion_baseline", "lesion_error", "lesion_random_error"}
    assert df.query("quantity == 'lesion_error'")["layer"].tolist() == [
        f"stages.{s}.{b}" for s in range(3) for b in range(2)
    ]
    assert df.query("layer == 'stages.1.0'")["downsampling"].item()


def test_analyze_writes_figures_and_reports_skipped(tmp_path):
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    cap = probe.capture(
        model,
        _loader(),
        probes=[probe.ResidualNorms(), probe.ChannelStats()],
        out=tmp_path / "c.h5",
    )
    cap.close()
    said: list[str] = []
    res = analyses.analyze(
        [tmp_path / "c.h5"], tmp_path / "figs", lesions=True, progress=said.append
    )
    names = {p.name for p in res.files}
    assert {
        "identity_closeness.png",
        "identity_closeness.svg",
        "identity_closeness.csv",
        "measures.csv",
    } <= names
    assert "gradient_norms" in res.skipped and "needs probe 'grad'" in res.skipped["gradient_norms"]
    assert "lesions" in res.skipped  # no checkpoint in the provenance ...
    assert not [m for m in said if m.startswith("lesions")]  # ... so none is announced
    assert np.isfinite(res.table.query("quantity == 'closeness'")["value"]).all()


def test_a_model_named_like_a_path_gets_its_cka_figure_in_the_output_folder(tmp_path):
    # a model given as --model nets/mine.py:make is named so; '/' and ':' cannot go in a file name
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    cap = probe.capture(
        model,
        _loader(),
        probes=[probe.Activations(dtype="fp32")],
        out=tmp_path / "c.h5",
        name="nets/mine.py:make",
    )
    cap.close()
    res = analyses.analyze([tmp_path / "c.h5"], tmp_path / "figs", lesions=False)
    cka = sorted(p.name for p in res.files if p.name.startswith("cka_nets"))
    assert cka == ["cka_nets_mine.py_make_s0.csv", "cka_nets_mine.py_make_s0.png",
                   "cka_nets_mine.py_make_s0.svg"]  # fmt: skip
    assert all(p.parent == tmp_path / "figs" for p in res.files)
