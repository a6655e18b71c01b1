r"""The Rao-Blackwell orbit estimator: per-graph importance weights over orbit candidates and the
posterior-mean target.

For candidates ``g_1 = e, g_2, ..., g_K`` drawn from a proposal ``nu`` (identity first),

``log w_k = log q_t(x_t | g_k ∘ x0) - log nu(g_k)``, normalized with a softmax **per graph**,

``x0_hat = sum_k w_k (g_k ∘ x0)`` (Gaussian kernels) or
``score_hat = sum_k w_k grad log q_t(x_t | g_k ∘ x0)`` (any kernel; the torus needs this form),

``ESS = 1 / sum_k w_k^2`` per graph.

Two evaluation paths give identical results:

* **structured** (Gaussian kernel, no shift factor): ``||x_t - alpha A P x0||^2`` depends on a linear
  candidate ``A`` only through the 3×3 matrices ``M_P = x_tᵀ P x0`` and ``S = x0ᵀ x0``, so each
  rotation costs 9 multiply-adds instead of ``3 N``, and the target is ``sum_P (sum_A w A) P x0``.
  All 3×3 algebra runs in float64, so logits of size ``1e9`` (``sigma = 1e-4``) keep their O(1)
  differences exact.
* **exact rotations** (candidates flagged ``exact_linear``, proposal ``"exact"``): on the structured
  path each (permutation ``P``, coset ``A``) pair is integrated over SO(3) in closed form: the
  posterior of ``R`` is matrix Fisher with ``F = (alpha / sigma^2) M_P Aᵀ``, the candidate's logit is
  ``log c(F) - (alpha^2 / 2 sigma^2) ||x0||^2 - log nu`` and its target ``E[R] A P x0``
  (:mod:`~orbit_pyg.orbits.matrix_fisher`). ``ESS`` then counts the (permutation, coset)
  candidates: ``1`` for SO(3) alone, where the target is exact.
* **exact shifts** (``exact_shift``, the torus): every candidate's shift is integrated per axis by
  quadrature (:mod:`~orbit_pyg.orbits.torus_quadrature`), same online softmax as below.
* **materialized** (any kernel, shifts): candidates are built in chunks of ``chunk_size`` (default:
  about 100k coordinates) and folded into a running (online) softmax, so memory stays
  ``O(chunk_size · N)`` for any ``K``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._utils import sum_per_graph
from .orbits.base import Orbit, OrbitCandidates, OrbitContext
from .orbits.matrix_fisher import log_normalizer_bounds, matrix_fisher_moments, proper_svd
from .orbits.rotation import second_moment
from .orbits.torus_quadrature import default_shift_chunk, shift_marginal

_TARGETS = ("x0", "score")


@dataclass
class OrbitEstimate:
    """Result of :func:`orbit_estimate`.

    Attributes:
        target: ``[N, 3]`` posterior-mean target (``x0_hat`` or ``score_hat``) in the input dtype.
        weights: ``[B, K]`` normalized weights (``0`` for padded candidates), float64.
        ess: ``[B]`` effective sample size ``1 / sum_k w_k^2`` (float64).
        kind: ``"x0"`` or ``"score"``.
    """

    target: Tensor
    weights: Tensor
    ess: Tensor
    kind: str

    @property
    def log_weights(self) -> Tensor:
        """``log weights`` (``-inf`` for padded or negligible candidates)."""
        return torch.log(self.weights)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """``1 / sum_k w_k^2`` per row of normalized log weights ``[B, K]`` (``-inf`` entries count 0)."""
    return torch.exp(-torch.logsumexp(2 * log_weights, dim=-1))


def _softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row softmax of float64 logits ``[B, K]`` (``-inf`` allowed, row max finite) and ESS.

    Stays in float64: logits reach ~1e9 at tiny sigma and only their O(1) differences matter.
    """
    w = torch.exp_(logits - logits.amax(dim=1, keepdim=True))
    w = w.div_(w.sum(dim=1, keepdim=True))
    return w, 1.0 / w.square().sum(dim=1)


