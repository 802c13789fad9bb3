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


def test_a_target_is_met_missed_or_within_the_noise_by_the_whole_interval():
    assert compare.judge((1.02, 1.05), 1.05) == "met"  # at the bound counts as met
    assert compare.judge((1.051, 1.08), 1.05) == "missed"
    assert compare.judge((1.04, 1.06), 1.05) == "within the noise"


def test_each_rows_verdicts_come_from_resprobes_interval_and_its_peers_in_the_run():
    res = {"paired": 1.0}
    assert compare.targets("io", {"resprobe": res}) == {}  # no interval: no verdict
    assert compare.targets("grads", {"resprobe": {**res, "paired_ci": [1.0, 1.1]}}) == {}
    got = compare.targets("stats", {"resprobe": {"paired_ci": [1.12, 1.16]}})
    assert got == {"<= 1.15": "within the noise"}
    # a dump's bound follows the raw write of the same run: 1.10 x max(forward, raw write)
    fast_disk = {"resprobe": {"paired_ci": [1.3, 1.4]}, "raw_write": {"paired": 0.4}}
    assert list(compare.targets("stream", fast_disk).values()) == ["missed"]
    slow_disk = {"resprobe": {"paired_ci": [1.3, 1.4]}, "raw_write": {"paired": 1.5}}
    ((target, verdict),) = compare.targets("stream", slow_disk).items()
    assert "= 1.65" in target and verdict == "met"
    assert compare.targets("disk", {"resprobe": {"paired_ci": [1.3, 1.4]}}) == {}
    # block outputs: the absolute bound, and nnsight's interval of the same run
    out = {"resprobe": {"paired_ci": [1.02, 1.04]}, "nnsight": {"paired_ci": [1.045, 1.06]}}
    assert compare.targets("out", out) == {"<= 1.05": "met", "<= nnsight": "met"}
    out["nnsight"]["paired_ci"] = [1.0, 1.03]
    assert compare.targets("out", out)["<= nnsight"] == "within the noise"
    out["nnsight"]["paired_ci"] = [1.0, 1.01]
    assert compare.targets("out", out)["<= nnsight"] == "missed"


def test_a_worker_gives_each_methods_paired_ratio_with_its_interval(tmp_path):
    out = tmp_path / "r.json"
    compare.worker("zoo", "stats", ["resprobe"], 3, 0, str(out), "default")
    r = json.loads(out.read_text())["resprobe"]
    lo, hi = r["paired_ci"]
    assert len(r["times"]) == 3 and lo <= r["paired"] <= hi and r["ref_error"] < 1e-3


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


def test_the_statistics_reference_is_the_split_by_hand_in_float64():
    """reference_statistics against numpy on the split: norms, resprobe's per-sample channel
    moments (population) and the hooks' batch-wide ones (unbiased); dL/dy of the summed loss."""
    ref = compare.reference_statistics("zoo")
    sites, logits = compare.split_by_hand("zoo")
    assert len({k.split("/")[0] for k in ref}) == len(sites) == 27
    name, x, f, y = sites[5]
    assert f.abs().max() > 0
    Y = y.detach().double().numpy()
    np.testing.assert_allclose(ref[f"{name}/y_norm"], np.linalg.norm(Y.reshape(len(Y), -1), axis=1))
    np.testing.assert_allclose(ref[f"{name}/channel_var"], Y.reshape(*Y.shape[:2], -1).var(2))
    per_channel = Y.transpose(1, 0, 2, 3).reshape(Y.shape[1], -1)
    np.testing.assert_allclose(ref[f"{name}/batch_var"], per_channel.var(1, ddof=1))
    (g,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, compare.build("zoo")[3], reduction="sum"), [y]
    )
    np.testing.assert_allclose(ref[f"{name}/grad_y_norm"], g.flatten(1).double().norm(dim=1))
    torch.testing.assert_close(ref[f"{name}/grad_y_norm_mean"], ref[f"{name}/grad_y_norm"] / len(y))


