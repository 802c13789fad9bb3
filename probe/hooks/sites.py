"""Residual sites: the two operands of each residual add, read where the add happens.

A residual network computes y = act(S(x) + F(x)) somewhere in its code: inside a block
(``out += identity``), twice in a transformer block (attention, then MLP), or in the parent
(``x = x + self.block(x)``). Instead of guessing from module names which submodule is F and which
is S, resprobe watches the add itself. While a traced module runs its own ``forward`` (not inside a
submodule), a :class:`~torch.overrides.TorchFunctionMode` sees each ``+`` / ``add`` / ``+=`` and its
operands. An add is a *residual site* when both operands have the result's shape and both derive
from the module's input x; the **shortcut** S is the operand computed from x with fewer parameters
(then: fewer submodule calls), the **branch** F the other. F is therefore exactly what is added --
after DropPath, stochastic depth or layer scale -- and S is what the code really adds (identity, a
projection, or a projection of a pre-activated input). Adds whose operands cannot be told apart
(same parameter count and depth) are not sites.

Keys (see docs/probes.md, "Residual sites"): a module with one site is keyed by its dotted name;
a module with several sites (a transformer block) by ``name#0``, ``name#1``, ... in forward order,
and ``name`` itself is the whole block; when every site of a module is ``x + child(x)`` with its own
child (a parent that loops over blocks) each site is keyed by that child's name.

Nothing here changes what the model computes: operands are copied only when a later in-place op
would overwrite them, and tensors are read, never replaced -- except in :func:`shortcut_map`, which
evaluates the block with every branch set to zero on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from probe.probes.base import first_tensor, input_tensor

__all__ = [
    "OwnerCall",
    "Site",
    "SiteRecord",
    "SiteTracer",
    "discover_sites",
    "shortcut_map",
    "site_keys",
]

_ADDS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
# a − k·b is a + (−k)·b: a site whose second operand enters with a minus sign (not __rsub__,
# whose operands come reversed)
_SUBS = frozenset({"sub", "sub_", "__sub__", "__isub__", "subtract", "subtract_"})


@dataclass(frozen=True)
class Site:
    """One residual add found in a module's own forward (structure only; no tensors)."""

    owner: str  # dotted name of the module whose forward performs the add ('' = the model)
    index: int  # position among the owner's sites, in forward order
    child: str | None  # the site is x + child(x): the child's dotted name, else None
    identity: bool  # S is the owner's input stream itself (no op or module applied)
    # The owner's output (its first tensor) had this add's shape when the sites were found: the
    # output of a module's only site is then the module's own output (y = act(F + S)).
    as_output: bool = False
    # Dotted names of the modules the owner's own code called (its children, and any deeper
    # module it calls directly: `self.body[0](x)` of an nn.Sequential, a torch.fx graph's
    # `self.layer1.0.conv1`): the capture hooks these to know where the owner's code is.
    callees: tuple[str, ...] = ()


@dataclass
class SiteRecord:
    """The operands and result of one residual add in one call."""

    f: torch.Tensor
    s: torch.Tensor
    out: torch.Tensor  # the add's result
    child: str | None  # the site is x + child(x): that child's dotted name
    identity: bool  # S is the owner's input stream itself
    # False once an in-place op changed ``out`` without a copy first: its owner's output stands
    # for it (SiteTracer.spare), so ``out`` holds only the add's shape, not its values.
    out_kept: bool = True
    branch_scale: float = 1  # c of x + c·branch (alpha, −alpha for a subtraction); f holds c·branch
    # F was computed from S itself (x + f(x), x + f(norm(x))), not beside it from a common
    # input (proj(z) + f(z)): S is then the stream that enters the site
    s_feeds_f: bool = False
    # Where F and S were computed beside each other from a tensor other than the owner's input
    # (a stem before a network's first site, proj(h) + f(h) in the network's own forward): the
    # latest tensor both derive from, the stream that enters the site. None otherwise.
    source: torch.Tensor | None = None


