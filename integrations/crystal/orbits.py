r"""Crystal orbits: fractional translations on the 3-torus and lattice-basis permutations.

Both act on fractional coordinates ``F`` (``[N, 3]`` in ``[0, 1)``), the "positions" of the crystal
estimator, with the wrapped-normal kernel (:class:`orbit_pyg.WrappedNormalKernel`).

**Fractional translation** ``f_i -> f_i + m (mod 1)`` (one shift ``m`` per crystal): the shift factor
of :class:`~orbit_pyg.orbits.OrbitCandidates`. Proposals, with densities w.r.t. the uniform
(Haar) measure on the torus:

* ``"uniform"``: ``m ~ U[0, 1)^3``, ``log nu = 0`` (the paper's "U");
* ``"wrapped_normal"``: ``m ~ WN(0, (c sigma_t)^2)`` per axis, centred on the identity, with
  ``log nu = sum_d log WN(m_d; c sigma_t)`` (the paper's "WN", ``c = 2``);
* ``"guided"``: centred on the circular-mean alignment
  ``m*_d = atan2(sum_i sin 2pi(x_t,id - x0,id), sum_i cos 2pi(x_t,id - x0,id)) / 2pi`` — the posterior
  mode for small sigma — with width ``tau = width · sigma_t / sqrt(n)`` (the posterior's width), mixed
  with uniform: ``nu(m) = lambda + (1 - lambda) prod_d WN(m_d - m*_d; tau)``;
* ``"exact"``: no samples. The wrapped-normal posterior over ``m`` factorizes into three 1-D
  posteriors, one per axis, and the score target of atom ``i`` along axis ``d`` depends on ``m_d``
  alone, so ``E[score_id] = ∫ p_d(m_d) score_WN(x_t,id − x0,id − m_d; sigma) dm_d`` is evaluated by
  quadrature (periodic trapezoid rule, or a local grid around the mode when the posterior is
  narrow; :mod:`orbit_pyg.orbits.torus_quadrature`). With lattice or species permutations each
  candidate is integrated the same way and weighted by its log-normalizer in the joint softmax.

**Lattice permutation** (EquiCSP): relabelling the basis vectors ``(a, b, c)`` leaves the crystal
unchanged: ``L -> P L`` (rows of the lattice) and ``F -> F Pᵀ`` (each ``f_i -> P f_i``); Cartesian
positions ``F L`` are unchanged. The 6 permutation matrices (or the 48 signed ones, where a sign
flips a basis vector and the matching fractional coordinate) are enumerated exactly as the linear
factor. When the batch carries the noisy lattice, each candidate also carries the lattice kernel
``log q(L_t | P L0) = -||L_t - alpha_L P L0||^2 / (2 sigma_L^2)`` as ``linear_log_lik``, so one joint
softmax covers coordinates *and* lattice and the lattice target is Rao-Blackwellized too (the
paper did not do this). Read from ``data``: ``cell`` (``L0``, ``[B, 3, 3]``), ``cell_t``, and per-graph
``lattice_alpha``, ``lattice_sigma`` (keys configurable).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor

from orbit_pyg.kernels import WrappedNormalKernel
from orbit_pyg.orbits.base import Orbit, OrbitCandidates, OrbitContext

_WN = WrappedNormalKernel()
_TORUS_PROPOSALS = ("uniform", "wrapped_normal", "guided", "exact")


def _log_wn(d: Tensor, scale: Tensor) -> Tensor:
    """``sum_d log WN(d; scale)`` over the last axis (``scale`` broadcast)."""
    scale = scale.expand_as(d)
    return _WN.log_prob_terms(d, torch.zeros_like(d), None, scale).sum(-1)


def circular_mean_shift(xt: Tensor, x0: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Per-crystal shift ``m*`` in ``[0, 1)^3`` aligning ``x0 + m`` to ``xt`` on the torus (circular mean)."""
    angle = 2 * math.pi * (xt.to(torch.float64) - x0.to(torch.float64))
    s = torch.zeros(num_graphs, 3, dtype=torch.float64, device=xt.device).index_add_(0, batch, torch.sin(angle))
    c = torch.zeros(num_graphs, 3, dtype=torch.float64, device=xt.device).index_add_(0, batch, torch.cos(angle))
    return torch.remainder(torch.atan2(s, c) / (2 * math.pi), 1.0)


