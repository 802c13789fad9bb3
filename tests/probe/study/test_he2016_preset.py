"""The he2016 (CIFAR) preset end to end through the CLI on a tiny image tree. A module of its
own: it needs no shared study, so pytest-xdist may run it beside the study module's group."""

import json

from probe.study import get_preset

# Every probe of the he2016 preset at a test's size (at the preset's settings the Jacobian probes
# took most of a minute here).
HE2016_PROBES = [
    "residual",
    "channel",
    "grad",
    "activations:dtype=fp16,max_samples=8",
    "jacobian:n_probes=2,max_samples=2,top_k=1,iters=3,slq_steps=3,spectrum_samples=2",
    "shattered:n_points=8,max_lag=2,max_samples=1",
    "segments:n_probes=2,max_samples=2",
    "param_grads:max_samples=4",
]


def test_he2016_preset_runs_on_an_image_tree(tmp_path):
    """The CIFAR preset end to end on a tiny synthetic class-folder tree (CPU, shrunk by --set)."""
    kinds = {p.split(":")[0] for p in get_preset("he2016").probes}
    assert {p.split(":")[0] for p in HE2016_PROBES} == kinds
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from probe.cli.main import cli

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for cls in ("a", "b"):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / cls / f"{i}.png"
                )
    res = CliRunner().invoke(
        cli,
        [
            "study",
            "--preset",
            "he2016",
            "--data",
            str(tmp_path / "tree"),
            "--out",
            str(tmp_path / "study"),
            "--set",
            "depths=8,14",
            "--set",
            'recipe_overrides={"epochs": 1, "batch_size": 8}',
            "--set",
            'model_options={"width": 4}',
            "--set",
            "capture_limit=8",
            "--set",
            "batch_size=8",
            "--set",
            "train_limit=16",
            "--set",
            "lesion_limit=6",
            "--set",
            f"probes={json.dumps(HE2016_PROBES)}",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "verdicts:" in res.output and (tmp_path / "study" / "report.html").exists()
    run = json.loads((tmp_path / "study" / "runs" / "plain8-s0" / "run.json").read_text())
    assert run["dataset"]["train"] == 16
    assert '"lesion_limit": 6' in (tmp_path / "study" / "study.json").read_text()
