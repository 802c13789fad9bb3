"""benchmarks/compare.py judges resprobe against its peers: its references must be right, and a
method that captures a wrong tensor must fail its reference check, or the table means nothing."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

# benchmarks/ is not an installed package: loaded from the tree, as `python -m` runs it
_spec = importlib.util.spec_from_file_location(
    "compare", Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def test_the_io_reference_is_each_block_split_by_hand():
    ref = compare.reference_io("zoo")
    net, _, _, _ = compare.build("zoo")
    blocks = list(net.blocks())
    assert len(ref) == 3 * len(blocks)
    for b, (x, f, y) in zip(blocks, zip(ref[0::3], ref[1::3], ref[2::3])):
        with torch.no_grad():
            s = b.shortcut(x) if b.residual else 0
            assert torch.equal(b.act(f + s), y)  # act(F + S) = y, F not zero
            assert f.abs().max() > 0
    assert all(torch.equal(ref[i + 2], ref[i + 3]) for i in range(0, len(ref) - 3, 3))


def test_the_io_row_passes_right_captures_and_fails_a_wrong_branch(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    compare.worker("zoo", "io", ["hooks", "resprobe"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    assert res["hooks"]["ref_error"] == 0 and res["resprobe"]["ref_error"] == 0
    assert res["resprobe"]["ref_blocks"] == 3 * 27 and "paired" in res["resprobe"]
    # a hook that reads the wrong tensor as F(x) (here the block's activation output, y): caught
    original = compare._branch_of

    def wrong(model, block):
        return block.act if isinstance(block.act, torch.nn.ReLU) else original(model, block)

    monkeypatch.setattr(compare, "_branch_of", wrong)  # reads act's output: y, not F(x)
    compare.worker("zoo", "io", ["hooks"], 1, 0, str(out), "default")
    assert json.loads(out.read_text())["hooks"]["ref_error"] > 0.1


def test_a_ratio_interval_tells_a_shift_from_the_noise():
    rng = np.random.default_rng(0)
    b = list(100 + rng.normal(0, 3, 31))
    noise = [t * (1 + rng.normal(0, 0.01)) for t in b]
    slower = [t * 1.05 * (1 + rng.normal(0, 0.01)) for t in b]
    _, lo, hi = compare.ratio_ci(noise, b)
    assert lo < 1 < hi
    med, lo, hi = compare.ratio_ci(slower, b)
    assert 1 < lo < med < hi and abs(med - 1.05) < 0.01


def test_the_gradient_reference_is_each_block_output_and_its_gradient():
    ref = compare.reference_output_grads("zoo")
    outs, grads = ref[0::2], ref[1::2]
    for got, want in zip(outs, compare.reference_outputs("zoo")):
        assert torch.equal(got, want)
    # the last block's gradient by hand: L = sum_n CE(fc(mean over positions of y_n)), so
    # dL/dy = (softmax(z) - onehot(y)) W / (H W) at every position
    net, _, _, y = compare.build("zoo")
    y_last = outs[-1]
    with torch.no_grad():
        z = net.head(y_last)
    fc = net.head.fc
    dz = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, z.shape[1])
    positions = y_last.shape[2] * y_last.shape[3]
    want = (dz @ fc.weight / positions)[:, :, None, None].expand_as(y_last)
    torch.testing.assert_close(grads[-1], want, rtol=1e-5, atol=1e-7)
    assert all(g.abs().max() > 0 for g in grads)


def test_the_grads_row_passes_right_captures_and_fails_a_shifted_gradient(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    compare.worker("zoo", "grads", ["hooks", "resprobe"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    for method in ("hooks", "resprobe"):
        assert res[method]["ref_error"] < 1e-6 and res[method]["ref_blocks"] == 2 * 27

    # hooks that keep each block's *input* gradient (the previous block's output's): caught
    def shifted(net, blocks, outs, grads):
        def hook(m, a, o, n):
            outs[n] = o.detach()
            a[0].register_hook(lambda g: grads.__setitem__(n, g))

        return [
            compare._module(net, b).register_forward_hook(lambda m, a, o, n=b: hook(m, a, o, n))
            for b in blocks
        ]

    monkeypatch.setattr(compare, "_grad_hooks", shifted)
    compare.worker("zoo", "grads", ["hooks"], 1, 0, str(out), "default")
    assert json.loads(out.read_text())["hooks"]["ref_error"] > 0.1


def test_the_vit_reference_is_its_blocks_in_order(tmp_path, monkeypatch):
    """timm's ViT: the tokens fed to the first block are forward_features' own (its blocks'
    last output through the model's norm and head gives the model's logits, bit for bit), and
    hooks that keep each block's input instead of its output fail the row."""
    pytest.importorskip("timm")
    net, blocks, x, _ = compare.build("vit")
    ref = compare.reference_outputs("vit")
    assert len(ref) == len(blocks) == 12
    with torch.no_grad():
        assert torch.equal(net.forward_head(net.norm(ref[-1])), net(x))
    out = tmp_path / "r.json"
    compare.worker("vit", "out", ["hooks"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())["hooks"]
    assert res["ref_error"] == 0 and res["ref_blocks"] == 12

    def inputs(net, blocks, store, **_):
        return [
            compare._module(net, b).register_forward_hook(
                lambda m, a, o, n=b: store.append((n, a[0].detach()))
            )
            for b in blocks
        ]

    monkeypatch.setattr(compare, "_hooks", inputs)
    compare.worker("vit", "out", ["hooks"], 1, 0, str(out), "default")
    assert json.loads(out.read_text())["hooks"]["ref_error"] > 0.1