def test_the_statistics_rows_pass_right_numbers_and_fail_a_wrong_branch(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    compare.worker("zoo", "grad", ["hooks", "resprobe"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    for method in ("hooks", "resprobe"):  # 27 sites x (5 forward + 1 gradient) quantities
        assert res[method]["ref_blocks"] == 27 * 6
        assert res[method]["ref_error"] < 1e-5, (method, res[method]["ref_error"])
        assert compare._check(res[method]).startswith("ok")
    original = compare._branch_of

    def wrong(model, block):  # ||F|| taken of act's output, y
        return block.act if isinstance(block.act, torch.nn.ReLU) else original(model, block)

    monkeypatch.setattr(compare, "_branch_of", wrong)
    compare.worker("zoo", "stats", ["hooks"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())["hooks"]
    assert res["ref_error"] > 1e-2 and compare._check(res).startswith("WRONG")


def test_a_statistics_check_counts_every_site():
    ref = {
        "a/x_norm": torch.ones(2, dtype=torch.float64),
        "b/x_norm": torch.ones(2, dtype=torch.float64),
    }
    assert compare._stats_error({"a/x_norm": torch.ones(2)}, ref) == float("inf")  # b missing
    assert compare._stats_error({**ref, "a/other": torch.ones(2)}, ref) == float("inf")
    assert compare._stats_error(ref, ref) == 0


def test_the_vit_sites_are_timm_blocks_step_by_step(tmp_path):
    """Each ViT block's two sites, called by hand, give the block's output bit for bit; the
    hand-written hooks and resprobe read those 24 sites' statistics and gradient norms, resprobe
    to float32 rounding (its norms of long rows piece by piece)."""
    pytest.importorskip("timm")
    net, blocks, x, _ = compare.build("vit")
    with torch.no_grad():
        sites, logits = compare.split_by_hand("vit")
        assert torch.equal(logits, net(x))
    assert [s[0] for s in sites[:3]] == ["blocks.0#0", "blocks.0#1", "blocks.1#0"]
    assert all(nxt[1] is prev[3] for prev, nxt in zip(sites, sites[1:]))  # y is the next x
    assert all(f.abs().max() > 0 for _, _, f, _ in sites)
    out = tmp_path / "r.json"
    compare.worker("vit", "grad", ["hooks", "resprobe"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    assert res["resprobe"]["ref_blocks"] == res["hooks"]["ref_blocks"] == 24 * 6
    assert res["resprobe"]["ref_error"] < 1e-6  # the hooks' one-pass norms: ~3e-5 here
    assert res["hooks"]["ref_error"] < compare.STATS_TOLERANCE


def test_the_vit_io_row_is_its_24_sites_split(tmp_path, monkeypatch):
    """x, F, y of each of the ViT's 24 sites, kept by hooks and by resprobe, equal the sites
    called by hand; hooks that take the first site's y after norm2 (its output) fail."""
    pytest.importorskip("timm")
    out = tmp_path / "r.json"
    compare.worker("vit", "io", ["hooks", "resprobe"], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    for method in ("hooks", "resprobe"):
        assert res[method]["ref_error"] == 0 and res[method]["ref_blocks"] == 3 * 24

    original = compare._vit_io_hooks

    def normed(block, name, store):
        def after(m, a, o):  # the y of site 0, kept at norm2's input, replaced by its output
            i = next(i for i, (key, _) in enumerate(store) if key == f"{name}#0")
            store[i] = (f"{name}#0", o)

        return original(block, name, store) + [block.norm2.register_forward_hook(after)]

    monkeypatch.setattr(compare, "_vit_io_hooks", normed)
    compare.worker("vit", "io", ["hooks"], 1, 0, str(out), "default")
    assert json.loads(out.read_text())["hooks"]["ref_error"] > 0.1


def test_the_unchecked_diagnostic_captures_the_same_tensors_and_counts_no_nan(
    tmp_path, monkeypatch
):
    """resprobe_unchecked (--versus only) is resprobe without its non-finite counts: the same
    tensors against the same reference, and a NaN sample that resprobe counts goes uncounted."""
    import probe

    out = tmp_path / "r.json"
    compare.worker("zoo", "io", ["resprobe", compare.UNCHECKED], 1, 0, str(out), "default")
    res = json.loads(out.read_text())
    assert res["resprobe"]["ref_error"] == res[compare.UNCHECKED]["ref_error"] == 0

    build, made, session = compare.build, [], probe.HookSession

    def with_nan(model):
        net, blocks, x, y = build(model)
        x[3, 0, 5, 5] = float("nan")
        return net, blocks, x, y

    monkeypatch.setattr(compare, "build", with_nan)
    monkeypatch.setattr(
        probe, "HookSession", lambda *a, **k: made.append(session(*a, **k)) or made[-1]
    )
    for method in ("resprobe", compare.UNCHECKED):
        fn, close, _ = compare.make_pass("zoo", "io", method, tmp_path)
        fn()
        close()
    counted, unchecked = (s.nonfinite for s in made)
    assert counted and set(counted.values()) == {1} and unchecked == {}


@pytest.mark.parametrize("row", ["stats", "stats_disk"])
def test_torchs_formulas_are_what_resprobe_torch_times_in_every_statistics_row(
    row, tmp_path, monkeypatch
):
    """resprobe_torch turns the one-pass kernels off for its passes, to a file as in memory;
    resprobe turns them back on (one process may time both, --versus)."""
    from probe.probes import onepass

    monkeypatch.setenv(onepass.ENV, "1")  # restored after the test: the passes set it
    seen = []
    original = onepass.mode
    monkeypatch.setattr(onepass, "mode", lambda: seen.append(original()) or seen[-1])
    for method, want in (("resprobe_torch", "torch"), ("resprobe", onepass.mode())):
        seen.clear()
        fn, close, _ = compare.make_pass("zoo", row, method, tmp_path)
        try:
            fn()
        finally:
            close()
        assert seen and set(seen) == {want}


def test_a_tree_from_before_the_kernels_is_timed_without_their_switch(monkeypatch):
    """A "before" run puts an older tree of resprobe first on PYTHONPATH: no onepass module, no
    environment switch to set."""
    assert compare._onepass_switch() == "RESPROBE_ONEPASS"
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "probe.probes.onepass" else find(name, *a),
    )
    assert compare._onepass_switch() is None


def test_the_scripts_examples_hold():
    import doctest

    assert doctest.testmod(compare).failed == 0
