import shutil
import subprocess

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_isolated_data_root(tmp_path, monkeypatch):
    """Seed torch, and point the default data root at a temporary folder so no test writes to ./data."""
    torch.manual_seed(0)
    monkeypatch.setenv("RESPROBE_DATA", str(tmp_path / "data"))
    yield


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def _statistics_reference(raw):
    """ResidualNorms' and ChannelStats' quantities of one block in numpy float64, from the
    block's X, F, S, Y ({name: tensor [N, ...]}, as RawSites records them at the call); the
    channel moments for [N, C, H, W] maps only."""
    X, F, S, Y = (raw[k].double().numpy() for k in "XFSY")
    flat = {k: v.reshape(len(v), -1) for k, v in zip("XFSY", (X, F, S, Y))}
    norm = {k: np.linalg.norm(v, axis=1) for k, v in flat.items()}
    ref = {
        "x_norm": norm["X"],
        "f_norm": norm["F"],
        "s_norm": norm["S"],
        "y_norm": norm["Y"],
        "dev_norm": np.linalg.norm(flat["Y"] - flat["S"], axis=1),
        "cos_ys": (flat["Y"] * flat["S"]).sum(1) / norm["Y"] / norm["S"],
        "cos_fs": (flat["F"] * flat["S"]).sum(1) / norm["F"] / norm["S"],
    }
    if Y.ndim == 4:
        for prefix, t in (("", Y), ("f_", F)):
            per_channel = t.reshape(*t.shape[:2], -1)
            ref[f"{prefix}channel_mean"] = per_channel.mean(2)
            ref[f"{prefix}channel_var"] = per_channel.var(2)
    return ref


def _block_reference(f, s, y, axis: int) -> dict[str, np.ndarray]:
    """What the one-read kernels give for a block, in numpy float64, from its F, S and y (numpy
    arrays or tensors of one shape, channel axis ``axis``): ||F||, ||S||, ||y||, ||y - S||,
    cos(y, S), cos(F, S) per sample, and the channel mean and population variance of y and F."""
    f, s, y = (
        np.asarray(a.double().cpu() if torch.is_tensor(a) else a, np.float64) for a in (f, s, y)
    )
    flat = {k: a.reshape(len(a), -1) for k, a in zip("fsy", (f, s, y))}
    norm = {k: np.linalg.norm(a, axis=1) for k, a in flat.items()}
    out = {
        "f_norm": norm["f"],
        "s_norm": norm["s"],
        "y_norm": norm["y"],
        "dev_norm": np.linalg.norm(flat["y"] - flat["s"], axis=1),
        "cos_ys": (flat["y"] * flat["s"]).sum(1) / (norm["y"] * norm["s"]),
        "cos_fs": (flat["f"] * flat["s"]).sum(1) / (norm["f"] * norm["s"]),
    }
    for prefix, a in (("", y), ("f_", f)):
        rows = np.moveaxis(a, axis, 1).reshape(a.shape[0], a.shape[axis], -1)
        out[f"{prefix}channel_mean"] = rows.mean(2)
        out[f"{prefix}channel_var"] = rows.var(2)
    return out


@pytest.fixture
def block_reference():
    """``ref(f, s, y, axis)``: the one-read kernels' quantities in numpy float64 (see
    _block_reference)."""
    return _block_reference


@pytest.fixture
def statistics_reference():
    """``ref(raw)``: a block's statistics in numpy float64 (see _statistics_reference)."""
    return _statistics_reference


def _small_net(name: str) -> torch.nn.Module:
    """Zoo ``name`` for 1x8x8 inputs at width 4, seeded: the same weights at every call."""
    import probe

    torch.manual_seed(0)
    return probe.zoo.create(name, in_channels=1, width=4).eval()


@pytest.fixture
def small_net():
    """``make(name)``: a seeded zoo net for 1x8x8 inputs (see _small_net)."""
    return _small_net


@pytest.fixture
def two_batches():
    """Two seeded batches of 1x8x8 inputs and labels, of 5 and 3 samples (calls of two sizes)."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        for n in (5, 3)
    ]


def _check_gradient_statistics(cap, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """GradNorms' ``grad_x_norm`` and ``cos_f_grad`` in capture ``cap`` (with RawSites' F) of
    _small_net(``name``) on one batch against autograd's dL/dx of the same net in float64; the
    cosine of every block whose F has x's shape (7 of a resnet20's 9)."""
    net64 = _small_net(name).double()
    blocks = [layer for layer in cap.layers if "F" in cap.quantities(layer)]
    inputs = {}
    hooks = [
        net64.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: inputs.__setitem__(n, a[0])
        )
        for n in blocks
    ]
    loss = torch.nn.functional.cross_entropy(net64(x.double()), y, reduction="sum")
    for h in hooks:
        h.remove()
    grads = dict(zip(blocks, torch.autograd.grad(loss, [inputs[n] for n in blocks])))
    checked = 0
    for name in blocks:
        g = grads[name].flatten(1)
        np.testing.assert_allclose(
            cap.read(name, "grad_x_norm"), g.norm(dim=1).numpy(), rtol=1e-5, err_msg=name
        )
        if "cos_f_grad" in cap.quantities(name):
            f = torch.from_numpy(cap.read(name, "F")).double().flatten(1)
            want = (f * g).sum(1) / (f.norm(dim=1) * g.norm(dim=1))
            np.testing.assert_allclose(
                cap.read(name, "cos_f_grad"), want.numpy(), rtol=1e-4, atol=1e-6, err_msg=name
            )
            checked += 1
    assert checked == 7  # the nine blocks but the two that downsample


@pytest.fixture
def gradient_statistics_check():
    """``check(cap, net_name, x, y)``: see _check_gradient_statistics."""
    return _check_gradient_statistics


STRACE = shutil.which("strace")


@pytest.fixture
def run_killed():
    """``run(cmd, calls, when=None)``: run ``cmd``; with ``when=N``, under strace so that the N-th
    of the system calls ``calls`` (comma-separated) kills the process with SIGKILL."""
    if STRACE is None:
        pytest.skip("needs strace")

    def run(cmd, calls, when=None):
        if when is not None:
            cmd = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={calls}",
                   "-e", f"inject={calls}:signal=KILL:when={when}", *cmd]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    return run