@dataclass
class _Entry:
    """Provenance of a tensor seen in an owner's own code: parameters and submodule calls on its
    path from the owner's input, whether it is that input (or the stream through earlier sites)
    itself, and the child module that produced it."""

    tensor: torch.Tensor
    weight: int
    hops: int
    identity: bool
    producer: str | None = None
    producer_input: int | None = None  # id() of the producer's input tensor
    # id()s of the tensors of the owner's code it is computed from (itself included): tells
    # whether a site's branch was computed from its shortcut operand
    origins: frozenset[int] = frozenset()


@dataclass
class OwnerCall:
    """One call of a traced module: its arguments, its input x and the sites its code ran."""

    name: str
    module: nn.Module
    owner: bool  # whether this module's own code is traced for sites
    prov: dict[int, _Entry] = field(default_factory=dict)
    sites: list[SiteRecord] = field(default_factory=list)
    x: torch.Tensor | None = None
    x_id: int | None = None  # id() of x as it entered (x may be replaced by a protective copy)
    input_prov: tuple[int, int, frozenset[int]] | None = None  # (weight, hops, origins) of its
    # input in the parent frame
    input_id: int | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _provenance(prov: dict[int, _Entry], obj: object) -> tuple[int, int, frozenset[int]] | None:
    """(weight, hops, origins) of what ``obj``'s tracked tensors derive from: the largest weight
    and hops, since a result is as far from x as its farthest input, and every origin; None when
    no tensor of ``obj`` is tracked."""
    found = [prov[id(t)] for t in _tensors(obj) if id(t) in prov]
    if not found:
        return None
    origins = found[0].origins.union(*(e.origins for e in found[1:]))
    return max(e.weight for e in found), max(e.hops for e in found), origins


def _common_source(frame: OwnerCall, es: _Entry, ef: _Entry) -> torch.Tensor | None:
    """The latest tensor of the owner's code that S and F were both computed from, when that is
    not the owner's input (a stem lies between them); None when it is, or when none is tracked.
    Entries are kept in the order they were made, so the last common one is the latest."""
    common = es.origins & ef.origins
    latest = next((key for key in reversed(frame.prov) if key in common), None)
    return None if latest is None or latest == frame.x_id else frame.prov[latest].tensor


