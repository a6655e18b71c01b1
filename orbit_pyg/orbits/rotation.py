r"""Rotation orbits SO(3) and O(3) on centred Cartesian positions, with uniform and guided proposals.

A rotation acts on every node of a graph: ``(R ∘ x)_i = R · x_i``. Positions must be centred per
graph (the centre of mass is projected out, never sampled).

**Uniform (Haar) proposal.** Unit quaternions ``q = n / |n|``, ``n ~ N(0, I_4)``, are uniform on
``S^3``, and so their rotations are Haar-distributed on SO(3). ``log nu = 0``.

**Guided proposal.** For the Gaussian kernel, ``log q(x_t | R y) = const + (alpha / sigma^2) <R, M>_F``
with ``M = sum_i x_t,i y_iᵀ``. The posterior mode is the Kabsch rotation ``R* = U diag(1, 1, det(U Vᵀ)) Vᵀ``
(``M = U S Vᵀ``). The guided proposal draws ``R = R* exp([ω]×)`` with ``ω ~ N(0, tau^2 I_3)`` in the
tangent space; its density with respect to (normalized) Haar measure, as a function of the angle
``theta`` of ``R*ᵀ R``, is exact (all preimages of the exponential map summed):

``rho_tau(theta) = 4 pi^2 (2 pi tau^2)^{-3/2} sum_{k in Z} (theta + 2 pi k)^2 exp(-(theta + 2 pi k)^2 / (2 tau^2)) / (1 - cos theta)``.

The width follows the posterior: rotating by ``epsilon`` about the loosest principal axis lowers the
log-likelihood by ``(alpha / sigma^2)(s_2 + s_3) epsilon^2 / 2`` (proper singular values
``s_1 >= s_2 >= s_3`` of ``M``), so ``tau = width / sqrt((alpha / sigma^2)(s_2 + s_3))``, clipped to
``[0, tau_max]``. A fraction ``uniform_fraction`` of the samples is drawn from Haar instead
(defensive mixture), so the importance weight uses the mixture density
``nu(R) = lambda + (1 - lambda) rho_tau(angle(R*ᵀ R))``; every region of SO(3) keeps mass and the
weights stay bounded by ``1 / lambda``.

**O(3)** = SO(3) × {I, −I}: half of the candidates are proper rotations, half are improper
(``−R``), each half with its own Kabsch centre (of ``M`` and of ``−M``).

**Exact.** No samples: under the Haar prior the posterior over SO(3) is matrix Fisher with
parameter ``F = (alpha / sigma^2) M`` (``M = sum_i x_t,i y_iᵀ``), whose normalizer ``c(F)`` and mean
``E[R]`` are 1-D integrals (:mod:`orbit_pyg.orbits.matrix_fisher`). The candidates are the coset
representatives (``{I}``, or ``{I, −I}`` for O(3)) flagged ``exact_linear``; the estimator scores
each (permutation, coset) pair by ``log c(M_P Aᵀ)`` and uses ``E[R] A P x0`` as its target.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .base import Orbit, OrbitCandidates, OrbitContext
from .matrix_fisher import proper_svd

_PROPOSALS = ("uniform", "guided", "exact")


# --- SO(3) math -----------------------------------------------------------------------------
def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (w, x, y, z) to rotation matrices ``[..., 3, 3]``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(q.shape[:-1] + (3, 3))


def random_rotations(
    shape: tuple[int, ...], generator: Optional[torch.Generator] = None, dtype=torch.float64, device=None
) -> Tensor:
    """Haar-uniform rotation matrices of shape ``[*shape, 3, 3]`` (uniform unit quaternions)."""
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    return quaternion_to_matrix(q)


def axis_angle_to_matrix(omega: Tensor) -> Tensor:
    """Rodrigues' formula ``exp([ω]×)`` for ``omega [..., 3]``, stable at small angles."""
    theta = omega.norm(dim=-1, keepdim=True).unsqueeze(-1)  # [..., 1, 1]
    k = skew(omega)
    small = theta < 1e-4
    t2 = theta * theta
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1 - t2 / 6, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - t2 / 24, (1 - torch.cos(safe)) / (safe * safe))
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def skew(v: Tensor) -> Tensor:
    """The cross-product matrix ``[v]×`` of ``v [..., 3]``."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(v.shape[:-1] + (3, 3))


def rotation_angle(r: Tensor) -> Tensor:
    """Angle in ``[0, pi]`` of rotation matrices ``[..., 3, 3]`` (``atan2``: accurate near 0 and pi)."""
    cos = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    vee = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    sin = vee.norm(dim=-1) / 2
    return torch.atan2(sin, cos)


def kabsch(m: Tensor) -> tuple[Tensor, Tensor]:
    """Proper rotation maximizing ``<R, M>_F`` for ``M [..., 3, 3]``, and the proper singular values.

    Returns ``(R*, s)`` with ``s = (s_1, s_2, ±s_3)``, the sign of ``s_3`` that of ``det M``:
    ``R* = U Vᵀ`` from the proper SVD ``M = U diag(s) Vᵀ`` (:func:`~.matrix_fisher.proper_svd`,
    computed in float64; results in the dtype of ``m``).

    Example:
        >>> m = torch.diag(torch.tensor([3.0, 2.0, -1.0]))  # det M < 0: s_3 carries the sign
        >>> r, s = kabsch(m)
        >>> r.diagonal().tolist(), s.tolist()
        ([1.0, 1.0, 1.0], [3.0, 2.0, -1.0])
    """
    u, s, v = proper_svd(m)
    return (u @ v.mT).to(m.dtype), s.to(m.dtype)


def log_tangent_gaussian_density(theta: Tensor, tau: Tensor, wraps: int = 2) -> Tensor:
    """Log density w.r.t. normalized Haar measure of ``R* exp([ω]×)``, ``ω ~ N(0, tau² I)``, at angle ``theta``.

    Exact up to the truncation of the sum over ``k`` in ``[-wraps, wraps]`` (``tau <= 2`` keeps the
    neglected terms below ``exp(-(4 pi)^2 / 8) ~ 3e-9`` relative).
    """
    theta = theta.clamp(min=1e-12, max=math.pi)
    k = torch.arange(-wraps, wraps + 1, dtype=theta.dtype, device=theta.device)
    r = theta.unsqueeze(-1) + 2 * math.pi * k
    tau_ = tau.unsqueeze(-1)
    # 1 - cos(theta) = 2 sin^2(theta / 2); the k = 0 term's ratio theta^2 / (1 - cos theta) stays finite.
    log_one_minus_cos = math.log(2) + 2 * torch.log(torch.sin(theta / 2)).unsqueeze(-1)
    log_terms = 2 * torch.log(r.abs().clamp(min=1e-300)) - 0.5 * (r / tau_) ** 2 - log_one_minus_cos
    return (
        math.log(4 * math.pi**2)
        - 1.5 * torch.log(2 * math.pi * tau**2)
        + torch.logsumexp(log_terms, dim=-1)
    )


# --- orbits ---------------------------------------------------------------------------------
def second_moment(xt: Tensor, y: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """``M_b = sum_{i in b} xt_i y_iᵀ`` in float64, for ``y [..., N, 3]``: ``[..., B, 3, 3]``."""
    outer = xt.to(torch.float64).unsqueeze(-1) * y.to(torch.float64).unsqueeze(-2)  # [..., N, 3, 3]
    out = outer.new_zeros(outer.shape[:-3] + (num_graphs, 3, 3))
    return out.index_add_(outer.dim() - 3, batch, outer)


class SO3(Orbit):
    """The rotation group SO(3) acting on centred positions.

    Args:
        num_candidates: candidates per graph, the identity included (``K``).
        proposal: ``"uniform"`` (Haar, the paper's scheme), ``"guided"`` or ``"exact"`` (closed-form
            matrix Fisher marginal, no samples: ``num_candidates`` is ignored; see module docstring).
        uniform_fraction: share of Haar samples in the guided mixture (``lambda``).
        width: guided width relative to the posterior's angular scale.
        tau_max: largest tangent-space standard deviation of the guided proposal.

    Example:
        >>> import torch
        >>> from orbit_pyg.orbits import SO3, OrbitContext
        >>> x = torch.randn(5, 3, dtype=torch.float64); x = x - x.mean(0)
        >>> ctx = OrbitContext(x0=x, xt=x, batch=torch.zeros(5, dtype=torch.long), num_graphs=1,
        ...                    alpha=torch.ones(1, dtype=torch.float64), sigma=torch.ones(1, dtype=torch.float64))
        >>> SO3(num_candidates=8).candidates(ctx).linear.shape
        torch.Size([1, 8, 3, 3])
    """

    needs_centering = True
    improper = False

    def __init__(
        self,
        num_candidates: int = 200,
        proposal: str = "uniform",
        uniform_fraction: float = 0.25,
        width: float = 1.5,
        tau_max: float = 2.0,
    ):
        if int(num_candidates) < 1:
            raise ValueError(f"`num_candidates` must be >= 1, got {num_candidates}")
        if proposal not in _PROPOSALS:
            raise ValueError(f"unknown proposal {proposal!r}: use one of {_PROPOSALS}")
        if not 0 < uniform_fraction <= 1:
            raise ValueError(f"`uniform_fraction` must lie in (0, 1], got {uniform_fraction}")
        self.num_candidates = int(num_candidates)
        self.proposal = proposal
        self.uniform_fraction = float(uniform_fraction)
        self.width, self.tau_max = float(width), float(tau_max)

    def _repr_args(self) -> dict:
        if self.proposal == "exact":
            return {"proposal": "exact"}
        args = {"num_candidates": self.num_candidates, "proposal": self.proposal}
        if self.proposal == "guided":
            args["uniform_fraction"] = self.uniform_fraction
        return args

    def _sample(self, m: Tensor, scale: Tensor, k: int, generator) -> tuple[Tensor, Tensor]:
        """``k`` proper rotations per graph and their log density w.r.t. Haar (``[B, k, 3, 3]``, ``[B, k]``)."""
        b = m.size(0)
        haar = random_rotations((b, k), generator, dtype=torch.float64, device=m.device)
        if self.proposal == "uniform":
            return haar, haar.new_zeros(b, k)
        center, s = kabsch(m)
        tau = self._tau(s, scale)
        omega = torch.randn(b, k, 3, generator=generator, dtype=torch.float64, device=m.device)
        omega = omega * tau.view(b, 1, 1)
        guided = center.unsqueeze(1) @ axis_angle_to_matrix(omega)
        use_haar = torch.rand(b, k, generator=generator, dtype=torch.float64, device=m.device) < self.uniform_fraction
        rot = torch.where(use_haar.view(b, k, 1, 1), haar, guided)
        # Angle of center^T R: from omega for guided draws (exact), from the matrix for Haar draws.
        wrapped = torch.remainder(omega.norm(dim=-1), 2 * math.pi)
        theta_guided = torch.where(wrapped > math.pi, 2 * math.pi - wrapped, wrapped)
        theta_haar = rotation_angle(center.transpose(-1, -2).unsqueeze(1) @ haar)
        theta = torch.where(use_haar, theta_haar, theta_guided)
        log_nu = self._mixture_log_density(theta, tau.view(b, 1).expand(b, k))
        return rot, log_nu

    def _mixture_log_density(self, theta: Tensor, tau: Tensor) -> Tensor:
        lam = self.uniform_fraction
        if lam >= 1:
            return torch.zeros_like(theta)
        return torch.logaddexp(
            torch.full_like(theta, math.log(lam)),
            math.log1p(-lam) + log_tangent_gaussian_density(theta, tau),
        )

    def _identity_log_nu(self, m: Tensor, scale: Tensor) -> Tensor:
        if self.proposal == "uniform":
            return m.new_zeros(m.size(0))
        center, s = kabsch(m)
        return self._mixture_log_density(rotation_angle(center), self._tau(s, scale))

    def _tau(self, s: Tensor, scale: Tensor) -> Tensor:
        """``width / sqrt(scale (s_2 + s_3))`` clipped to ``(0, tau_max]``; ``tau_max`` where the precision
        is not positive (a flat posterior, e.g. ``M = 0`` for a single-atom graph, whose SVD can return
        ``-0.0`` singular values: ``1 / sqrt(-0.0) = -inf`` must not reach the density)."""
        precision = scale * (s[:, 1] + s[:, 2])
        flat = ~(precision > 0)
        tau = self.width / torch.where(flat, torch.ones_like(precision), precision).sqrt()
        return torch.where(flat, torch.full_like(tau, self.tau_max), tau).clamp(min=1e-300, max=self.tau_max)

    def _moment(self, ctx: OrbitContext) -> tuple[Tensor, Tensor]:
        if ctx.xt is None or ctx.alpha is None or ctx.sigma is None:
            raise ValueError("SO3.candidates needs xt, alpha and sigma in the context")
        m = second_moment(ctx.xt, ctx.x0, ctx.batch, ctx.num_graphs)
        scale = ctx.alpha / ctx.sigma.clamp(min=1e-12) ** 2
        return m, scale

    def _exact(self, ctx: OrbitContext, cosets: Tensor) -> OrbitCandidates:
        """Coset representatives ``[B, k, 3, 3]`` flagged for closed-form marginalization."""
        linear = cosets.to(device=ctx.x0.device).expand(ctx.num_graphs, -1, -1, -1)
        return OrbitCandidates(ctx.num_graphs, linear=linear, exact_linear=True)

    def candidates(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        if self.proposal == "exact":
            return self._exact(ctx, torch.eye(3, dtype=torch.float64).unsqueeze(0))
        m, scale = self._moment(ctx)
        b = ctx.num_graphs
        eye = torch.eye(3, dtype=torch.float64, device=m.device).expand(b, 1, 3, 3)
        rot, log_nu = self._sample(m, scale, self.num_candidates - 1, generator)
        linear = torch.cat([eye, rot], 1)
        log_nu = torch.cat([self._identity_log_nu(m, scale).unsqueeze(1), log_nu], 1)
        return OrbitCandidates(b, linear=linear, linear_log_nu=log_nu)

    def random_element(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        rot = random_rotations((ctx.num_graphs, 1), generator, dtype=torch.float64, device=ctx.x0.device)
        return OrbitCandidates(ctx.num_graphs, linear=rot)


class O3(SO3):
    """Rotations and reflections, O(3) = SO(3) × {I, −I}, acting on centred positions.

    Half of the ``num_candidates`` (rounded down, at least one) are improper ``−R``; with the guided
    proposal each half is centred on its own Kabsch solution, so the estimator stays equivariant
    under reflections of ``x_t``. With ``proposal="exact"`` the two components are integrated in
    closed form (matrix Fisher with ``F`` and ``−F``) and weighted by their normalizers in the same
    softmax. Same arguments as :class:`SO3`.
    """

    improper = True

    def candidates(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        if self.proposal == "exact":  # the two components, each integrated in closed form
            eye = torch.eye(3, dtype=torch.float64)
            return self._exact(ctx, torch.stack([eye, -eye]))
        m, scale = self._moment(ctx)
        b = ctx.num_graphs
        k_improper = max(1, self.num_candidates // 2)
        k_proper = max(0, self.num_candidates - 1 - k_improper)
        eye = torch.eye(3, dtype=torch.float64, device=m.device).expand(b, 1, 3, 3)
        rot_p, nu_p = self._sample(m, scale, k_proper, generator)
        rot_m, nu_m = self._sample(-m, scale, k_improper, generator)
        linear = torch.cat([eye, rot_p, -rot_m], 1)
        log_nu = torch.cat([self._identity_log_nu(m, scale).unsqueeze(1), nu_p, nu_m], 1)
        # The two components were sampled in fixed shares; weight each by its share so that the
        # joint density is a proper mixture over O(3) (Haar on O(3) puts 1/2 on each component).
        # The identity counts as a draw of the proper component (it is scored with the proper
        # density), so the proper share is (1 + k_proper) / K: with a flat likelihood and uniform
        # proposals every candidate then gets the same weight.
        k_all = 1 + k_proper + k_improper
        log_nu[:, : 1 + k_proper] += math.log(2 * (1 + k_proper) / k_all)
        log_nu[:, 1 + k_proper :] += math.log(2 * k_improper / k_all)
        return OrbitCandidates(b, linear=linear, linear_log_nu=log_nu)

    def random_element(self, ctx: OrbitContext, generator=None) -> OrbitCandidates:
        cands = super().random_element(ctx, generator)
        flip = torch.rand(ctx.num_graphs, 1, generator=generator, device=ctx.x0.device) < 0.5
        sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
        cands.linear = cands.linear * sign.view(-1, 1, 1, 1)
        return cands
