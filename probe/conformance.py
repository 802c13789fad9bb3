"""Does resprobe read *your* model right? Residual sites checked against an independent reading.

:func:`check_sites` captures a model's residual sites (F, S, y of every add) and compares them
with a second, independent computation: each block that holds sites is traced symbolically with
``torch.fx`` (its direct submodules kept as opaque calls), the traced graph is run on the block's
recorded input, and the operands of its adds are read from the graph -- no hooks, no
``TorchFunctionMode``. It reports, per model: sites found, the worst relative error of
act(F + S) against the block's observed output y, the worst error of F and S against the graph's
operands, the largest ||F||/||S|| (branches must be non-zero for the check to mean anything),
which probes ran, and how many hooks were left behind.

Example:
    >>> from probe.zoo import create
    >>> row = check_sites(create("resnet8", in_channels=1, width=4, num_classes=3), torch.randn(2, 1, 8, 8))
    >>> row.sites, row.hooks_left, row.max_fs_error < 1e-5
    (3, 0, True)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx, nn

from probe.probes.base import Call, Probe

__all__ = ["KNOWN_SITES", "RawSites", "SiteCheck", "check_sites", "expected_sites", "randomize_"]

# Residual adds per instance of the blocks of torchvision and the main timm families, read from
# their source (an int, or the attribute that says whether this instance adds its input). The
# conformance check compares the traced site count with this independent count.
KNOWN_SITES: dict[str, int | str] = {
    "torchvision.models.resnet.BasicBlock": 1,
    "torchvision.models.resnet.Bottleneck": 1,
    "torchvision.models.mobilenetv2.InvertedResidual": "use_res_connect",
    "torchvision.models.mobilenetv3.InvertedResidual": "use_res_connect",
    "torchvision.models.efficientnet.MBConv": "use_res_connect",
    "torchvision.models.efficientnet.FusedMBConv": "use_res_connect",
    "torchvision.models.mnasnet._InvertedResidual": "apply_residual",
    "torchvision.models.regnet.ResBottleneckBlock": 1,
    "torchvision.models.convnext.CNBlock": 1,
    "torchvision.models.vision_transformer.EncoderBlock": 2,
    "torchvision.models.swin_transformer.SwinTransformerBlock": 2,
    "torchvision.models.swin_transformer.SwinTransformerBlockV2": 2,
    "torchvision.models.maxvit.MBConv": 1,
    "torchvision.models.maxvit.PartitionAttentionLayer": 2,
    "timm.models.resnet.BasicBlock": 1,
    "timm.models.resnet.Bottleneck": 1,
    "timm.models.resnetv2.PreActBottleneck": 1,
    "timm.models.resnetv2.PreActBasic": 1,
    "timm.models.resnetv2.Bottleneck": 1,
    "timm.models.regnet.Bottleneck": 1,
    "timm.models.convnext.ConvNeXtBlock": 1,
    "timm.models.vision_transformer.Block": 2,
    "timm.models.swin_transformer.SwinTransformerBlock": 2,
    "timm.models._efficientnet_blocks.InvertedResidual": "has_skip",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": "has_skip",
    "timm.models._efficientnet_blocks.EdgeResidual": "has_skip",
    "timm.models._efficientnet_blocks.UniversalInvertedResidual": "has_skip",
}


def expected_sites(model: nn.Module) -> int | None:
    """The number of residual adds ``model`` holds by :data:`KNOWN_SITES` (None when a module
    with an additive residual of unknown class may be present -- any class not listed counts 0)."""
    total = 0
    for m in model.modules():
        rule = KNOWN_SITES.get(f"{type(m).__module__}.{type(m).__qualname__}")
        if isinstance(rule, int):
            total += rule
        elif isinstance(rule, str):
            total += int(bool(getattr(m, rule)))
    return total


_FX_ADDS = {operator.add, operator.iadd, torch.add}
_FX_METHOD_ADDS = {"add", "add_", "__add__", "__iadd__"}
_FX_SUBS = {operator.sub, operator.isub, torch.sub, torch.subtract}
_FX_METHOD_SUBS = {"sub", "sub_", "__sub__", "__isub__", "subtract", "subtract_"}


@dataclass
class RawSites(Probe):
    """The raw tensors of every residual site, ``F``, ``S``, ``Y``, ``X`` [N, ...] (for checking
    against direct computations only: nothing is reduced)."""

    name: ClassVar[str] = "_raw_sites"
    forward_grad: ClassVar[bool] = False

    def forward(self, call: Call) -> dict[str, torch.Tensor]:
        b = call.block
        if b is None:
            return {}
        return {"F": b.f, "S": b.s, "Y": b.y, "X": b.x}


@dataclass
class SiteCheck:
    """One model's conformance row."""

    model: str
    mode: str
    sites: int
    max_act_error: float  # max over sites of ||act(F + S) - y|| / ||y||
    max_fs_error: float  # max over sites of F and S against the fx graph's add operands
    min_branch_ratio: float  # smallest ||F|| / ||S|| (0 would make the check vacuous)
    fx_checked: int  # sites compared with an fx-traced reference
    probes: list[str] = field(default_factory=list)
    hooks_left: int = 0
    notes: list[str] = field(default_factory=list)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every constant-initialised parameter (zero-init last norms, layer scales of 1e-6,
    unit norm weights) and every norm's running statistics random values, so no branch is
    trivially zero and eval-mode normalisation is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 0 and bool((p == p.reshape(-1)[0]).all()):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g).to(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(
                    torch.empty(m.running_var.shape).uniform_(0.5, 2.0, generator=g)
                )
    return model


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = {id(c) for c in root.children()}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)


