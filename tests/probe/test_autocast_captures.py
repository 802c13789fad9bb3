"""Every registered probe captures inside the user's autocast. Before, fp16 results failed the
session's own bookkeeping (CPU autocast refuses fp16 in cat), and the functorch-based probes
failed in a convolution (tests/probe/jacobian/test_autocast.py pins their numbers)."""

import warnings

import numpy as np
import pytest
import torch

import probe
from probe.probes.registry import PROBES, make_probe


def _model():
    torch.manual_seed(0)
    return probe.zoo.create("resnet8", in_channels=1, width=4).eval()


def _specs():
    import probe.jacobian.probes  # noqa: F401 -- the probes defined beside the engine register
    import probe.probes.params  # noqa: F401 -- on import

    names = sorted(PROBES)
    return names + [f"{n}:dtype=fp16" for n in ("activations", "gradients") if n in PROBES]


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spec", _specs())
def test_every_probe_captures_under_autocast(spec, autocast):
    model = _model()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused/stat warnings are not what is tested here
        with torch.autocast("cpu", dtype=autocast):
            cap = probe.capture(model, [(x, y)], probes=[make_probe(spec)])
    assert cap.layers
    for layer in cap.layers:
        for q in cap.quantities(layer):
            assert len(cap.read(layer, q)) == 4, (layer, q)


def test_fp16_activations_under_autocast_are_the_block_outputs_of_that_pass():
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    seen = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [
        b.register_forward_hook(lambda m, a, o: seen.__setitem__(names[m], o.detach().clone()))
        for b in model.blocks()
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = probe.capture(model, [x], probes=[probe.Activations(dtype="fp16")])
    for layer, out in seen.items():
        np.testing.assert_array_equal(cap.read(layer, "output"), out.half().float().numpy())
