"""Which run a capture belongs to: tables must never merge different models under one label."""

import pytest
import torch
from torch import nn

import analyses
import probe
from analyses.pipeline import measure_table
from analyses.tidy import run_key
from probe.errors import ProbeError


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]


def _zoo(name):
    return probe.zoo.create(name, in_channels=1, width=4).eval()


@pytest.mark.parametrize(
    "name,residual", [("plain20", False), ("resnet20", True), ("preplain8", False)]
)
def test_a_zoo_model_captured_from_a_script_carries_its_own_identity(name, residual):
    cap = probe.capture(_zoo(name), _batch(), probes=[probe.ResidualNorms()])
    key = run_key(cap)
    assert (key["model"], key["depth"], key["residual"]) == (
        name,
        int(name[-2:].lstrip("n")),
        residual,
    )
    table = analyses.residual_magnitude(cap)
    assert set(table["model"]) == {name} and set(table["residual"]) == {residual}


def test_plain_and_residual_captures_stay_apart_in_one_table():
    caps = [
        probe.capture(_zoo(n), _batch(), probes=[probe.ResidualNorms()])
        for n in ("plain8", "resnet8")
    ]
    table = measure_table(caps)
    assert table.groupby("model")["residual"].unique().map(list).to_dict() == {
        "plain8": [False],
        "resnet8": [True],
    }


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return x + self.f(x)


def _user_model():
    probe.register_residual(
        _Block, probe.ResidualSpec(branch="f", shortcut=None, clone_branch=False)
    )
    return nn.Sequential(_Block(), _Block(), nn.Flatten(), nn.Linear(64, 10)).eval()


def test_name_labels_a_user_model_and_its_blocks_say_it_is_residual():
    cap = probe.capture(_user_model(), _batch(), probes=[probe.ResidualNorms()], name="mynet")
    assert run_key(cap)["model"] == "mynet" and run_key(cap)["residual"] is True


def test_captures_that_do_not_say_which_model_they_are_are_not_pooled():
    caps = [
        probe.capture(_user_model(), _batch(), probes=[probe.ResidualNorms()]) for _ in range(2)
    ]
    with pytest.raises(ProbeError, match="name="):
        measure_table(caps)


def test_two_captures_of_one_run_with_the_same_quantities_are_not_pooled():
    model = _zoo("resnet8")
    caps = [probe.capture(model, _batch(n), probes=[probe.ResidualNorms()]) for n in (4, 6)]
    with pytest.raises(ProbeError, match="pool their rows"):
        measure_table(caps)
    other = probe.capture(model, _batch(), probes=[probe.ChannelStats()])
    assert len(measure_table([caps[0], other]))  # different quantities of one run do combine


def test_an_empty_name_is_refused():
    with pytest.raises(ProbeError, match="name"):
        probe.capture(_zoo("resnet8"), _batch(), probes=[probe.ResidualNorms()], name=" ")


@pytest.mark.parametrize(
    "name, depth",
    [
        ("resnet56", 56),
        ("zoo:plain20", 20),
        ("torchvision:vit_b_16", -1),
        ("torchvision:mobilenet_v2", -1),
        ("mynet3", -1),
    ],
)
def test_depth_is_read_only_from_zoo_style_names(name, depth):
    from analyses.tidy import run_key

    class Cap:
        provenance = {"model_name": name}
        layers = []

    assert run_key(Cap())["depth"] == depth


FACTORY = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c, residual):
        super().__init__()
        self.residual = residual
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh())

    def forward(self, x):
        return x + self.f(x) if self.residual else self.f(x)


def make(residual=True, width=4):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1),
                         nn.Sequential(Block(width, residual), Block(width, residual)),
                         nn.Flatten(), nn.LazyLinear(10))
"""


def _cli_capture(tmp_path, name, *args):
    from click.testing import CliRunner

    from probe.cli.main import cli

    out = tmp_path / f"{name}.h5"
    res = CliRunner().invoke(
        cli,
        ["capture", "--model", f"{tmp_path / 'net.py'}:make", "--data", "synthetic",
         "--input-size", "1,6,6", "--limit", "8", "--layers", "1.*", "--probe", "residual",
         "--out", str(out), *args],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return probe.open(out)


def test_variants_of_one_factory_are_runs_of_their_own(tmp_path):
    """--model-arg residual=false and =true, and two --seed values, were one run to the
    analyses (refused as duplicates), and a plain user model with no residual add at all was
    labelled residual."""
    (tmp_path / "net.py").write_text(FACTORY)
    plain = _cli_capture(tmp_path, "plain", "--model-arg", "residual=false")
    res = _cli_capture(tmp_path, "res", "--model-arg", "residual=true")
    res_seed = _cli_capture(tmp_path, "res1", "--model-arg", "residual=true", "--seed", "1")
    table = measure_table([plain, res, res_seed])
    runs = table[["model", "residual", "seed"]].drop_duplicates()
    spec = f"{tmp_path / 'net.py'}:make"
    assert sorted(map(tuple, runs.values.tolist())) == [
        (f"{spec}(residual=false)", False, 0),
        (f"{spec}(residual=true)", True, 0),
        (f"{spec}(residual=true)", True, 1),
    ]
    named = _cli_capture(tmp_path, "named", "--model-arg", "residual=true", "--name", "mine")
    assert run_key(named)["model"] == "mine" and run_key(named)["residual"] is True
    with pytest.raises(ProbeError, match=r"both mine seed 0 and both hold(?s:.*)--name") as err:
        measure_table([named, _cli_capture(tmp_path, "again", "--name", "mine")])
    assert "epoch" not in str(err.value)  # a model without checkpoints has no epoch to name
