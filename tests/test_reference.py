"""Measures against an independent re-implementation.

The zoo net is rebuilt here from its state dict with plain functional ops (``F.conv2d``,
``F.batch_norm``) in float64, with its own gradient bookkeeping (``retain_grad``), and compared
with what the public API reports: per-sample gradients, the iterative-refinement cosine, lesions,
float64 captures, train-mode captures, joined shards, Jacobian gains on non-square blocks, the
shattered-gradient lines, axis labels and interval coverage. Every case has non-zero quantities.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import analyses
import probe
from analyses.lesions import deleted
from probe.errors import ProbeError
from probe.jacobian import JacobianNorms, ShatteredGradients, hutchinson
from probe.jacobian.estimators import exact_jacobian, lanczos_spectrum
from probe.jacobian.shattered import line_gradients
from probe.probes.params import ParamGradNorms

# -- the independent forward pass ---------------------------------------------------------------


def _bn(h, sd, prefix):
    return F.batch_norm(
        h,
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd[f"{prefix}.weight"],
        sd[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def _shortcut(h, sd, cfg, name, stride, c_out):
    c_in = h.shape[1]
    if stride == 1 and c_in == c_out:
        return h
    if cfg.shortcut == "A":
        h = h[:, :, ::stride, ::stride]
        extra = c_out - c_in
        return F.pad(h, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return _bn(
        F.conv2d(h, sd[f"{name}.shortcut.conv.weight"], stride=stride), sd, f"{name}.shortcut.bn"
    )


def reference_forward(model, x, delete=(), keep=None):
    """Logits of a post-activation zoo net, recomputed in float64 from its state dict.

    ``delete``: block names whose branch is removed, y = relu(lambda * S(x)).
    ``keep``: a dict that receives, per block, x, F(x), S(x) and y (with ``retain_grad``).
    """
    cfg = model.config
    assert not cfg.preact
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    h = F.relu(_bn(F.conv2d(x, sd["stem.conv.weight"], padding=1), sd, "stem.bn"))
    for s in range(3):
        for b in range(cfg.blocks_per_stage):
            name, stride = f"stages.{s}.{b}", (2 if s > 0 and b == 0 else 1)
            c_out = cfg.width * 2**s
            f = F.conv2d(h, sd[f"{name}.branch.conv1.weight"], stride=stride, padding=1)
            f = F.relu(_bn(f, sd, f"{name}.branch.bn1"))
            f = _bn(
                F.conv2d(f, sd[f"{name}.branch.conv2.weight"], padding=1), sd, f"{name}.branch.bn2"
            )
            short = _shortcut(h, sd, cfg, name, stride, c_out)
            if name in delete:
                y = F.relu(cfg.shortcut_scale * short)
            elif cfg.residual:
                y = F.relu(cfg.shortcut_scale * short + f)
            else:
                y = F.relu(f)
            if keep is not None:
                for t in (h, f, y):
                    if t.requires_grad:
                        t.retain_grad()
                keep[name] = {"x": h, "f": f, "s": short, "y": y}
            h = y
    return F.linear(h.mean((2, 3)), sd["head.fc.weight"], sd["head.fc.bias"])


def _randomised_bn(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so no branch or shortcut is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
    return model.eval()


def _net(name="resnet8", seed=0, **kw):
    torch.manual_seed(seed)
    return _randomised_bn(probe.zoo.create(name, in_channels=1, width=4, **kw), seed)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


# -- 1. per-sample gradients of confidently classified samples -----------------------------------


def _confident_net(n=48):
    """A net whose samples spread over 1 - p_y = 1e-13 ... 0.5 (labels = its predictions)."""
    model, (x, _) = _net(), _data(n)
    with torch.no_grad():
        top = model(x).sort(1).values
        scale = 10.0 / float((top[:, -1] - top[:, -2]).median())
        model.head.fc.weight *= scale
        model.head.fc.bias *= scale
        y = model(x).argmax(1)
        # float64 F.cross_entropy itself cancels below 1 - p_y ~ 1e-10: compare only where the
        # reference is exact to ~1e-6.
        q = 1 - reference_forward(model, x.double()).softmax(1).gather(1, y[:, None])[:, 0]
    exact = q > 1e-10
    assert int(((q < 1e-5) & exact).sum()) >= 8, "the case must hold confident samples"
    return model, x, y, exact.numpy()


def test_gradient_norms_are_exact_for_confidently_classified_samples():
    model, x, y, exact = _confident_net()
    xd = x.double().requires_grad_(True)
    keep = {}
    loss = F.cross_entropy(reference_forward(model, xd, keep=keep), y, reduction="sum")
    loss.backward()
    cap = probe.capture(model, [(x, y)], probes=[probe.GradNorms()])
    worst = {}
    for name, t in keep.items():
        ref_y = t["y"].grad.flatten(1).norm(dim=1).numpy()
        ref_x = t["x"].grad.flatten(1).norm(dim=1).numpy()
        assert np.all(ref_y > 0)
        worst[name] = max(
            _rel(cap.read(name, "grad_y_norm"), ref_y)[exact].max(),
            _rel(cap.read(name, "grad_x_norm"), ref_x)[exact].max(),
        )
    assert max(worst.values()) < 1e-3, f"max relative error per block: {worst}"


def test_per_sample_parameter_gradients_are_exact_for_confident_samples():
    model, x, y, exact = _confident_net()
    cap = probe.capture(model, [(x, y)], probes=[ParamGradNorms(max_samples=None)])
    ref = model.double()
    errs = []
    for n in np.flatnonzero(exact):
        ref.zero_grad()
        F.cross_entropy(ref(x[n : n + 1].double()), y[n : n + 1]).backward()
        for k, p in ref.named_parameters():
            errs.append(_rel(cap.read("model", f"grad_norm.{k}")[n], float(p.grad.norm())))
    assert max(errs) < 1e-3, f"max relative error {max(errs):.3g}"


# -- 2. a train-mode capture leaves the model unchanged -----------------------------------------


def test_train_mode_capture_restores_batchnorm_running_statistics():
    model, (x, y) = _net(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(x)
    probe.capture(model, [(x, y)], probes=[probe.ResidualNorms(), probe.GradNorms()], mode="train")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"buffers changed by the capture: {changed[:5]}"
    assert torch.equal(model(x), logits) and not model.training


def test_train_mode_capture_restores_buffers_on_error():
    model, (x, y) = _net(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield x, y
        raise RuntimeError("data failed")

    with pytest.raises(RuntimeError, match="data failed"):
        probe.capture(model, batches(), probes=[probe.ResidualNorms()], mode="train")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- 3. joined shards keep the capture-wide sample cap -------------------------------------------


def test_joined_shards_keep_the_first_samples_of_a_capped_probe(tmp_path):
    model, (x, y) = _net(), _data(10)
    probes = [
        probe.Activations(dtype="fp32", max_samples=5),
        JacobianNorms(n_probes=4, max_samples=8),
    ]
    paths, start = [], 0
    for rank, idx in enumerate((torch.arange(0, 6), torch.arange(6, 10))):
        path = tmp_path / f"rank{rank}.h5"
        probe.capture(
            model,
            [(x[idx], y[idx], idx)],
            probes=probes,
            out=path,
            shard=(rank, 2),
            sample_offset=start,
        ).close()
        paths.append(path)
        start += len(idx)
    probe.join_shards(paths, tmp_path / "index.h5")
    whole = probe.capture(model, [(x, y)], probes=probes)
    with torch.no_grad():  # the block output of samples 0-4, computed without any hook
        direct = model.stages[0][0](model.stem(x[:5])).numpy()
    with probe.open(tmp_path / "index.h5") as cap:
        out = cap.read("stages.0.0", "output")
        assert out.shape[0] == 5 and np.allclose(out, direct, atol=1e-6)
        assert cap.dim_labels("stages.0.0", "output") == ("sample", "channel", "height", "width")
        assert np.array_equal(
            cap.read("stages.1.0", "jac_fro2"), whole.read("stages.1.0", "jac_fro2")
        )


def test_shards_captured_without_their_offset_are_refused_when_probes_cap_samples(tmp_path):
    model, (x, y) = _net(), _data(10)
    paths = []
    for rank, idx in enumerate((torch.arange(0, 6), torch.arange(6, 10))):
        path = tmp_path / f"rank{rank}.h5"
        probe.capture(
            model,
            [(x[idx], y[idx], idx)],
            probes=[probe.Activations(max_samples=5)],
            out=path,
            shard=(rank, 2),
        ).close()
        paths.append(path)
    with pytest.raises(ProbeError, match="sample_offset=6"):
        probe.join_shards(paths, tmp_path / "index.h5")
    assert not (tmp_path / "index.h5").exists()


# -- 4. float64 models --------------------------------------------------------------------------


def test_float64_model_statistics_match_a_float64_reference():
    model, (x, y) = _net(), _data(6)
    model = model.double()
    xd = x.double()
    keep = {}
    reference_forward(model, xd, keep=keep)
    probes = [
        probe.ResidualNorms(),
        probe.ChannelStats(),
        probe.GradNorms(),
        JacobianNorms(n_probes=2),
    ]
    cap = probe.capture(model, [(xd, y)], probes=probes)
    for name, t in keep.items():
        ref = {
            "f_norm": t["f"].flatten(1).norm(dim=1),
            "s_norm": t["s"].flatten(1).norm(dim=1),
            "dev_norm": (t["y"] - t["s"]).flatten(1).norm(dim=1),
            "cos_fs": F.cosine_similarity(t["f"].flatten(1), t["s"].flatten(1), dim=1),
        }
        for q, r in ref.items():
            got = cap.read(name, q)
            assert got.dtype == np.float64, (name, q, got.dtype)
            assert np.allclose(got, r.detach().numpy(), rtol=1e-10, atol=1e-12), (name, q)
        var = t["y"].detach().flatten(2).var(2, unbiased=False).numpy()
        assert np.allclose(cap.read(name, "channel_var"), var, rtol=1e-10, atol=1e-14)


# -- 5. lesions of option-B and lambda-scaled blocks ---------------------------------------------


@pytest.mark.parametrize(
    "name,kw",
    [
        ("resnet8", {"shortcut": "B"}),
        ("resnet8", {"shortcut_scale": 0.5}),
        ("resnet8", {"shortcut": "B", "shortcut_scale": 0.5}),
        ("plain8", {"shortcut": "B"}),
    ],
)
@pytest.mark.parametrize("block", ["stages.0.0", "stages.1.0"])
def test_deleting_a_block_drops_only_its_branch(name, kw, block):
    model, (x, _) = _net(name, **kw), _data(8)
    ref = reference_forward(model, x.double(), delete={block})
    intact = reference_forward(model, x.double())
    assert float((ref - intact).abs().max()) > 1e-3, "the lesion must change the logits"
    with torch.no_grad(), deleted(model, [block]):
        got = model(x).double()
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, f"lesion logits off by {err:.3g} of their max"


# -- 6. the iterative-refinement cosine uses dL/dx ---------------------------------------------


def test_cos_f_grad_is_the_cosine_with_the_gradient_at_the_block_input():
    model, (x, y) = _net(), _data(16)
    xd = x.double().requires_grad_(True)
    keep = {}
    F.cross_entropy(reference_forward(model, xd, keep=keep), y, reduction="sum").backward()
    cap = probe.capture(model, [(x, y)], probes=[probe.GradNorms()])
    for name, t in keep.items():
        if t["f"].shape != t["x"].shape:  # downsampling block: F and x differ in shape
            assert not cap.has(name, "cos_f_grad"), name
            continue
        ref = F.cosine_similarity(t["f"].flatten(1), t["x"].grad.flatten(1), dim=1).detach()
        assert float(ref.abs().mean()) > 1e-3
        err = np.abs(cap.read(name, "cos_f_grad") - ref.numpy()).max()
        assert err < 1e-4, f"{name}: cos_f_grad off by up to {err:.3g}"


# -- 7. the mean squared singular value of a downsampling block ----------------------------------


def test_jac_msv_of_a_downsampling_block_averages_its_nonzero_singular_values():
    model, (x, y) = _net(), _data(3)
    model = model.double()
    xd = x.double()
    cap = probe.capture(
        model, [(xd, y)], probes=[probe.ResidualNorms(), JacobianNorms(n_probes=256)]
    )
    table = analyses.signal_propagation(cap)
    with torch.no_grad():
        h = model.stages[0](model.stem(xd))
    block = model.stages[1][0]
    J = exact_jacobian(block, h).detach()  # [N, 2C*H/2*W/2, C*H*W]: half as many rows as columns
    assert J.shape[1] * 2 == J.shape[2]
    exact = float((torch.linalg.svdvals(J) ** 2).mean(1).mean())
    se = float(np.sqrt((cap.read("stages.1.0", "jac_fro2_se") ** 2).sum())) / 3 / J.shape[1]
    got = float(table.query("layer == 'stages.1.0' and quantity == 'jac_msv'")["value"].iloc[0])
    assert abs(got - exact) <= 4 * se, f"jac_msv {got:.4g}, exact {exact:.4g} (se {se:.2g})"


# -- 8. direction=next does not depend on where batches end --------------------------------------


def _next_line_cos_lag(model, x, n, n_points, max_lag):
    """R(Delta) of sample n's line towards sample n + 1, computed directly in float64."""
    model = model.double()
    xd = x.double()
    ts = torch.linspace(0.0, 1.0, n_points, dtype=torch.float64)
    target = int(model(xd[n : n + 1]).argmax(1))
    g = line_gradients(model, xd[n], xd[n + 1] - xd[n], ts, target).flatten(1).numpy()
    c = g - g.mean(0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return np.array([(c[: n_points - k] * c[k:]).sum(1).mean() for k in range(max_lag)])


def test_next_sample_lines_do_not_depend_on_the_batch_size():
    model, (x, y) = _net(), _data(12)
    p = ShatteredGradients(n_points=16, max_lag=4, direction="next", max_samples=12)
    runs = {
        b: probe.capture(model, [(x[i : i + b], y[i : i + b]) for i in range(0, 12, b)], probes=[p])
        for b in (12, 4, 5)
    }
    ref = _next_line_cos_lag(model, x, 3, 16, 4)  # sample 3 ends the first batch of 4
    for b, cap in runs.items():
        err = np.abs(cap.read("model", "cos_lag")[3] - ref).max()
        assert err < 1e-4, f"batch size {b}: cos_lag off by up to {err:.3g}"


def test_next_sample_line_without_the_following_sample_is_refused():
    model, (x, y) = _net(), _data(4)
    p = ShatteredGradients(n_points=8, max_lag=2, direction="next", max_samples=4)
    with probe.HookSession(model, probes=[p]) as s, pytest.raises(ProbeError, match="next_input"):
        s.run_batch(x, y)


# -- 9. axis labels, interval coverage, Lanczos bias ----------------------------------------------


def test_raw_tensors_are_stored_with_their_axis_names(tmp_path):
    model, (x, y) = _net(), _data(4)
    probe.capture(
        model, [(x, y)], probes=[probe.Activations(), probe.Gradients()], out=tmp_path / "a.h5"
    ).close()
    with h5py.File(tmp_path / "a.h5") as f:
        for q in ("output", "grad_output"):
            labels = [d.label for d in f[f"layers/stages.0.0/{q}"].dims]
            assert labels == ["sample", "channel", "height", "width"], (q, labels)


def test_token_and_channels_last_layouts_label_and_stride_the_right_axes():
    block = torch.nn.Identity()
    t = torch.arange(2 * 6 * 4 * 8, dtype=torch.float32).reshape(2, 6, 4, 8)  # [N, H, W, C]
    call = probe.Call("l", block, None, t, 0)
    a = probe.Activations(dtype="fp32", layout="NHWC", channel_stride=2)
    assert torch.equal(a.forward(call)["output"], t[..., ::2])
    assert a.dim_labels("output", t) == ("sample", "height", "width", "channel")
    tokens = torch.randn(2, 5, 8)
    assert probe.Activations().dim_labels("output", tokens) == ("sample", "token", "channel")
    with pytest.raises(ProbeError, match="layout"):
        probe.Activations(layout="NXY")


def test_t_interval_covers_the_true_frobenius_norm_at_its_nominal_rate():
    from scipy import stats

    from probe.jacobian import hutchinson_interval

    torch.manual_seed(1)
    w = torch.randn(6, 6, dtype=torch.float64)
    w = w + 3 * torch.diag(
        torch.rand(6, dtype=torch.float64)
    )  # uneven diagonal: non-trivial variance
    truth = float((w**2).sum())
    x = torch.zeros(6000, 6, dtype=torch.float64)  # 6000 independent estimates of one J = W
    r = hutchinson(lambda z: z @ w.T, x, n_probes=16, gen=torch.Generator().manual_seed(0))
    lo, hi = hutchinson_interval(r.fro2, r.fro2_se, 16)
    t_cover = float(((lo <= truth) & (truth <= hi)).double().mean())
    z = stats.norm.ppf(0.975)
    z_cover = float(
        ((r.fro2 - z * r.fro2_se <= truth) & (truth <= r.fro2 + z * r.fro2_se)).double().mean()
    )
    assert z_cover < t_cover, (z_cover, t_cover)
    assert 0.935 <= t_cover <= 0.97, t_cover


def test_lanczos_largest_node_approaches_sigma_max_squared_from_below():
    model, (x, _) = _net(), _data(2)
    model = model.double()
    with torch.no_grad():
        h = model.stem(x.double())
    block = model.stages[0][0]
    exact = torch.linalg.svdvals(exact_jacobian(block, h))[:, 0] ** 2
    gen = torch.Generator().manual_seed(0)
    nodes10, _ = lanczos_spectrum(block, h, steps=10, n_vectors=1, gen=gen)
    nodes60, _ = lanczos_spectrum(block, h, steps=60, n_vectors=1, gen=gen)
    top10, top60 = nodes10.max(1).values, nodes60.max(1).values
    assert torch.all(top10 <= exact * (1 + 1e-9)) and torch.all(top10 < top60 * (1 + 1e-9))
    assert torch.allclose(top60, exact, rtol=1e-3), (top60, exact)
