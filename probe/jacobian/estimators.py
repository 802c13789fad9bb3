"""Randomised Jacobian estimators for a per-sample map f on a batch, built on ``torch.func``.

f maps x [N, ...] to y [N, ...] with every sample independent (a block in eval mode), so one
``jvp`` with a batched tangent gives J_n v_n for all n at once; ``vmap`` over the probe axis
evaluates several probe vectors, in chunks that bound memory.

Formulas (per sample, Rademacher probes v with E[v v^T] = I):
    ||A||_F^2 = E ||A v||^2                 (Hutchinson 1990; Avron & Toledo 2011)
    tr(J)     = E v^T J v                   (square J)
    ||J - P||_F^2 = E ||J v - P v||^2        P = the shortcut's Jacobian (identity, option A/B)
Each estimate comes with its standard error std_k / sqrt(m) over the m probes.
The top singular values use subspace iteration on J^T J (jvp then vjp) with Rayleigh-Ritz, and
the spectral density of J^T J uses stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import jacrev, jvp, vjp, vmap

from probe.errors import ProbeError

__all__ = [
    "HutchinsonResult",
    "rademacher",
    "per_sample_probes",
    "jvp_many",
    "math_attention",
    "hutchinson",
    "hutchinson_interval",
    "top_singular_values",
    "lanczos_spectrum",
    "exact_jacobian",
]

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class HutchinsonResult:
    """Per-sample estimates and standard errors, each ``[N]``; ``None`` where not applicable."""

    fro2: torch.Tensor
    fro2_se: torch.Tensor
    dev2: torch.Tensor | None = None  # ||J - P||_F^2
    dev2_se: torch.Tensor | None = None
    p_fro2: torch.Tensor | None = None  # ||P||_F^2
    trace: torch.Tensor | None = None
    trace_se: torch.Tensor | None = None
    n_probes: int = 0


def rademacher(shape: tuple[int, ...], gen: torch.Generator, device, dtype) -> torch.Tensor:
    """Random +-1 entries drawn from ``gen`` (reproducible for a seed)."""
    bits = torch.randint(0, 2, shape, generator=gen, device=gen.device)
    return bits.to(device=device, dtype=dtype) * 2 - 1


def per_sample_probes(
    m: int, x: torch.Tensor, seed: int, first_index: int, kind: str = "rademacher"
) -> torch.Tensor:
    """Probe vectors [m, N, ...] where sample n's vectors depend only on (seed, first_index + n),
    so estimates do not depend on how samples are batched.

    The vectors are drawn on ``x``'s device (one small generator per sample), so a GPU sweep never
    waits on host-side random numbers.
    """
    out = torch.empty((m, *x.shape), device=x.device, dtype=x.dtype)
    for n in range(x.shape[0]):
        gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + first_index + n)
        if kind == "rademacher":
            out[:, n] = rademacher((m, *x.shape[1:]), gen, x.device, x.dtype)
        else:
            out[:, n] = torch.randn(
                (m, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype
            )
    return out


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention in its composite (math) form while the context is open.

    A forward without autograd selects fused attention kernels -- the fast path of
    ``nn.MultiheadAttention`` and the flash / memory-efficient ``scaled_dot_product_attention``
    backends -- that implement no forward-mode AD, so a JVP through a transformer block fails.
    The math form computes the same function from differentiable primitives.
    """
    with contextlib.ExitStack() as stack:
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "set_fastpath_enabled"):
            previous = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, previous)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3: the math kernel is the fallback anyway
            pass
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def jvp_many(
    f: Fn, x: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """J v for a stack of tangents v [m, N, ...] -> [m, N, ...out], ``chunk_size`` probes at a time."""
    with math_attention():
        return vmap(lambda t: jvp(f, (x,), (t,))[1], chunk_size=chunk_size)(v)


def _mean_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = values.shape[0]
    mean = values.mean(0)
    se = values.std(0, correction=1) / m**0.5 if m > 1 else torch.full_like(mean, float("nan"))
    return mean, se


def hutchinson_interval(
    estimate: torch.Tensor | float,
    se: torch.Tensor | float,
    n_probes: int,
    confidence: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample confidence interval of a Hutchinson estimate from its standard error.

    The standard error is estimated from the same m probes, so the interval uses Student's t
    quantile with m - 1 degrees of freedom, estimate +- t_{(1+c)/2, m-1} * se. The normal quantile
    (1.96) under-covers for few probes: with m = 16 a nominal 95 % z-interval covers 92-94 %
    (measured in the tests), the t-interval ~95 %.

    Example:
        >>> lo, hi = hutchinson_interval(torch.tensor([10.0]), torch.tensor([1.0]), n_probes=16)
        >>> round(float(hi - 10.0), 3)  # t_{0.975, 15}
        2.131
    """
    from scipy import stats

    if n_probes < 2:
        raise ProbeError(f"An interval needs at least 2 probes; got n_probes={n_probes}.")
    if not 0 < confidence < 1:
        raise ProbeError(f"confidence must lie in (0, 1); got {confidence}.")
    estimate, se = torch.as_tensor(estimate), torch.as_tensor(se)
    half = float(stats.t.ppf(0.5 + confidence / 2, n_probes - 1)) * se
    return estimate - half, estimate + half


def hutchinson(
    f: Fn,
    x: torch.Tensor,
    n_probes: int = 16,
    *,
    shortcut: Fn | None = None,
    identity_shortcut: bool = False,
    gen: torch.Generator | None = None,
    chunk_size: int | None = 8,
    v: torch.Tensor | None = None,
) -> HutchinsonResult:
    """Hutchinson estimates of ||J||_F^2, ||J - P||_F^2 and tr(J) for every sample of ``x``.

    ``shortcut`` is the map whose Jacobian is P (``identity_shortcut=True`` for P = I). Probe
    vectors ``v`` [m, N, ...] may be given (see :func:`per_sample_probes`); else drawn from ``gen``.

    Example:
        >>> x = torch.randn(3, 5, dtype=torch.float64)
        >>> r = hutchinson(lambda z: 2 * z, x, n_probes=4, identity_shortcut=True)
        >>> r.fro2.tolist(), r.dev2.tolist()  # ||2I||^2 = 20, ||2I - I||^2 = 5, exact for Rademacher
        ([20.0, 20.0, 20.0], [5.0, 5.0, 5.0])
    """
    gen = gen or torch.Generator(device=x.device).manual_seed(0)
    x = x.detach()
    if v is None:
        v = rademacher((n_probes, *x.shape), gen, x.device, x.dtype)  # [m, N, ...]
    n_probes = v.shape[0]
    jv = jvp_many(f, x, v, chunk_size).reshape(n_probes, x.shape[0], -1)  # [m, N, dout]
    vf = v.reshape(n_probes, x.shape[0], -1)  # [m, N, din]

    def sq(t: torch.Tensor) -> torch.Tensor:  # fused sum of squares over features, no temporary
        return torch.linalg.vecdot(t, t)

    fro2, fro2_se = _mean_se(sq(jv))
    res = HutchinsonResult(fro2, fro2_se, n_probes=n_probes)
    pv = None
    if identity_shortcut:
        pv = vf
    elif shortcut is not None:
        pv = jvp_many(shortcut, x, v, chunk_size).reshape(n_probes, x.shape[0], -1)
    if pv is not None and pv.shape == jv.shape:
        res.dev2, res.dev2_se = _mean_se(sq(jv - pv))
        res.p_fro2, _ = _mean_se(sq(pv))
    if jv.shape == vf.shape:
        res.trace, res.trace_se = _mean_se(torch.linalg.vecdot(vf, jv))
    return res


def _jtj(f: Fn, x: torch.Tensor, chunk_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """u [k, N, ...in] -> J^T J u, batched over k and samples."""
    with math_attention():
        _, pullback = vjp(f, x)

    def apply(u: torch.Tensor) -> torch.Tensor:
        ju = jvp_many(f, x, u, chunk_size)
        return vmap(lambda w: pullback(w)[0], chunk_size=chunk_size)(ju)

    return apply


def top_singular_values(
    f: Fn,
    x: torch.Tensor,
    k: int = 1,
    iters: int = 30,
    oversample: int = 4,
    gen: torch.Generator | None = None,
    chunk_size: int | None = 8,
    u0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``k`` singular values of each sample's Jacobian, ``[N, k]``, by subspace iteration.

    A block of ``k + oversample`` vectors is multiplied by J^T J and re-orthonormalised ``iters``
    times; the singular values of J Q (Rayleigh-Ritz) are returned. The error of sigma_1 decays
    like (sigma_{k+p+1}/sigma_1)^(2*iters); 30 iterations with 4 extra vectors reach 1% on the
    blocks in the tests.
    """
    gen = gen or torch.Generator(device=x.device).manual_seed(0)
    x = x.detach()
    n, b = x.shape[0], k + oversample
    d = x[0].numel()
    b = min(b, d)
    apply = _jtj(f, x, chunk_size)
    u = (
        u0[:b]
        if u0 is not None
        else torch.randn((b, *x.shape), generator=gen, device=gen.device).to(x.device, x.dtype)
    )

    def orth(u: torch.Tensor) -> torch.Tensor:
        mat = u.reshape(b, n, d).permute(1, 2, 0)  # [N, d, b]
        q, _ = torch.linalg.qr(mat)
        return q.permute(2, 0, 1).reshape(u.shape)

    u = orth(u)
    for _ in range(iters):
        u = orth(apply(u))
    ju = jvp_many(f, x, u, chunk_size)  # [b, N, ...out]
    mat = ju.reshape(b, n, -1).permute(1, 2, 0)  # [N, dout, b]
    return torch.linalg.svdvals(mat)[:, :k]


def lanczos_spectrum(
    f: Fn,
    x: torch.Tensor,
    steps: int = 20,
    n_vectors: int = 2,
    gen: torch.Generator | None = None,
    chunk_size: int | None = 8,
    q0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature for the eigenvalues of J^T J (squared singular values of J).

    Returns ``(nodes, weights)``, each ``[N, n_vectors * steps]``: the density of J^T J of sample n
    is approximated by sum_j weights[n, j] * delta(lambda - nodes[n, j]) (weights sum to 1).
    Full re-orthogonalisation keeps the small Krylov bases exact in floating point.
    """
    gen = gen or torch.Generator(device=x.device).manual_seed(0)
    x = x.detach()
    n = x.shape[0]
    d = x[0].numel()
    steps = min(steps, d)
    apply = _jtj(f, x, chunk_size)
    if q0 is None:
        q0 = rademacher((n_vectors, *x.shape), gen, x.device, x.dtype)
    n_vectors = q0.shape[0]
    q = q0.reshape(n_vectors, n, d)
    q = q / q.norm(dim=-1, keepdim=True)
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = apply(basis[-1].reshape(n_vectors, *x.shape)).reshape(n_vectors, n, d)
        alpha = (w * basis[-1]).sum(-1)
        alphas.append(alpha)
        stack = torch.stack(basis)  # [j+1, v, N, d]
        w = w - (torch.einsum("jvnd,vnd->jvn", stack, w)[..., None] * stack).sum(
            0
        )  # full reorthogonalisation
        w = w - (torch.einsum("jvnd,vnd->jvn", stack, w)[..., None] * stack).sum(0)
        beta = w.norm(dim=-1)
        if j < steps - 1:
            betas.append(beta)
            basis.append(w / beta.clamp_min(1e-30)[..., None])
    a = torch.stack(alphas, -1)  # [v, N, steps]
    t = torch.diag_embed(a)
    if betas:
        bt = torch.stack(betas, -1)  # [v, N, steps-1]
        t = t + torch.diag_embed(bt, 1) + torch.diag_embed(bt, -1)
    evals, evecs = torch.linalg.eigh(t)
    weights = evecs[..., 0, :] ** 2 / n_vectors  # [v, N, steps]
    nodes = evals.clamp_min(0)
    return nodes.permute(1, 0, 2).reshape(n, -1), weights.permute(1, 0, 2).reshape(n, -1)


def exact_jacobian(f: Fn, x: torch.Tensor) -> torch.Tensor:
    """The exact Jacobian of each sample, ``[N, dout, din]``, by ``jacrev`` (small dims only)."""
    rows = []
    for xi in x.detach():
        j = jacrev(lambda z: f(z[None])[0])(xi)
        rows.append(j.reshape(-1, xi.numel()))
    return torch.stack(rows)