class TorusTranslation(Orbit):
    """Fractional translations of a crystal on the 3-torus (see module docstring).

    Args:
        num_candidates: ``K`` per crystal, the identity (zero shift) included (the paper: 1000).
        proposal: ``"uniform"``, ``"wrapped_normal"``, ``"guided"`` or ``"exact"`` (shift integrated out
            by quadrature; ``num_candidates`` is ignored).
        scale: ``c`` of the wrapped-normal proposal (``c · sigma_t``).
        width: guided width in units of the posterior width ``sigma_t / sqrt(n)``.
        uniform_fraction: share of uniform draws in the guided mixture.
        quadrature_nodes: nodes per axis of the exact proposal's quadrature.

    Example:
        >>> import torch
        >>> from orbit_pyg import WrappedNormalKernel
        >>> from orbit_pyg.orbits import OrbitContext
        >>> f = torch.rand(5, 3, dtype=torch.float64)
        >>> ctx = OrbitContext(f, f, torch.zeros(5, dtype=torch.long), 1, torch.ones(1, dtype=torch.float64),
        ...                    torch.full((1,), 0.1, dtype=torch.float64), WrappedNormalKernel())
        >>> TorusTranslation(100, proposal="guided").candidates(ctx).shift.shape
        torch.Size([1, 100, 3])
    """

    def __init__(
        self,
        num_candidates: int = 1000,
        proposal: str = "uniform",
        scale: float = 2.0,
        width: float = 2.0,
        uniform_fraction: float = 0.25,
        quadrature_nodes: int = 64,
    ):
        if int(num_candidates) < 1:
            raise ValueError(f"`num_candidates` must be >= 1, got {num_candidates}")
        if proposal not in _TORUS_PROPOSALS:
            raise ValueError(f"unknown proposal {proposal!r}: use one of {_TORUS_PROPOSALS}")
        if not 0 < uniform_fraction <= 1:
            raise ValueError(f"`uniform_fraction` must lie in (0, 1], got {uniform_fraction}")
        self.num_candidates, self.proposal = int(num_candidates), proposal
        self.scale, self.width, self.uniform_fraction = float(scale), float(width), float(uniform_fraction)
        if int(quadrature_nodes) < 8:
            raise ValueError(f"`quadrature_nodes` must be >= 8, got {quadrature_nodes}")
        self.quadrature_nodes = int(quadrature_nodes)

    def _repr_args(self) -> dict:
        if self.proposal == "exact":
            return {"proposal": "exact"} | ({} if self.quadrature_nodes == 64 else {"quadrature_nodes": self.quadrature_nodes})
        return {"num_candidates": self.num_candidates, "proposal": self.proposal}

    def candidates(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        b, k = ctx.num_graphs, self.num_candidates - 1
        device = ctx.x0.device
        zero = torch.zeros(b, 1, 3, dtype=torch.float64, device=device)
        if self.proposal == "exact":
            return OrbitCandidates(b, shift=zero, exact_shift=self.quadrature_nodes)
        sigma = ctx.sigma.clamp(min=1e-12).view(b, 1, 1)
        uniform = torch.rand(b, k, 3, generator=generator, dtype=torch.float64, device=device)
        if self.proposal == "uniform":
            return OrbitCandidates(b, shift=torch.cat([zero, uniform], 1))
        normal = torch.randn(b, k, 3, generator=generator, dtype=torch.float64, device=device)
        if self.proposal == "wrapped_normal":
            width = self.scale * sigma
            shift = torch.cat([zero, torch.remainder(width * normal, 1.0)], 1)
            return OrbitCandidates(b, shift=shift, shift_log_nu=_log_wn(shift, width))
        if ctx.xt is None:
            raise ValueError("the guided torus proposal needs xt in the context")
        center = circular_mean_shift(ctx.xt, ctx.x0, ctx.batch, b).view(b, 1, 3)
        n = torch.bincount(ctx.batch, minlength=b).clamp(min=1).to(torch.float64).view(b, 1, 1)
        tau = (self.width * sigma / n.sqrt()).clamp(max=1.0)
        use_uniform = torch.rand(b, k, 1, generator=generator, dtype=torch.float64, device=device) < self.uniform_fraction
        guided = torch.remainder(center + tau * normal, 1.0)
        shift = torch.cat([zero, torch.where(use_uniform, uniform, guided)], 1)
        lam = self.uniform_fraction
        log_nu = torch.logaddexp(
            torch.full((b, k + 1), math.log(lam), dtype=torch.float64, device=device),
            math.log1p(-lam) + _log_wn(shift - center, tau),
        ) if lam < 1 else None
        return OrbitCandidates(b, shift=shift, shift_log_nu=log_nu)

    def random_element(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        shift = torch.rand(ctx.num_graphs, 1, 3, generator=generator, dtype=torch.float64, device=ctx.x0.device)
        return OrbitCandidates(ctx.num_graphs, shift=shift)


def lattice_permutations(signed: bool = False) -> Tensor:
    """The 6 basis permutation matrices (48 with sign flips), identity first, float64 ``[G, 3, 3]``."""
    mats = []
    eye = torch.eye(3, dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        p = eye[list(perm)]
        for signs in itertools.product((1.0, -1.0), repeat=3) if signed else [(1.0, 1.0, 1.0)]:
            mats.append(torch.tensor(signs, dtype=torch.float64).view(3, 1) * p)
    return torch.stack(mats)


class LatticePermutation(Orbit):
    """Relabellings of the lattice basis, acting on ``L`` (rows) and ``F`` (columns) together.

    Args:
        signed: the 48 signed permutations instead of the 6 permutations.
        cell_key, noisy_cell_key, alpha_key, sigma_key: batch attributes for the lattice kernel
            (``L0``, ``L_t`` and the per-graph lattice ``alpha``/``sigma``); when ``noisy_cell_key`` is
            absent the candidates carry no lattice term.

    Example:
        >>> LatticePermutation(signed=True)
        LatticePermutation(signed=True)
    """

    def __init__(
        self,
        signed: bool = False,
        cell_key: str = "cell",
        noisy_cell_key: str = "cell_t",
        alpha_key: str = "lattice_alpha",
        sigma_key: str = "lattice_sigma",
    ):
        self.signed = bool(signed)
        self.elements = lattice_permutations(self.signed)
        self.cell_key, self.noisy_cell_key = cell_key, noisy_cell_key
        self.alpha_key, self.sigma_key = alpha_key, sigma_key

    def _repr_args(self) -> dict:
        return {"signed": self.signed}

    def _lattice_log_lik(self, ctx: OrbitContext, mats: Tensor) -> Optional[Tensor]:
        data = ctx.data
        cell_t = None if data is None else getattr(data, self.noisy_cell_key, None)
        if cell_t is None:
            return None
        cell = getattr(data, self.cell_key).to(torch.float64).view(-1, 3, 3)
        alpha = torch.as_tensor(getattr(data, self.alpha_key), dtype=torch.float64, device=cell.device).view(-1, 1)
        sigma = torch.as_tensor(getattr(data, self.sigma_key), dtype=torch.float64, device=cell.device).view(-1, 1)
        if cell.size(0) != ctx.num_graphs or cell_t.reshape(-1, 3, 3).size(0) != ctx.num_graphs:
            raise ValueError(f"`{self.cell_key}` / `{self.noisy_cell_key}` must hold one 3x3 lattice per graph")
        moved = mats @ cell.unsqueeze(1)  # [B, G, 3, 3]: P L0
        resid = cell_t.to(torch.float64).view(-1, 1, 3, 3) - alpha.view(-1, 1, 1, 1) * moved
        return -resid.square().sum((-1, -2)) / (2 * sigma.clamp(min=1e-12) ** 2)

    def candidates(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        mats = self.elements.to(ctx.x0.device).expand(ctx.num_graphs, -1, -1, -1)
        return OrbitCandidates(ctx.num_graphs, linear=mats, linear_log_lik=self._lattice_log_lik(ctx, mats))

    def random_element(self, ctx: OrbitContext, generator: Optional[torch.Generator] = None) -> OrbitCandidates:
        g = self.elements.to(ctx.x0.device)
        pick = torch.randint(0, g.size(0), (ctx.num_graphs,), generator=generator, device=ctx.x0.device)
        return OrbitCandidates(ctx.num_graphs, linear=g[pick].unsqueeze(1))
