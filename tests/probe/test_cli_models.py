"""``probe capture --model``: a user's file, an importable module, the zoo, weights, data sources,
and every way the arguments can be wrong (clear message, non-zero exit, no output file)."""

import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import probe
from probe.cli.main import cli

USER_FILE = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.ReLU(), nn.Conv2d(d, d, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.f(x))


class Net(nn.Module):
    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build_model(width=4, num_classes=10):
    return Net(width, num_classes)
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def _capture(*args):
    return CliRunner().invoke(cli, ["capture", *map(str, args)])


def test_a_model_from_a_python_file_on_synthetic_data(tmp_path, user_file):
    out = tmp_path / "x.h5"
    res = _capture(
        "--model", f"{user_file}:build_model", "--model-arg", "width=6", "--data", "synthetic",
        "--input-size", "3,8,8", "--limit", "16", "--probe", "residual", "--probe", "jacobian:n_probes=2",
        "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    with probe.open(out) as cap:
        assert cap.layers == ["blocks.0", "blocks.1"] and cap.attrs["n_samples"] == 16
        assert cap.provenance["model_kwargs"] == {"width": 6}
        assert cap.read("blocks.0", "jac_dev2").shape == (16,)
    assert CliRunner().invoke(cli, ["inspect", str(out)]).exit_code == 0


def test_a_model_from_a_module_with_weights_on_a_real_dataset(tmp_path, user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    sys.modules.pop("mynet", None)
    import mynet

    net = mynet.build_model()
    weights = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(weights))
    out = tmp_path / "y.h5"
    res = _capture(
        "--model", "mynet:build_model", "--weights", weights, "--data", "digits",
        "--input-size", "3,8,8", "--limit", "12", "--probe", "residual", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # The same numbers as capturing the loaded net directly on the same (resized) images.
    with probe.open(out) as cap:
        assert cap.provenance["weights_sha256"] and cap.provenance["dataset"] == "digits"
        f_norm = cap.read("blocks.1", "f_norm")
    from probe.data import load_dataset
    from probe.loading import capture_loader

    data = load_dataset("digits")
    x, y, _ = next(iter(capture_loader(data, "test", 12, torch.device("cpu"), 12)))
    x = x.expand(-1, 3, -1, -1)
    direct = probe.capture(net.eval(), [(x, y)], probes=[probe.ResidualNorms()])
    assert torch.allclose(
        torch.from_numpy(f_norm), torch.from_numpy(direct.read("blocks.1", "f_norm"))
    )


def test_a_torch_state_dict_and_the_zoo(tmp_path):
    net = probe.zoo.create("resnet8", in_channels=1, width=4)
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, weights)
    out = tmp_path / "z.h5"
    res = _capture(
        "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--model-arg", "width=4",
        "--weights", weights, "--data", "digits", "--limit", "8", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    with probe.open(out) as cap:
        assert len(cap.layers) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "synthetic", "--input-size", "3,8,8"], "either a CHECKPOINT"),
        (["--model", "nosuchsource", "--data", "digits"], "Invalid --model"),
        (["--model", "resnet8", "--data", "digits"], "Did you mean 'zoo:resnet8'?"),
        (["--model", "resnet50", "--data", "digits"], "Did you mean 'torchvision:resnet50'?"),
        (["--model", "nets.py", "--data", "digits"], "that builds the model: nets.py:FUNCTION"),
        (
            ["--model", "zoo:resnet8", "--data", "digits"],
            "one channel (8x8): --input-size 3,8,8 repeats it",
        ),
        (["--model", "zoo:resnet8", "--data", "synthetic"], "needs --input-size"),
        (["--model", "zoo:resnet8"], "needs --data"),
        (
            ["--model", "zoo:resnet8", "--data", "synthetic", "--input-size", "3,x,8"],
            "Invalid --input-size",
        ),
        (
            ["--model", "zoo:resnet8", "--data", "synthetic", "--input-size", "1,8,8"],
            "rejected an input",
        ),
        (
            [
                "--model",
                "zoo:resnet8",
                "--data",
                "synthetic",
                "--input-size",
                "3,8,8",
                "--model-arg",
                "width",
            ],
            "key=value",
        ),
        (["--model", "no_such_module_xyz:build", "--data", "digits"], "cannot import"),
        (["--model", "probe.zoo:nope", "--data", "digits"], "no callable 'nope'"),
        (
            [
                "--model",
                "zoo:resnet8",
                "--model-arg",
                "in_channels=1",
                "--model-arg",
                "num_classes=3",
                "--data",
                "digits",
            ],
            "num_classes=10",
        ),
    ],
)
def test_bad_model_arguments_are_clear_errors(tmp_path, args, message):
    out = tmp_path / "bad.h5"
    res = _capture(*args, "--out", out)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize(
    ("function", "message"),
    [("build_modl", "Did you mean 'build_model'?"), ("nothing_like_it", "Its callables: ")],
)
def test_a_missing_function_of_a_file_names_the_file_and_what_it_has(
    tmp_path, user_file, function, message
):
    out = tmp_path / "bad.h5"
    res = _capture(
        "--model", f"{user_file}:{function}", "--data", "synthetic", "--input-size", "3,8,8",
        "--out", out,
    )  # fmt: skip
    assert res.exit_code != 0, res.output
    assert f"{user_file} has no callable {function!r}" in res.output and message in res.output
    assert "_probe_user_model_" not in res.output  # the module's internal name
    assert "build_model" in res.output and not out.exists()