def orbit_estimate(
    orbit: Orbit | OrbitCandidates,
    ctx: OrbitContext,
    target: str = "x0",
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> OrbitEstimate:
    """Rao-Blackwellized target for the batch described by ``ctx``.

    Args:
        orbit: an :class:`~orbit_pyg.orbits.Orbit` (candidates are drawn with ``generator``) or a
            ready :class:`~orbit_pyg.orbits.OrbitCandidates`.
        ctx: positions, noisy positions, batch, ``alpha``/``sigma`` per graph, kernel and data.
        target: ``"x0"`` (Gaussian kernels only) or ``"score"``.
        chunk_size: candidates per chunk on the materialized path (default: about 4M coordinates).

    Example:
        >>> import torch
        >>> from orbit_pyg.orbits import SO3, OrbitContext
        >>> from orbit_pyg.kernels import GaussianKernel
        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = torch.randn(6, 3, generator=g); x0 = x0 - x0.mean(0)
        >>> xt = x0 + 0.1 * torch.randn(6, 3, generator=g)
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> ctx = OrbitContext(x0, xt, torch.zeros(6, dtype=torch.long), 1, one, 0.1 * one, GaussianKernel())
        >>> est = orbit_estimate(SO3(num_candidates=100, proposal="guided"), ctx, generator=g)
        >>> est.target.shape, bool(est.ess[0] > 1)
        (torch.Size([6, 3]), True)
    """
    if target not in _TARGETS:
        raise ValueError(f"unknown target {target!r}: use one of {_TARGETS}")
    if ctx.kernel is None or ctx.xt is None or ctx.alpha is None or ctx.sigma is None:
        raise ValueError("orbit_estimate needs xt, alpha, sigma and kernel in the context")
    if target == "x0" and not ctx.kernel.linear:
        raise ValueError(f"target 'x0' needs a Gaussian kernel; use target='score' with {ctx.kernel!r}")
    cands = orbit if isinstance(orbit, OrbitCandidates) else orbit.candidates(ctx, generator)
    if cands.exact_shift:
        if cands.exact_linear:
            raise ValueError("exact torus-shift and exact rotation marginals do not combine (torus shifts act on "
                             "fractional coordinates, rotations on Cartesian ones)")
        if ctx.kernel.linear or target != "score":
            raise ValueError(f"exact torus-shift marginals need the wrapped-normal kernel and target='score', "
                             f"got {ctx.kernel!r} and target={target!r}")
        return _materialized(cands, ctx, target, chunk_size)
    if cands.exact_linear:
        if not ctx.kernel.linear:
            raise ValueError(f"exact rotation marginals need a Gaussian kernel, got {ctx.kernel!r}")
        if cands.shift is not None:
            raise ValueError("exact rotation marginals do not combine with sampled shifts")
        est = _structured(cands, ctx)
        return est if target == "x0" else _x0_to_score(est, ctx)
    if target == "x0" and cands.shift is None:
        return _structured(cands, ctx)
    return _materialized(cands, ctx, target, chunk_size)


def _x0_to_score(est: OrbitEstimate, ctx: OrbitContext) -> OrbitEstimate:
    """Gaussian kernel: ``score_hat = -(x_t - alpha x0_hat) / sigma^2`` (linear in the candidates)."""
    n, f64 = ctx.x0.size(0), torch.float64
    alpha = ctx.alpha.to(f64)[ctx.batch].view(n, 1)
    sigma = ctx.sigma.to(f64).clamp(min=1e-12)[ctx.batch].view(n, 1)
    score = ctx.kernel.score(ctx.xt.to(f64), est.target.to(f64), alpha, sigma)
    return OrbitEstimate(score.to(ctx.x0.dtype), est.weights, est.ess, "score")


def _structured(cands: OrbitCandidates, ctx: OrbitContext) -> OrbitEstimate:
    b, (kp, kl, _) = ctx.num_graphs, cands.sizes
    y = cands.permuted(ctx.x0).to(torch.float64)  # [Kp, N, 3]
    sigma2 = ctx.sigma.clamp(min=1e-12) ** 2
    m = second_moment(ctx.xt, y, ctx.batch, b).transpose(0, 1)  # [B, Kp, 3, 3]
    m = m * (ctx.alpha / sigma2).view(b, 1, 1, 1)
    s = second_moment(ctx.x0, ctx.x0, ctx.batch, b)  # [B, 3, 3], permutation invariant
    if cands.linear is None:
        lin = torch.eye(3, dtype=torch.float64, device=y.device).expand(b, 1, 3, 3)
    else:
        lin = cands.linear
    if cands.exact_linear:
        # integrate R over SO(3) for every candidate R A P: log c(M_P Aᵀ), target E[R] A P x0
        _check_orthogonal(lin)
        logits, eff = _matrix_fisher_candidates(m.unsqueeze(2) @ lin.transpose(-1, -2).unsqueeze(1), cands)
        eff = eff @ lin.unsqueeze(1)  # [B, Kp, Kl, 3, 3]
    else:
        # log q = (alpha / sigma^2) <A, M_p> - (alpha^2 / 2 sigma^2) ||A x0||^2 + const
        logits = torch.bmm(m.reshape(b, kp, 9), lin.reshape(b, kl, 9).transpose(1, 2))  # [B, Kp, Kl]
        eff = lin.unsqueeze(1)
    norm = torch.einsum("blki,blkj,bij->bl", lin, lin, s) * (ctx.alpha**2 / (2 * sigma2)).view(b, 1)
    linear_offset, perm_offset = cands.factor_offset("linear"), cands.factor_offset("perm")
    logits -= (norm if linear_offset is None else norm + linear_offset).unsqueeze(1)
    if perm_offset is not None:
        logits -= perm_offset.unsqueeze(2)
    mask = _factor_mask(cands.perm_mask, cands.linear_mask)
    if mask is not None:
        logits.masked_fill_(~mask, -torch.inf)
    w, ess = _softmax(logits.view(b, kp * kl))
    mix = torch.einsum("bpl,bplij->bpij", w.view(b, kp, kl), eff.expand(b, kp, kl, 3, 3))
    x0_hat = torch.einsum("npij,pnj->ni", mix[ctx.batch], y)
    return OrbitEstimate(x0_hat.to(ctx.x0.dtype), w, ess, "x0")


def _matrix_fisher_candidates(f: Tensor, cands: OrbitCandidates, margin: float = 40.0) -> tuple[Tensor, Tensor]:
    """``log c(F)`` and ``E[R]`` for ``F [B, Kp, Kl, 3, 3]``, computed only where they can matter.

    A candidate whose upper bound ``log c <= tr S`` (minus its offset) lies ``margin`` below the best
    lower bound of its graph gets weight below ``e^-margin``: it is given ``log c = -inf`` and skipped
    (at low noise most permutation candidates are).
    """
    b, kp, kl = f.shape[:3]
    u, s, v = proper_svd(f)
    lower, upper = log_normalizer_bounds(s)
    offset = torch.zeros(b, kp, kl, dtype=torch.float64, device=f.device)
    for kind, axis in (("perm", 1), ("linear", 2)):
        off = cands.factor_offset(kind)
        if off is not None:
            offset = offset + off.unsqueeze(3 - axis)
    mask = _factor_mask(cands.perm_mask, cands.linear_mask)
    best = torch.where(mask, lower - offset, -torch.inf) if mask is not None else lower - offset
    keep = (upper - offset) >= best.amax(dim=(1, 2), keepdim=True) - margin
    if mask is not None:
        keep &= mask
    log_c = torch.full((b, kp, kl), -torch.inf, dtype=torch.float64, device=f.device)
    d = torch.zeros(b, kp, kl, 3, dtype=torch.float64, device=f.device)
    log_c[keep], d[keep] = matrix_fisher_moments(s[keep])
    return log_c, u @ (d.unsqueeze(-1) * v.transpose(-1, -2))


def _check_orthogonal(lin: Tensor) -> None:
    eye = torch.eye(3, dtype=lin.dtype, device=lin.device)
    if not torch.allclose(lin @ lin.transpose(-1, -2), eye.expand_as(lin), atol=1e-6):
        raise ValueError("exact rotation marginals need orthogonal linear factors (rotations, "
                         "reflections, permutations of axes)")


def _factor_mask(perm_mask: Optional[Tensor], linear_mask: Optional[Tensor]) -> Optional[Tensor]:
    if perm_mask is None and linear_mask is None:
        return None
    if perm_mask is None:
        return linear_mask.unsqueeze(1)
    if linear_mask is None:
        return perm_mask.unsqueeze(2)
    return perm_mask.unsqueeze(2) & linear_mask.unsqueeze(1)


def default_chunk_size(num_nodes: int) -> int:
    """Candidates per chunk so that one chunk holds about 100k coordinates: the temporaries of a
    chunk stay in cache, which measured faster than a few large chunks (page faults, memory traffic)."""
    return max(1, 100_000 // (3 * max(num_nodes, 1)))


def _materialized(cands: OrbitCandidates, ctx: OrbitContext, target: str, chunk_size: Optional[int]) -> OrbitEstimate:
    b, k, n = ctx.num_graphs, cands.num_candidates, ctx.x0.size(0)
    device = ctx.x0.device
    if chunk_size is not None:
        chunk = int(chunk_size)
    else:
        chunk = default_shift_chunk(n, cands.exact_shift) if cands.exact_shift else default_chunk_size(n)
    if chunk < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    log_nu, mask = cands.joint_log_nu_and_mask(device)
    log_nu, mask = log_nu.reshape(b, k), mask.reshape(b, k)
    # Per-atom kernel terms in the input dtype (the candidates that carry weight have O(1) terms);
    # per-graph logits and the running sums in float64.
    dtype = ctx.x0.dtype
    xt = ctx.xt.to(dtype)
    alpha = ctx.alpha[ctx.batch].view(n, 1).to(dtype)
    sigma = ctx.sigma.clamp(min=1e-12)[ctx.batch].view(n, 1).to(dtype)
    logits = torch.empty(b, k, dtype=torch.float64, device=device)
    running_max = None
    acc = torch.zeros(n, 3, dtype=torch.float64, device=device)
    for start in range(0, k, chunk):
        flat = torch.arange(start, min(start + chunk, k), device=device)
        pos = cands.materialize(ctx.x0, ctx.batch, flat)  # [C, N, 3]
        if cands.exact_shift:  # shift integrated out per axis; float64 throughout
            delta = ctx.xt.to(torch.float64) - pos.to(torch.float64)
            log_z, phi = shift_marginal(delta, ctx.batch, b, ctx.sigma, ctx.kernel, cands.exact_shift)
            lg = log_z.t() - log_nu[:, flat]
        else:
            if target == "score":
                terms, phi = ctx.kernel.log_prob_and_score(xt, pos, alpha, sigma)
            else:
                terms, phi = ctx.kernel.log_prob_terms(xt, pos, alpha, sigma), pos
            lg = sum_per_graph(terms.sum(-1).to(torch.float64), ctx.batch, b).t() - log_nu[:, flat]  # [B, C]
        lg = torch.where(mask[:, flat], lg, -torch.inf)
        logits[:, flat] = lg
        # candidate 0 (identity, always valid) sits in the first chunk, so the max is finite
        chunk_max = lg.max(dim=1).values
        new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
        if running_max is not None:
            acc *= torch.exp(running_max - new_max)[ctx.batch].view(n, 1)
        running_max = new_max
        w = torch.exp(lg - new_max.view(b, 1))  # [B, C], unnormalized
        acc += torch.einsum("nc,cnd->nd", w[ctx.batch].to(phi.dtype), phi).to(torch.float64)
    w, ess = _softmax(logits)
    total = torch.exp(logits - running_max.view(b, 1)).sum(1)  # sum of exp(lg - max)
    out = acc / total[ctx.batch].view(n, 1)
    return OrbitEstimate(out.to(dtype), w, ess, target)