def _fx_operands(
    owner: nn.Module, args: tuple, kwargs: dict
) -> list[tuple[torch.Tensor, torch.Tensor, bool | None]] | None:
    """(S, F, ordered) for every same-shape tensor add in ``owner``'s own code, in execution order,
    from an fx trace of it run by the fx interpreter: S is the operand whose own path (the
    submodules only it goes through) holds fewer parameters; ``ordered`` is None when the paths
    tie. None if the module cannot be traced."""
    try:
        graph = _ChildrenAsLeaves(owner).trace(owner)
        gm = fx.GraphModule(owner, graph)
    except Exception:  # data-dependent control flow, untraceable builtins
        return None
    found: list[tuple[torch.Tensor, torch.Tensor, bool | None]] = []
    weights = {name: sum(p.numel() for p in m.parameters()) for name, m in owner.named_children()}
    ancestors: dict[fx.Node, frozenset] = {}

    def modules_above(n: fx.Node) -> frozenset:
        # The submodule calls a node's value is computed through (its ancestors in the graph).
        if n not in ancestors:
            up = frozenset().union(*(modules_above(i) for i in n.all_input_nodes))
            ancestors[n] = up | ({n.target} if n.op == "call_module" else set())
        return ancestors[n]

    def heavier_second(na: object, nb: object) -> bool | None:
        """Whether operand b's own path holds more parameters than a's (None: a tie)."""
        if not (isinstance(na, fx.Node) and isinstance(nb, fx.Node)):
            return None
        ua, ub = modules_above(na), modules_above(nb)
        wa = sum(weights.get(str(t).split(".")[0], 0) for t in ua - ub)
        wb = sum(weights.get(str(t).split(".")[0], 0) for t in ub - ua)
        return None if wa == wb else wb > wa

    class Reader(fx.Interpreter):
        def run_node(self, n: fx.Node):
            fn, method = n.op == "call_function", n.op == "call_method"
            is_sub = (fn and n.target in _FX_SUBS) or (method and n.target in _FX_METHOD_SUBS)
            is_add = (
                is_sub or (fn and n.target in _FX_ADDS) or (method and n.target in _FX_METHOD_ADDS)
            )
            if is_add and len(n.args) >= 2:
                a, b = (self.env[x] if isinstance(x, fx.Node) else x for x in n.args[:2])
                if (
                    isinstance(a, torch.Tensor)
                    and isinstance(b, torch.Tensor)
                    and a.shape == b.shape
                    and a.is_floating_point()
                ):
                    # Copies before the add runs: it, or a later op, may work in place.
                    # torch.add(a, b, alpha=k) adds k·b, torch.sub subtracts it: the operand
                    # is what is added.
                    a, b = a.clone(), (-1 if is_sub else 1) * n.kwargs.get("alpha", 1) * b
                    order = heavier_second(*n.args[:2])
                    # (S, F) by the graph's own structure; unordered when the paths tie. A
                    # subtraction is a site only as S − F (the stream is what is subtracted from).
                    if not is_sub:
                        found.append((a, b, order) if order is not False else (b, a, True))
                    elif order:
                        found.append((a, b, True))
            return super().run_node(n)

    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    try:
        bound = dict(zip(placeholders, args))
        bound.update({k: v for k, v in kwargs.items() if k in placeholders})
        with torch.no_grad():
            Reader(gm).run(*[bound[p] for p in placeholders if p in bound])
    except Exception:
        return None
    return found


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_sites(
    model: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "",
    mode: str = "eval",
    probes: Sequence[str] = ("residual",),
) -> SiteCheck:
    """Capture ``model``'s residual sites on ``x`` and check them (see the module docstring)."""
    from probe.probes.base import first_tensor
    from probe.session import HookSession

    inputs: dict[str, tuple] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for mname, m in model.named_modules():

        def pre(mod, a, k, mname=mname):
            if mname == "":  # a new forward (site discovery runs one on two samples first)
                inputs.clear()
                outputs.clear()
            inputs.setdefault(mname, (a, k))

        def post(mod, a, k, out, mname=mname):
            t = first_tensor(out)
            if t is not None:
                outputs.setdefault(mname, t.detach())

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    y_labels = torch.zeros(len(x), dtype=torch.long)
    try:
        session = HookSession(model, "auto", [RawSites(), *probes], mode=mode)
        with session:
            results, _ = session.run_batch(x, y_labels)
            infos = {i.name: i for i in session.layers}
            owners = dict(session._owners)
    finally:
        for h in handles:
            h.remove()
    hooks_left = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    row = SiteCheck(
        name or type(model).__name__,
        mode,
        0,
        0.0,
        0.0,
        float("inf"),
        0,
        sorted({q for r in results.values() for q in r if not q[0].isupper()}),
        hooks_left,
    )
    fx_cache: dict[str, list | None] = {}
    flags = {m: m.training for m in model.modules()}
    model.train(mode == "train")  # the reference runs in the mode the capture ran in
    for key, info in infos.items():
        if not info.is_block:
            continue
        r = results[key]
        F, S, Y = r["F"], r["S"], r["Y"]
        row.sites += 1
        # y as observed by an independent hook when it is the block's output.
        owner_name = next((o for o, own in owners.items() if info in own.selected.values()), None)
        observed = outputs.get(owner_name) if owner_name is not None else None
        y = (
            observed
            if observed is not None and observed.shape == Y.shape and torch.equal(observed, Y)
            else Y
        )
        err = min(_rel(F + S, y), _rel(torch.relu(F + S), y))
        row.max_act_error = max(row.max_act_error, err)
        row.min_branch_ratio = min(
            row.min_branch_ratio, float(F.norm() / S.norm().clamp_min(1e-30))
        )
        if mode != "eval" or info.kind != "site":
            continue
        if owner_name is None or owner_name not in inputs:
            continue
        if owner_name not in fx_cache:
            a, k = inputs[owner_name]
            own = owners[owner_name]
            fx_cache[owner_name] = _fx_operands(own.module, a, k)
        ops = fx_cache[owner_name]
        if ops is None:
            if f"fx could not trace {owner_name}" not in row.notes:
                row.notes.append(f"fx could not trace {owner_name}")
            continue
        if len(ops) <= info.site:
            row.notes.append(f"{key}: fx found {len(ops)} adds")
            row.max_fs_error = float("inf")
            continue
        s_ref, f_ref, ordered = ops[info.site]
        e = max(_rel(F, f_ref), _rel(S, s_ref))
        if ordered is None:
            e = min(e, max(_rel(F, s_ref), _rel(S, f_ref)))
        row.max_fs_error = max(row.max_fs_error, e)
        row.fx_checked += 1
    for m, flag in flags.items():
        m.training = flag
    return row