@pytest.mark.parametrize(
    "fix", [["--input-size", "3,8,8"], ["--model-arg", "in_channels=1"]], ids=["repeat", "build"]
)
def test_either_fix_the_one_channel_hint_gives_works(tmp_path, fix):
    out = tmp_path / "z.h5"
    res = _capture("--model", "zoo:resnet8", *fix, "--data", "digits", "--limit", "8", "--out", out)
    assert res.exit_code == 0, res.output
    with probe.open(out) as cap:
        assert int(cap.attrs["n_samples"]) == 8


def test_weights_that_do_not_fit_name_the_keys(tmp_path, user_file):
    weights = tmp_path / "w.pt"
    torch.save({"other.weight": torch.zeros(1)}, weights)
    res = _capture(
        "--model", f"{user_file}:build_model", "--weights", weights, "--data", "synthetic",
        "--input-size", "3,8,8", "--out", tmp_path / "x.h5",
    )  # fmt: skip
    assert (
        res.exit_code != 0 and "unexpected other.weight" in res.output and "missing" in res.output
    )


def test_weights_of_another_shape_are_named_and_nothing_is_loaded(tmp_path, user_file):
    from probe.sources import load_model, load_weights

    model = load_model(f"{user_file}:build_model", kwargs={"num_classes": 3})[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(5, 4)  # saved from a 5-class head
    state["stem.weight"] = torch.full_like(state["stem.weight"], 7.0)  # fits: must not load
    torch.save(state, tmp_path / "w.pt")
    before = model.stem.weight.detach().clone()
    with pytest.raises(probe.ProbeError, match=r"head.weight \[5, 4\] in the file, \[3, 4\] in"):
        load_weights(model, tmp_path / "w.pt")
    assert torch.equal(model.stem.weight, before)
    res = _capture(
        "--model", f"{user_file}:build_model", "--model-arg", "num_classes=3", "--weights",
        tmp_path / "w.pt", "--data", "synthetic", "--input-size", "3,8,8", "--out", tmp_path / "x.h5",
    )  # fmt: skip
    assert res.exit_code != 0 and "other shapes: head.weight" in res.output, res.output
    assert "Traceback" not in res.output and "unexpected RuntimeError" not in res.output
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_weights_saved_from_a_wrapper_load_as_the_model_s_own(tmp_path, user_file, prefix):
    """DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") prefix every key."""
    from probe.sources import load_model

    trained = load_model(f"{user_file}:build_model", seed=5)[0]
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    torch.save({prefix + k: v for k, v in trained.state_dict().items()}, tmp_path / "wrapped.pt")
    norms = []
    for name in ("plain.pt", "wrapped.pt"):
        out = tmp_path / f"{name}.h5"
        res = _capture(
            "--model", f"{user_file}:build_model", "--weights", tmp_path / name, "--data",
            "synthetic", "--input-size", "3,8,8", "--limit", "4", "--probe", "residual", "--out", out,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        with probe.open(out) as cap:
            norms.append(cap.read("blocks.1", "f_norm"))
    assert (norms[0] == norms[1]).all()
    random = load_model(f"{user_file}:build_model", seed=0)[0]
    assert not torch.equal(random.stem.weight, trained.stem.weight)  # the weights mattered


def test_a_folder_of_photos_of_several_sizes_is_resized_to_the_input_size(tmp_path, user_file):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, sizes in (("train", [(20, 30), (9, 12)]), ("test", [(40, 33), (8, 8), (15, 7)])):
        for i, hw in enumerate(sizes):
            (tmp_path / "photos" / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / split / f"c{i % 2}" / f"{i}.jpg"
            )
    common = ["--model", f"{user_file}:build_model", "--data", tmp_path / "photos"]
    res = _capture(*common, "--out", tmp_path / "no.h5")
    assert res.exit_code != 0 and "--input-size C,H,W" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "no.h5").exists()
    out = tmp_path / "x.h5"
    res = _capture(*common, "--input-size", "3,8,8", "--probe", "activations", "--out", out)
    assert res.exit_code == 0, res.output
    with probe.open(out) as cap:
        assert cap.attrs["n_samples"] == 3 and cap.provenance["input_size"] == [3, 8, 8]
        assert cap.read("blocks.0", "output").shape[1:] == (4, 8, 8)


def test_a_pickled_module_is_refused_as_weights(tmp_path, user_file):
    weights = tmp_path / "w.pt"
    torch.save(torch.nn.Linear(2, 2), weights)  # a whole module: unpickling would run code
    res = _capture(
        "--model", f"{user_file}:build_model", "--weights", weights, "--data", "synthetic",
        "--input-size", "3,8,8", "--out", tmp_path / "x.h5",
    )  # fmt: skip
    assert res.exit_code != 0 and "weights_only" in res.output


def test_random_weights_are_seeded(tmp_path):
    def f_norm(seed, name):
        out = tmp_path / name
        res = _capture(
            "--model", "zoo:resnet8", "--model-arg", "in_channels=1", "--seed", seed,
            "--data", "digits", "--limit", "8", "--probe", "residual", "--out", out,
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        with probe.open(out) as cap:
            assert cap.provenance["model_seed"] == seed
            return cap.read("stages.0.0", "f_norm")

    a, b, c = f_norm(0, "a.h5"), f_norm(0, "b.h5"), f_norm(1, "c.h5")
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("size", [None, "3,12,12"], ids=["as read", "resized"])
def test_channels_last_is_asked_for_and_gives_the_standard_numbers(tmp_path, user_file, size):
    """--channels-last feeds a user's model channels-last batches (resized ones too) and records
    it; the statistics equal the standard layout's up to rounding. Without it, the standard
    layout: a model's own kernel may assume NCHW memory."""
    sys.path.insert(0, str(user_file.parent))
    try:
        import mynet
    finally:
        sys.path.remove(str(user_file.parent))
    layouts = []
    real = mynet.Net.forward
    mynet.Net.forward = lambda self, x: layouts.append(x.stride(1) == 1) or real(self, x)
    try:
        outs = {}
        for flag in ([], ["--channels-last"]):
            out = tmp_path / f"x{len(flag)}.h5"
            res = _capture(
                "--model", "mynet:build_model", "--data", "synthetic", "--input-size", "3,8,8",
                *(["--input-size", size] if size else []), "--limit", "16", "--probe", "residual",
                "--probe", "channel", *flag, "--out", out,
            )  # fmt: skip
            assert res.exit_code == 0, res.output
            outs[len(flag)] = out
    finally:
        mynet.Net.forward = real
        sys.modules.pop("mynet", None)
    assert layouts and set(layouts[: len(layouts) // 2]) == {False}  # the first capture
    assert layouts[-1] is True
    with probe.open(outs[0]) as std, probe.open(outs[1]) as cl:
        assert cl.provenance["channels_last"] is True and "channels_last" not in std.provenance
        for layer in std.layers:
            for q in ("y_norm", "cos_fs", "channel_var"):
                torch.testing.assert_close(
                    torch.from_numpy(cl.read(layer, q)), torch.from_numpy(std.read(layer, q)),
                    rtol=2e-5, atol=1e-7,
                )  # fmt: skip
