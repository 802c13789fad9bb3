"""Models that take token ids (an integer input, which takes no gradient): gradient probes
differentiate for the hooked tensors instead, with the numbers of a hand-written backward."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probe
from probe.errors import ProbeError


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        )

    def forward(self, x):
        return x + self.mlp(x)


class TokenNet(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d), Block(d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))


def _loss(out, y):  # a sum of per-sample losses, as gradient probes require
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def test_gradient_norms_of_a_token_model_equal_a_hand_backward():
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids, targets = torch.randint(0, 20, (5, 7)), torch.randint(0, 20, (5, 7))
    cap = probe.capture(model, [(ids, targets)], probes=[probe.GradNorms()], loss_fn=_loss)
    assert cap.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(p.grad is None for p in model.parameters())  # weights' .grad untouched
    xs, ys = [], []
    h = model.emb(ids)
    for block in model.blocks:
        h.retain_grad()
        xs.append(h)
        h = block(h)
        h.retain_grad()
        ys.append(h)
    _loss(model.head(h), targets).backward()
    norm = lambda t: t.grad.flatten(1).norm(dim=1).numpy()  # noqa: E731
    for key, x, y in zip(cap.layers, xs, ys):
        np.testing.assert_allclose(cap.read(key, "grad_y_norm"), norm(y), rtol=1e-5)
        np.testing.assert_allclose(cap.read(key, "grad_x_norm"), norm(x), rtol=1e-5)


def test_a_token_model_with_every_parameter_frozen_is_a_clear_error():
    model = TokenNet().eval().requires_grad_(False)
    ids = torch.randint(0, 20, (2, 3))
    with pytest.raises(ProbeError, match=r"input is torch.int64(?s:.*)frozen"):
        probe.capture(model, [(ids, ids)], probes=[probe.GradNorms()], loss_fn=_loss)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sequence_logits_need_a_loss_of_the_caller_s():
    model = TokenNet().eval()
    ids = torch.randint(0, 20, (2, 3))
    with pytest.raises(ProbeError, match=r"logits \(2, 3, 20\) and labels \(2, 3\)(?s:.*)loss_fn"):
        probe.capture(model, [(ids, ids)], probes=[probe.GradNorms()])


def test_per_sample_parameter_gradients_are_of_the_capture_s_loss():
    """param_grads read the loss the capture was given (here a sequence loss over token ids);
    before, they took cross-entropy of their own, failing on sequences and giving another
    loss's gradients on classifiers."""
    torch.manual_seed(0)
    model = TokenNet().eval()
    ids, targets = torch.randint(0, 20, (3, 4)), torch.randint(0, 20, (3, 4))
    cap = probe.capture(model, [(ids, targets)], probes=[probe.ParamGradNorms()], loss_fn=_loss)
    for n in range(3):
        model.zero_grad()
        _loss(model(ids[n : n + 1]), targets[n : n + 1]).backward()
        for name, p in model.named_parameters():
            got = cap.read("model", f"grad_norm.{name}")[n]
            assert got == pytest.approx(float(p.grad.norm()), rel=1e-5), (n, name)


def test_per_sample_parameter_gradients_of_a_classifier_follow_a_given_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])

    def smoothed(out, labels):  # label smoothing: not the default cross-entropy's gradient
        return F.cross_entropy(out, labels, label_smoothing=0.3, reduction="sum")

    cap = probe.capture(
        model, [(x, y)], layers="0", probes=[probe.ParamGradNorms()], loss_fn=smoothed
    )
    for n in range(4):
        model.zero_grad()
        smoothed(model(x[n : n + 1]), y[n : n + 1]).backward()
        got = cap.read("model", "grad_norm.2.weight")[n]
        assert got == pytest.approx(float(model[2].weight.grad.norm()), rel=1e-5)


def test_shattered_gradients_refuse_token_ids():
    model = TokenNet().eval()
    ids = torch.randint(0, 20, (2, 3))
    with pytest.raises(ProbeError, match=r"'shattered'(?s:.*)torch.int64"):
        probe.capture(model, [(ids, ids)], probes=[probe.make_probe("shattered")], loss_fn=_loss)
