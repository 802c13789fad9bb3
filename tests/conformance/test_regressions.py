"""Cases that gave silently wrong numbers on torchvision/timm models, each against an independent
computation (the blocks' own submodules called by hand, jacrev in float64)."""

import warnings

import pytest
import torch
from torch.func import jacrev

import probe
from probe.conformance import RawSites, randomize_


def _run(model, x, layers="auto", probes=(), mode="eval"):
    with probe.HookSession(model, layers, [RawSites(), *probes], mode=mode) as s:
        results, _ = s.run_batch(x, torch.zeros(len(x), dtype=torch.long))
    return results


def test_timm_drop_path_in_training_mode_is_inside_f():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_(timm.create_model("resnet18", num_classes=10, drop_path_rate=0.5))
    x = torch.randn(8, 3, 32, 32)
    results = _run(model, x, mode="train")
    dropped = 0
    for r in results.values():
        assert torch.allclose(torch.relu(r["F"] + r["S"]), r["Y"], atol=1e-5)
        # F is DropPath's output: a dropped sample's F is exactly 0.
        dropped += int((r["F"].flatten(1).abs().amax(1) == 0).sum())
    assert dropped > 0  # with p up to 0.5 over 8 blocks x 8 samples, some rows are dropped


def test_timm_resnetv2_downsampling_jac_dev2_uses_the_pre_activated_shortcut():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_(timm.create_model("resnetv2_50", num_classes=10)).eval()
    blk = model.stages[1].blocks[0]  # downsample(norm1(x)) shortcut, stride 2
    x_in = {}

    def keep_input(module, args):
        x_in.setdefault("x", args[0].detach())  # returns None: the input is left as it is

    h = blk.register_forward_pre_hook(keep_input)
    x = torch.randn(1, 3, 16, 16)  # the block input: 4096 values, an exact jacrev in seconds
    jac = probe.make_probe("jacobian:n_probes=128,chunk_size=16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = _run(model, x, layers=["stages.1.blocks.0"], probes=[jac])
    h.remove()
    r = results["stages.1.blocks.0"]
    b64 = blk.double()
    z = x_in["x"].double()
    J = jacrev(b64)(z).reshape(-1, z.numel())
    P = jacrev(lambda v: b64.downsample(b64.norm1(v)))(z).reshape(-1, z.numel())
    exact = float(((J - P) ** 2).sum().detach())
    est, se = float(r["jac_dev2"][0]), float(r["jac_dev2_se"][0])
    assert abs(est - exact) < 4 * se, (est, exact, se)
    blk.float()


def test_torchvision_vit_and_swin_blocks_have_two_sites_each_read_at_their_add():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_(tv.models.vit_b_16(num_classes=10, image_size=32)).eval()
    x = torch.randn(2, 3, 32, 32)
    results = _run(model, x)
    blk = model.encoder.layers.encoder_layer_0
    key = "encoder.layers.encoder_layer_0"
    r0, r1 = results[key + "#0"], results[key + "#1"]
    with torch.no_grad():
        h = blk.ln_1(r0["X"])
        f0 = blk.dropout(blk.self_attention(h, h, h, need_weights=False)[0])
        f1 = blk.mlp(blk.ln_2(r0["X"] + f0))
    assert torch.allclose(r0["F"], f0, atol=1e-5) and torch.allclose(r1["F"], f1, atol=1e-5)
    assert torch.equal(r1["S"], r0["Y"])  # the second site adds to the first one's result


def test_cli_captures_a_torchvision_model_on_synthetic_data(tmp_path):
    pytest.importorskip("torchvision")
    from click.testing import CliRunner

    from probe.cli.main import cli

    out = tmp_path / "x.h5"
    args = [
        "capture", "--model", "torchvision:resnet18", "--data", "synthetic", "--input-size",
        "3,64,64", "--probe", "residual", "--probe", "jacobian:n_probes=2,max_samples=4",
        "--limit", "8", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    inspected = CliRunner().invoke(cli, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "layers/layer4.1" in inspected.output
    with probe.open(out) as cap:
        assert len(cap.layers) == 8 and cap.provenance["model_name"] == "torchvision:resnet18"
        assert cap.read("layer2.0", "jac_dev2").shape == (4,)