# -- the catalogue resprobe is checked against ----------------------------------------------------

# timm families checked (one small member each); DenseNet has no additive residual.
TIMM_MODELS = (
    "resnet18",
    "seresnet18",
    "resnet50d",
    "resnetv2_50",
    "regnetx_002",
    "regnety_002",
    "mobilenetv2_050",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "densenet121",
)

# Models whose random initialisation alone takes many seconds on a CPU (>100M parameters), and
# the largest members of families whose smaller members (the same block classes) stay in the
# default tier: each took 3-9 s per mode on a 2-core CPU (Swin at 224²). Select them with -m slow.
LARGE = frozenset(
    {
        "swin_b",
        "swin_v2_b",
        "convnext_base",
        "resnext101_32x8d",
        "resnet152",
        "efficientnet_b6",
        "efficientnet_b7",
        "regnet_y_128gf",
        "regnet_y_32gf",
        "regnet_x_32gf",
        "regnet_y_16gf",
        "vit_h_14",
        "vit_l_16",
        "vit_l_32",
        "convnext_large",
        "efficientnet_v2_l",
        "vgg11",
        "vgg11_bn",
        "vgg13",
        "vgg13_bn",
        "vgg16",
        "vgg16_bn",
        "vgg19",
        "vgg19_bn",
        "resnext101_64x4d",
        "wide_resnet101_2",
    }
)


def catalogue() -> list[str]:
    """``torchvision:NAME`` for every torchvision classification model and ``timm:NAME`` for
    :data:`TIMM_MODELS`, as far as those packages are installed."""
    names: list[str] = []
    try:
        import torchvision

        names += [
            f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)
        ]
    except ImportError:
        pass
    try:
        import timm  # noqa: F401

        names += [f"timm:{n}" for n in TIMM_MODELS]
    except ImportError:
        pass
    return names


def build(spec: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A randomised model of the catalogue (10 classes) and a small input batch for it."""
    source, _, name = spec.partition(":")
    torch.manual_seed(seed)
    size, kwargs = 32, {"num_classes": 10}
    if source == "torchvision":
        import torchvision

        if name.startswith("vit_"):
            kwargs["image_size"] = 32 if name.endswith("_16") or name.endswith("_32") else 28
        elif name.startswith(("swin", "maxvit")):
            size = 224
        elif name.startswith("inception"):
            size = 75
        elif name == "alexnet":
            size = 64
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=False)
        model = torchvision.models.get_model(name, **kwargs)
        if name.startswith("vit_"):
            size = kwargs["image_size"]
    else:
        import timm

        if "vit" in name or "deit" in name:
            kwargs["img_size"] = 32
        elif "swin" in name:
            size = 224
        model = timm.create_model(name, pretrained=False, **kwargs)
    randomize_(model, seed)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return model, x