def storage_ptr(t: torch.Tensor) -> int | None:
    """Address of the memory behind ``t`` (shared by all its views); None where there is none."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # functorch wrappers, meta tensors
        return None


def _is_inplace(name: str, kwargs: dict) -> bool:
    return (
        (name.endswith("_") and not name.endswith("__"))
        or name.startswith("__i")
        or (kwargs.get("inplace") is True)
    )


def _called_children(
    module: nn.Module, prefix: str, seen: tuple[str, ...] = ()
) -> Iterator[tuple[str, nn.Module]]:
    """The submodules ``module``'s own code calls: its children, the members of child
    containers (``ModuleList``/``ModuleDict``, which are never called themselves), and the
    deeper modules in ``seen`` (dotted names from the model's root) that its code was seen to
    call directly."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _called_children(child, full)
        else:
            yield full, child
    for full in seen:
        relative = full[len(prefix) + 1 :] if prefix else full
        with contextlib.suppress(AttributeError):  # no longer there: nothing to hook
            yield full, module.get_submodule(relative)


class SiteTracer(TorchFunctionMode):
    """Finds and records residual sites while traced modules run (use via :meth:`attach`).

    ``on_owner(call, output)`` is called when a traced owner returns, with its
    :class:`OwnerCall` (``call.sites``: the :class:`SiteRecord` of each site, in forward order). With ``zero_branches=True`` every branch
    operand is replaced by zeros (the block's shortcut path alone, see :func:`shortcut_map`).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.f = nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return torch.relu(x + self.f(x))
        >>> seen = {}
        >>> tracer = SiteTracer(lambda call, out: seen.update({call.name: call.sites}))
        >>> block = Block()
        >>> with tracer.attach({"b": block}):
        ...     y = block(torch.randn(2, 3))
        >>> s = seen["b"][0]
        >>> torch.allclose(torch.relu(s.f + s.s), y), s.identity
        (True, True)
    """

    def __init__(
        self,
        on_owner: Callable[..., None],
        *,
        zero_branches: bool = False,
    ) -> None:
        super().__init__()
        self.on_owner = on_owner
        self.zero_branches = zero_branches
        self.stack: list[OwnerCall] = []
        self.suspended = False
        self.last_shortcut: torch.Tensor | None = None  # zero_branches: S of the latest site
        # Owners with one site whose result the caller reads from the owner's output instead
        # (y = act(F + S)): an in-place op on that result (torchvision's ReLU) needs no copy.
        self.spare: frozenset[str] = frozenset()
        # discover_sites: the modules each owner's own code called ({owner: {callee: None}})
        self.callees: dict[str, dict[str, None]] | None = None
        self._active = False

    # -- hooks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(
        self,
        owners: dict[str, nn.Module],
        children: bool = True,
        callees: dict[str, tuple[str, ...]] | None = None,
    ) -> Iterator[SiteTracer]:
        """Trace ``owners`` ({dotted name: module}) while the context is open; their direct
        children, and the deeper modules ``callees`` names for an owner (those its code was
        seen to call, :attr:`Site.callees`), get light hooks (so the tracer knows when code runs
        inside them). Hooks are removed on exit, also on error."""
        handles = []
        watched: dict[nn.Module, tuple[str, bool]] = {}
        for name, m in owners.items():
            watched[m] = (name, True)
        if children:
            for name, m in owners.items():
                for cname, c in _called_children(m, name, (callees or {}).get(name, ())):
                    if c not in watched:
                        watched[c] = (cname, False)
        weights = {m: sum(p.numel() for p in m.parameters()) for m in watched}
        try:
            for m, (name, owner) in watched.items():
                handles.append(
                    m.register_forward_pre_hook(self._pre(name, owner), with_kwargs=True)
                )
                handles.append(
                    m.register_forward_hook(
                        self._post(name, weights[m]), with_kwargs=True, always_call=True
                    )
                )
            yield self
        finally:
            for h in handles:
                h.remove()
            self._unwind()

    def _unwind(self) -> None:
        self.stack.clear()
        if self._active:
            self._active = False
            self.__exit__(None, None, None)

    def _pre(self, name: str, owner: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.suspended:
                return
            frame = OwnerCall(name, module, owner, args=args, kwargs=kwargs)
            parent = self.stack[-1] if self.stack else None
            x = input_tensor(args, kwargs)
            if parent is not None and parent.owner:
                if self.callees is not None:
                    self.callees.setdefault(parent.name, {})[name] = None
                # The child's input provenance in its parent.
                frame.input_prov = _provenance(parent.prov, (args, kwargs))
                if frame.input_prov is not None:
                    frame.input_id = id(x) if x is not None else None
            if owner and x is not None and x.is_floating_point():
                frame.x, frame.x_id = x, id(x)
                frame.prov[id(x)] = _Entry(x, 0, 0, True, origins=frozenset((id(x),)))
            self.stack.append(frame)
            if not self._active:
                self.__enter__()
                self._active = True

        return hook

    def _post(self, name: str, weight: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            if self.suspended or not self.stack:
                return
            # Pop up to this module's frame (frames above it are left by an exception).
            while self.stack and self.stack[-1].module is not module:
                self.stack.pop()
            if not self.stack:
                return
            frame = self.stack.pop()
            parent = self.stack[-1] if self.stack else None
            if not self.stack and self._active:
                self._active = False
                self.__exit__(None, None, None)
            if output is None:
                # The forward raised (torch calls always_call hooks with no output then): the
                # call's adds are incomplete, and reading them would only add a second error,
                # which torch prints as a warning beside the first.
                return
            if parent is not None and parent.owner and frame.input_prov is not None:
                w, h, origins = frame.input_prov
                for t in _tensors(output):
                    if t.is_floating_point():
                        parent.prov[id(t)] = _Entry(
                            t, w + weight, h + 1, False, frame.name, frame.input_id,
                            origins | {id(t)},
                        )  # fmt: skip
            if frame.owner:
                self.on_owner(frame, output)

        return hook

    # -- the mode ----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = self.stack[-1] if self.stack else None
        if frame is None or self.suspended:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inplace = _is_inplace(name, kwargs)
        if inplace and args and isinstance(args[0], torch.Tensor) and not self.zero_branches:
            self._protect(args[0])
        if not frame.owner:
            return func(*args, **kwargs)
        if (name in _ADDS or name in _SUBS) and len(args) >= 2:
            sign = -1 if name in _SUBS else 1
            site = self._site(frame, func, args, kwargs, inplace, sign)
            if site is not None:
                return site
        out = func(*args, **kwargs)
        derived = _provenance(frame.prov, (args, kwargs))
        if derived is not None:  # an op in the owner's own code: its result derives from x too
            w, h, origins = derived
            for t in _tensors(out):
                if t.is_floating_point() and (
                    id(t) not in frame.prov or (inplace and t is args[0])
                ):
                    frame.prov[id(t)] = _Entry(t, w, h, False, origins=origins | {id(t)})
        return out

    def _site(self, frame: OwnerCall, func, args, kwargs, inplace: bool, sign: int):
        a, b = args[0], args[1]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        if a.shape != b.shape or not a.is_floating_point() or not b.is_floating_point():
            return None
        ea, eb = frame.prov.get(id(a)), frame.prov.get(id(b))
        if ea is None or eb is None or (ea.weight, ea.hops) == (eb.weight, eb.hops):
            return None
        # torch.add(a, b, alpha=k) is a + k·b, torch.sub(a, b, alpha=k) a − k·b: the
        # coefficient c scales the second operand, whichever it is; y = a + c·b
        c = sign * kwargs.get("alpha", 1)
        s_first = (ea.weight, ea.hops) < (eb.weight, eb.hops)
        if sign < 0 and not s_first:
            # f(x) − x (PoolFormer's pooling mixer, pool(x) − x) subtracts the stream: no site
            return None
        (s, es), (f, ef) = ((a, ea), (b, eb)) if s_first else ((b, eb), (a, ea))
        scaled_s = c != 1 and not s_first  # S = c·x is no longer the input stream itself
        identity = es.identity and not scaled_s
        if self.zero_branches:
            s_kept = s.clone() if inplace and s is a else s
            self.last_shortcut = c * s_kept if scaled_s else s_kept
            if inplace and f is a:
                a.zero_()  # the branch is the in-place target: zero it, then add S into it
                out = func(*args, **kwargs)
            else:
                zeros = torch.zeros_like(f)
                out = func(*((s, zeros) if s_first else (zeros, s)), *args[2:], **kwargs)
        else:
            # The in-place target is overwritten by the add: keep its operand value first.
            s_val = s.detach().clone() if inplace and s is a else s
            f_val = f.detach().clone() if inplace and f is a else f
            out = func(*args, **kwargs)
            if scaled_s:
                s_val = c * s_val
            elif c != 1:
                f_val = c * f_val
            # x + c·child(x): the site is that child's call with an identity shortcut around it
            # (a scaled shortcut c·x + child(x) is not: it stays its owner's site).
            child = ef.producer if not scaled_s and ef.producer_input == id(s) else None
            s_feeds_f = not scaled_s and id(s) in ef.origins
            frame.sites.append(
                SiteRecord(
                    f=f_val,
                    s=s_val,
                    out=out,
                    child=child,
                    identity=identity,
                    branch_scale=1 if scaled_s else c,
                    s_feeds_f=s_feeds_f,
                    source=None if s_feeds_f else _common_source(frame, es, ef),
                )
            )
        if out.shape == s.shape:
            frame.prov[id(out)] = _Entry(
                out,
                es.weight,
                es.hops,
                identity,
                origins=es.origins | ef.origins | {id(out)},
            )
        return out

    def _protect(self, target: torch.Tensor) -> None:
        """``target`` is about to be modified in place: copy every recorded tensor that shares its
        memory first, so the recorded values stay what they were at the add."""
        ptr = storage_ptr(target)
        if ptr is None:
            return
        for frame in self.stack:
            if frame.x is not None and storage_ptr(frame.x) == ptr:
                frame.x = frame.x.clone()
            spare = frame.name in self.spare
            for rec in frame.sites:
                for attr in ("f", "s", "out", "source"):
                    t = getattr(rec, attr)
                    if t is None or storage_ptr(t) != ptr:
                        continue
                    if attr == "out" and spare:
                        rec.out_kept = False
                    else:
                        setattr(rec, attr, t.clone())


def site_keys(owner: str, sites: list[Site] | list[SiteRecord], taken: set[str]) -> list[str]:
    """Result keys of an owner's sites (rules in the module docstring).

    Example:
        >>> site_keys("enc.0", [Site("enc.0", 0, None, True), Site("enc.0", 1, None, True)], set())
        ['enc.0#0', 'enc.0#1']
    """
    children = [s.child for s in sites]
    loop = (
        (len(sites) >= 2 or not owner)
        and all(children)
        and len(set(children)) == len(children)
        and not (set(children) & taken)
    )
    if loop:
        return list(children)
    if len(sites) == 1 and owner:
        return [owner]
    base = owner or "model"
    return [f"{base}#{k}" for k in range(len(sites))]


def discover_sites(
    model: nn.Module, args: tuple, kwargs: dict | None = None
) -> dict[str, list[Site]]:
    """Every module's residual sites, from one traced forward of ``model(*args, **kwargs)``.

    Run on a couple of samples in the mode the capture will use; the model's outputs, parameters
    and buffers are left as they were (random state is forked).

    Example:
        >>> from probe.zoo import create
        >>> sites = discover_sites(create("resnet20").eval(), (torch.randn(2, 3, 32, 32),))
        >>> len(sites), sites["stages.1.0"][0].identity
        (9, False)
    """
    found: dict[str, list[Site]] = {}

    def on_owner(call: OwnerCall, output: object) -> None:
        if call.sites and call.name not in found:
            y = first_tensor(output)
            callees = tuple(tracer.callees.get(call.name, ()))
            found[call.name] = [
                Site(
                    call.name,
                    i,
                    r.child,
                    r.identity,
                    y is not None and y.shape == r.out.shape,
                    callees,
                )
                for i, r in enumerate(call.sites)
            ]

    owners = dict(model.named_modules())
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    tracer = SiteTracer(on_owner)
    tracer.callees = {}
    devices = [t.device for t in _tensors((args, kwargs)) if t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
        with tracer.attach(owners, children=False):
            model(*args, **(kwargs or {}))
        for b, saved in buffers:
            b.copy_(saved)
    return {name: found[name] for name in owners if name in found}


def shortcut_map(
    module: nn.Module, function: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map x -> S(x) of a block: ``function`` (the block as a map of x) evaluated with every
    residual branch set to zero, read at the shortcut operand of its last site. For one site this
    is the shortcut as the block computes it (identity, projection, projection of a pre-activated
    x); for several sites, the composition of their shortcuts. Differentiable (JVPs run through it).

    Example:
        >>> class PreAct(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.proj, self.f = nn.LayerNorm(3), nn.Linear(3, 3), nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         z = self.norm(x)
        ...         return self.proj(z) + self.f(torch.relu(self.f(z)))
        >>> b, x = PreAct(), torch.randn(2, 3)
        >>> torch.allclose(shortcut_map(b, b)(x), b.proj(b.norm(x)))
        True
    """

    def s_of(z: torch.Tensor) -> torch.Tensor:
        tracer = SiteTracer(lambda call, output: None, zero_branches=True)
        with tracer.attach({"": module}):
            function(z)
        if tracer.last_shortcut is None:
            raise RuntimeError(f"{type(module).__name__} ran no residual add to read S(x) from")
        return tracer.last_shortcut

    return s_of
