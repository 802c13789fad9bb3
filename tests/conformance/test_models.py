"""Every torchvision classification model and the main timm families, random weights with no
constant-initialised parameter left (so no branch is zero), in eval and train mode: the residual
sites found are the true count (probe.conformance.KNOWN_SITES, read from each block's source),
act(F + S) = y, F and S equal the operands an fx-traced copy of each block adds, and no hook is
left. Skips where torchvision / timm are not installed (CI installs them for this tier)."""

import pytest

from probe.conformance import LARGE, build, catalogue, check_sites, expected_sites
from probe.errors import ProbeError

CASES = [
    pytest.param(spec, marks=pytest.mark.slow) if spec.partition(":")[2] in LARGE else spec
    for spec in catalogue()
]

if not CASES:
    pytest.skip("torchvision and timm are not installed", allow_module_level=True)

TOL = 1e-5  # float32 reruns of the same ops: exact, or the fused-attention fast path (4e-7)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("spec", CASES)
def test_sites_are_found_and_split_right(spec, mode):
    model, x = build(spec)
    true = expected_sites(model)
    if true == 0:
        with pytest.raises(ProbeError, match="No residual sites found"):
            check_sites(model, x, name=spec, mode=mode)
        return
    row = check_sites(model, x, name=spec, mode=mode)
    assert row.sites == true, row
    assert row.max_act_error < TOL, row
    assert row.hooks_left == 0
    if mode == "eval":
        assert row.fx_checked == row.sites, row.notes
        assert row.max_fs_error < TOL, row
        assert row.min_branch_ratio > 1e-3, "a zero branch would make the comparison vacuous"


@pytest.mark.parametrize(
    "spec",
    [
        s
        for s in (
            "torchvision:resnet18",
            "torchvision:vit_b_16",
            "torchvision:swin_t",
            "torchvision:mobilenet_v2",
            "timm:resnetv2_50",
            "timm:vit_tiny_patch16_224",
            "timm:convnext_atto",
        )
        if s in catalogue()
    ],
)
def test_jacobian_probe_runs_on_every_family(spec):
    model, x = build(spec)
    row = check_sites(model, x, name=spec, probes=("residual", "jacobian:n_probes=2,max_samples=1"))
    assert {"jac_fro2", "jac_dev2"} <= set(row.probes) and row.hooks_left == 0
