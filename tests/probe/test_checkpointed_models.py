"""Models that use activation checkpointing (``torch.utils.checkpoint``, timm's
``set_grad_checkpointing``): the same numbers as without it where torch can differentiate
through it, and a clear error naming the construct where it cannot (never torch's message about
calls the user did not make)."""

import textwrap
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.checkpoint import checkpoint

import probe
from probe.cli.main import cli
from probe.errors import ProbeError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x):
        return x + self.f(x)


class Net(nn.Module):
    def __init__(self, checkpointing: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 3)
        self.checkpointing = checkpointing  # None, "reentrant" or "non_reentrant"

    def forward(self, x):
        for b in self.blocks:
            if self.checkpointing is None:
                x = b(x)
            else:
                x = checkpoint(b, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(x)


def _nets(checkpointing):
    torch.manual_seed(0)
    plain = Net().eval()
    other = Net(checkpointing).eval()
    other.load_state_dict(plain.state_dict())
    return plain, other


def _batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    return [(x, y, torch.arange(12))]


def _same(a, b):
    assert a.layers == b.layers and a.layers[:3] == ["blocks.0", "blocks.1", "blocks.2"]
    for layer in a.layers:
        ra, rb = a[layer], b[layer]
        assert sorted(ra) == sorted(rb)
        for q in ra:
            np.testing.assert_allclose(rb[q], ra[q], rtol=1e-5, atol=1e-7, err_msg=f"{layer} {q}")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("checkpointing", ["non_reentrant", "reentrant"])
def test_forward_probes_read_a_checkpointed_model_as_the_plain_one(checkpointing):
    plain, other = _nets(checkpointing)
    probes = ["residual", "channel", "jacobian:n_probes=8"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = probe.capture(other, _batches(), layers="auto", probes=probes)
    # torch's note on a reentrant checkpoint run without gradients is the only one
    said = {str(w.message) for w in seen if issubclass(w.category, UserWarning)}
    assert said <= {"None of the inputs have requires_grad=True. Gradients will be None"}
    _same(probe.capture(plain, _batches(), layers="auto", probes=probes), got)


def test_gradients_through_non_reentrant_checkpointing_are_the_plain_models():
    plain, other = _nets("non_reentrant")
    probes = ["residual", "grad", "shattered:max_samples=2,n_points=16"]
    _same(
        probe.capture(plain, _batches(), layers="auto", probes=probes),
        probe.capture(other, _batches(), layers="auto", probes=probes),
    )


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # torch's, on its run
@pytest.mark.parametrize(
    "checkpointing, probes, says",
    [
        ("reentrant", ["grad"], "Gradient probes cannot differentiate this model: it runs "
         "activation checkpointing with use_reentrant=True"),
        ("reentrant", ["shattered:max_samples=2,n_points=8"], "shattered cannot differentiate"),
        ("reentrant", ["param_grads"], "a torch.autograd.Function without setup_context"),
        ("non_reentrant", ["param_grads"], "saved-tensor hooks"),
    ],
)  # fmt: skip
def test_what_torch_cannot_differentiate_is_named_with_the_way_out(checkpointing, probes, says):
    _, other = _nets(checkpointing)
    with pytest.raises(ProbeError, match="set_grad_checkpointing") as err:
        probe.capture(other, _batches(), layers="auto", probes=probes)
    assert says in str(err.value)
    assert ".grad()" not in str(err.value)  # torch's words, about a call the user never made
    assert _hooks(other) == 0


def test_the_cli_says_so_and_writes_nothing(tmp_path):
    path = tmp_path / "cknet.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn
            from torch.utils.checkpoint import checkpoint

            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.f = nn.Linear(8, 8)
                    self.head = nn.Linear(8, 3)

                def forward(self, x):
                    x = x.flatten(1)
                    return self.head(checkpoint(lambda z: z + self.f(z), x, use_reentrant=True))
            """
        )
    )
    out = tmp_path / "c.h5"
    res = CliRunner().invoke(
        cli,
        ["capture", "--model", f"{path}:Net", "--data", "synthetic", "--input-size", "2,2,2",
         "--limit", "8", "--probe", "grad", "--layers", "f", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "use_reentrant=True" in res.output and "Traceback" not in res.output, res.output
    assert not out.exists() and not list(tmp_path.glob("c.h5*"))
