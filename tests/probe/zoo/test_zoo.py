import pytest
import torch

from probe.errors import ProbeError
from probe.zoo import BasicBlock, create, list_models

PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_he_et_al(depth):
    n = sum(p.numel() for p in create(f"resnet{depth}").parameters())
    assert round(n / 1e6, 2 if depth < 110 else 1) == PAPER_PARAMS_M[depth]


@pytest.mark.parametrize("depth", [20, 56])
def test_plain_and_residual_have_identical_names_and_counts(depth):
    res, plain = create(f"resnet{depth}"), create(f"plain{depth}")
    assert [n for n, _ in res.named_modules()] == [n for n, _ in plain.named_modules()]
    assert [(n, p.shape) for n, p in res.named_parameters()] == [
        (n, p.shape) for n, p in plain.named_parameters()
    ]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_downsampling_block_shapes(shortcut):
    block = BasicBlock(16, 32, stride=2, shortcut=shortcut).eval()
    x = torch.randn(2, 16, 8, 8)
    assert block(x).shape == (2, 32, 4, 4)
    assert block.shortcut(x).shape == (2, 32, 4, 4)
    assert block.branch(x).shape == (2, 32, 4, 4)


def test_option_a_subsamples_and_zero_pads():
    block = BasicBlock(2, 4, stride=2, shortcut="A")
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    s = block.shortcut(x)
    assert torch.equal(s[:, 1:3], x[:, :, ::2, ::2])
    assert torch.equal(s[:, 0], torch.zeros_like(s[:, 0])) and torch.equal(
        s[:, 3], torch.zeros_like(s[:, 3])
    )


def test_option_b_has_projection_parameters():
    a = sum(p.numel() for p in create("resnet20").parameters())
    b = sum(p.numel() for p in create("resnet20", shortcut="B").parameters())
    assert b > a


@pytest.mark.parametrize("stride,c_out", [(1, 8), (2, 16)])
def test_zero_initialised_branch_gives_exactly_act_of_shortcut(stride, c_out):
    block = BasicBlock(8, c_out, stride=stride).eval()
    block.zero_init_()
    x = torch.randn(3, 8, 6, 6)
    assert torch.equal(block(x), torch.relu(block.shortcut(x)))


def test_zero_initialised_preact_block_is_exactly_the_shortcut():
    block = BasicBlock(8, 8, preact=True).eval()
    block.zero_init_()
    x = torch.randn(3, 8, 6, 6)
    assert torch.equal(block(x), x)


def test_zero_init_option_makes_every_block_identity_like():
    net = create("resnet20", zero_init=True)
    assert all(float(b.branch.bn2.weight.detach().abs().sum()) == 0 for b in net.blocks())


def test_shortcut_scale_multiplies_the_shortcut():
    block = BasicBlock(4, 4, shortcut_scale=0.5).eval()
    block.zero_init_()
    x = torch.rand(2, 4, 5, 5)
    assert torch.allclose(block(x), 0.5 * x)


def test_no_inplace_modules_in_the_zoo():
    for name in ("resnet20", "preresnet20", "plain20"):
        assert not [n for n, m in create(name).named_modules() if getattr(m, "inplace", False)]


def test_preact_and_digits_configurations_run():
    assert create("preresnet32")(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert create("plain32", in_channels=1, width=8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_registry_lists_by_pattern():
    assert list_models("resnet1*") == ["resnet14", "resnet110", "resnet1202"]
    assert "preplain56" in list_models()


@pytest.mark.parametrize(
    "name,fragment",
    [("resnet65", "Did you mean"), ("resnt56", "Did you mean 'resnet56'"), ("resnet21", r"6n\+2")],
)
def test_registry_errors_are_helpful(name, fragment):
    with pytest.raises(ProbeError, match=fragment):
        create(name)


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(ProbeError, match="Did you mean 'shortcut'"):
        create("resnet20", shortcutt="B")


def test_option_fixed_by_name_is_refused():
    with pytest.raises(ProbeError, match="fixed by the name"):
        create("resnet20", residual=False)


@pytest.mark.parametrize("name", ["resnet50", "resnet152"])
def test_imagenet_names_are_not_silently_cifar_nets(name):
    with pytest.raises(ProbeError, match="torchvision.models"):
        create(name)
    assert create(name, cifar=True).config.depth == int(name[6:])
