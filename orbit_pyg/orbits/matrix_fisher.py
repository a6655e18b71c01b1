r"""The matrix Fisher distribution on SO(3): normalizer and mean in closed form (1-D quadrature).

For a Gaussian kernel and the action ``(R ∘ y)_i = R y_i``,

``log q(x_t | R y) = const + (alpha / sigma^2) sum_i x_t,iᵀ R y_i = const + tr(Fᵀ R)``,
``F = (alpha / sigma^2) sum_i x_t,i y_iᵀ``

(``||R y||`` does not depend on ``R``). Under the Haar prior, ``R`` given ``(x_t, y)`` is therefore
**matrix Fisher** with density ``exp(tr(Fᵀ R)) / c(F)`` w.r.t. normalized Haar measure.

With the *proper* SVD ``F = U diag(s_1, s_2, s_3) Vᵀ`` (``U, V`` in SO(3), ``s_1 >= s_2 >= |s_3|``,
``s_3`` carrying the sign of ``det F``), ``c(F) = c(s)`` and, for any ordering ``(i, j, k)`` of
``(1, 2, 3)`` (Wood 1993; Lee 2018, "Bayesian attitude estimation with the matrix Fisher
distribution on SO(3)"),

``c(s) = ∫_{-1}^{1} ½ I0(½(s_i − s_j)(1 − u)) I0(½(s_i + s_j)(1 + u)) exp(s_k u) du``,

``E[R] = U diag(d_1, d_2, d_3) Vᵀ``, ``d_k = ∂ log c / ∂ s_k = E[u]`` under the integrand of the
form with ``s_k`` in the exponential. ``c(0) = 1``, and as ``s -> ∞`` (vanishing noise)
``d -> (1, 1, 1)``: ``E[R] -> U Vᵀ``, the Kabsch rotation.

**Numerics.** Everything runs in float64 with exponentially scaled Bessel functions
(``torch.special.i0e``); the integrand is taken relative to its value ``exp(2b + s_k)`` at
``u = 1`` (``a = ½|s_i − s_j|``, ``b = ½|s_i + s_j|``), where it decays like ``exp(−λ(1 − u))``,
``λ = s_k + b − a >= 0``. Features sit at distances ``1/λ``, ``1/a``, ``1/b`` from the ends
``u = ±1``, and at low noise these are ~``1e-10``. So the interval is split at ``u = 0`` and each
half is integrated in the log-distance to its end, ``v = |1 ∓ u| = e^w``: every scale gets the same
number of nodes. Below ``v_tail = 1e-3 / (1 + λ + a + b)`` (three decades under the finest scale) the
integrand is a low-order polynomial in ``v`` and 2-point Gauss–Legendre in ``v`` takes it; from
``v_tail`` to ``v_hi`` (``min(1, 60 / λ)`` on the ``u -> 1`` half, beyond which the integrand is below
``e^-60``; ``1`` on the other) composite Gauss–Legendre in ``w``, ``NODES`` nodes per panel of at
most ``PANEL_WIDTH`` nats. ``1 − d_k = E[1 − u]`` is accumulated directly so that ``d_k`` near 1
keeps full precision. Only the form with ``s_3`` in the exponential is integrated: ``d_1, d_2`` come
from the same nodes through ``∂ log I0(x) = I1(x) / I0(x) ∂x``. At high noise (``s_1 <= SMALL``) the
integrand is entire and varies on scale ``1 / s_1``, and plain ``SMALL_NODES``-point Gauss–Legendre on
``[-1, 1]`` is exact to rounding. Measured against 20-digit ``mpmath`` quadrature for singular values from 0
to ``1e12``, degenerate spectra included: relative error of ``log c`` below ``1e-14``, absolute
error of ``d`` below ``1e-14`` (``tests/test_exact_rotation.py``). A single Gauss–Legendre rule over
the whole log range converges slowly (the integrand is analytic only in a strip of half-width
``pi/2`` about the real ``w`` axis): 64 nodes left errors of ``2e-8``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch import Tensor

#: Gauss–Legendre nodes per panel.
NODES = 32
#: widest panel in ``log v`` (nats).
PANEL_WIDTH = 10.0
#: spectra with ``s_1 <= SMALL`` use plain Gauss–Legendre with ``SMALL_NODES`` nodes on ``[-1, 1]``.
SMALL = 16.0
SMALL_NODES = 32
#: the log-range starts at ``TAIL / (1 + λ + a + b)``, 3 decades below the integrand's finest scale.
TAIL = 1e-3


@lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _nodes(n: int, device) -> tuple[Tensor, Tensor]:
    x, w = _gauss_legendre(n)
    return (torch.as_tensor(x, dtype=torch.float64, device=device), torch.as_tensor(w, dtype=torch.float64, device=device))


def proper_svd(f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``F = U diag(s) Vᵀ`` with ``U, V`` in SO(3), ``s_1 >= s_2 >= |s_3|``, ``sign(s_3) = sign(det F)``.

    Returns ``(U, s, V)`` for ``F [..., 3, 3]`` (``V``, not ``Vᵀ``).

    Example:
        >>> f = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
        >>> u, s, v = proper_svd(f)
        >>> s.tolist(), bool(torch.allclose(u @ torch.diag_embed(s) @ v.mT, f))
        ([3.0, 2.0, -1.0], True)
    """
    u, s, vh = torch.linalg.svd(f.to(torch.float64))
    v = vh.mT
    du, dv = torch.sign(torch.linalg.det(u)), torch.sign(torch.linalg.det(v))
    du = torch.where(du == 0, torch.ones_like(du), du)
    dv = torch.where(dv == 0, torch.ones_like(dv), dv)
    u = torch.cat([u[..., :2], u[..., 2:] * du[..., None, None]], -1)  # flip the last singular vectors
    v = torch.cat([v[..., :2], v[..., 2:] * dv[..., None, None]], -1)
    s = torch.stack([s[..., 0], s[..., 1], s[..., 2] * du * dv], -1)
    return u, s, v


def matrix_fisher_moments(
    s: Tensor, nodes: int = NODES, panel_width: float = PANEL_WIDTH, panels: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """``log c(s)`` and ``d = ∇_s log c(s)`` for proper singular values ``s [..., 3]`` (float64).

    See the module docstring for the integral and its quadrature. Spectra with ``s_1 <= SMALL``
    (high noise) use plain ``SMALL_NODES``-point Gauss–Legendre on ``[-1, 1]`` (the integrand is entire
    and varies on scale ``1 / s_1``); the others the log-scale rule, whose ``panels`` (per half)
    default to the widest log-range among them divided by ``panel_width``. Passing ``panels`` forces
    the log-scale rule everywhere.

    Example:
        >>> log_c, d = matrix_fisher_moments(torch.zeros(1, 3, dtype=torch.float64))
        >>> abs(float(log_c)) < 1e-12, d.abs().max().item() < 1e-12  # uniform: c = 1, E[R] = 0
        (True, True)
    """
    s = s.to(torch.float64)
    if panels is not None:
        return _moments_log_scale(s, nodes, panel_width, panels)
    small = s[..., 0] <= SMALL
    if bool(small.all()):
        return _moments_plain(s)
    if not bool(small.any()):
        return _moments_log_scale(s, nodes, panel_width, None)
    log_c = torch.empty(s.shape[:-1], dtype=torch.float64, device=s.device)
    d = torch.empty_like(s)
    log_c[small], d[small] = _moments_plain(s[small])
    log_c[~small], d[~small] = _moments_log_scale(s[~small], nodes, panel_width, None)
    return log_c, d


def _form(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``a, b, λ, ref`` of the form with ``s_3`` in the exponential (``s_1 >= s_2 >= |s_3|`` makes
    ``a, b, λ = s_2 + s_3 >= 0``); ``ref = 2b + s_3`` is the log of the exponential part at ``u = 1``."""
    s1, s2, s3 = s.unbind(-1)
    a, b = (0.5 * (s1 - s2)).clamp(min=0.0), (0.5 * (s1 + s2)).clamp(min=0.0)
    return a, b, (s3 + b - a).clamp(min=0.0), 2 * b + s3


def _moments_plain(s: Tensor) -> tuple[Tensor, Tensor]:
    a, b, lam, ref = _form(s)
    u, gw = _nodes(SMALL_NODES, s.device)
    return _integrate(torch.log(gw), 1 - u, 1 + u, a, b, lam, ref)


def _moments_log_scale(s: Tensor, nodes: int, panel_width: float, panels: Optional[int]) -> tuple[Tensor, Tensor]:
    a, b, lam, ref = _form(s)
    x, gw = _nodes(nodes, s.device)
    # below v_tail every factor is a low-order polynomial in v on its own scale: 2-point GL there
    v_tail = TAIL / (1 + lam + a + b)
    v_hi = torch.minimum(torch.ones_like(lam), 60.0 / lam.clamp(min=1e-300)).clamp(min=2 * TAIL)
    if panels is None:
        span = float(torch.log(1 / v_tail.detach()).max()) if v_tail.numel() else 1.0
        panels = max(1, math.ceil(span / panel_width))
    x2, gw2 = _nodes(2, s.device)

    def half(hi: Tensor) -> tuple[Tensor, Tensor]:
        """Nodes ``v`` and log weights: linear GL on ``[0, v_tail]``, composite GL in ``log v`` above."""
        llo, lhi = torch.log(v_tail).unsqueeze(-1), torch.log(hi).unsqueeze(-1)
        width = (lhi - llo) / panels
        left = llo + width * torch.arange(panels, dtype=torch.float64, device=s.device)  # [..., P]
        w = (left.unsqueeze(-1) + 0.5 * width.unsqueeze(-1) * (x + 1)).flatten(-2)  # [..., P * Q]
        tail_v = 0.5 * v_tail.unsqueeze(-1) * (x2 + 1)
        v = torch.cat([tail_v, torch.exp(w)], -1)
        log_w = torch.cat([torch.log(0.5 * v_tail).unsqueeze(-1) + torch.log(gw2),
                           torch.log(0.5 * width) + torch.log(gw).repeat(panels) + w], -1)
        return v, log_w

    v, lw = half(v_hi)  # u -> +1 half: 1 - u = v
    v2, lw2 = half(torch.ones_like(v_hi))  # u -> -1 half: 1 + u = v2
    one_minus_u, one_plus_u = torch.cat([v, 2 - v2], -1), torch.cat([2 - v, v2], -1)
    return _integrate(torch.cat([lw, lw2], -1), one_minus_u, one_plus_u, a, b, lam, ref)


def _integrate(log_w, one_minus_u, one_plus_u, a, b, lam, ref) -> tuple[Tensor, Tensor]:
    """``log c`` and ``d`` from quadrature nodes (``1 ∓ u``) and log weights, ``[..., nodes]``."""
    xa, xb = a.unsqueeze(-1) * one_minus_u, b.unsqueeze(-1) * one_plus_u
    ia0, ib0 = torch.special.i0e(xa), torch.special.i0e(xb)
    log_terms = log_w + torch.log(ia0 * ib0) - lam.unsqueeze(-1) * one_minus_u
    lse = torch.logsumexp(log_terms, -1)
    # clamped: below e^-700 a weight is 0 for the sum, and subnormal results slow every later op ~20x
    p = torch.exp((log_terms - lse.unsqueeze(-1)).clamp_(min=-700.0))
    # d_k = E[∂_k log integrand]; with r = I1 / I0, ∂_1 = ½(1−u) r(a(1−u)) + ½(1+u) r(b(1+u)),
    # ∂_2 = −½(1−u) r(a(1−u)) + ½(1+u) r(b(1+u)), ∂_3 = u. 1 − d_k is accumulated (d_k -> 1 at low noise).
    ga = 0.5 * one_minus_u * (torch.special.i1e(xa) / ia0)
    gb = 0.5 * one_plus_u * (1 - torch.special.i1e(xb) / ib0)
    half_minus = 0.5 * one_minus_u
    rest = torch.stack([(gb + half_minus - ga).expand_as(p), (gb + half_minus + ga).expand_as(p),
                        one_minus_u.expand_as(p)], -2)  # [..., 3, nodes]
    d = 1 - (p.unsqueeze(-2) * rest).sum(-1)
    return math.log(0.5) + ref + lse, d


def log_normalizer_bounds(s: Tensor) -> tuple[Tensor, Tensor]:
    """Cheap bounds ``lower <= log c(s) <= upper`` for proper singular values ``s [..., 3]``.

    ``upper = s_1 + s_2 + s_3`` (the maximum of ``tr(diag(s) R)``); ``lower`` keeps only
    ``u in [1 − δ, 1]`` of the integral with ``δ = 1 / (1 + b + |s_3|)``, ``b = (s_1 + s_2) / 2``, and
    bounds the integrand there from below (``I0 >= 1``, ``I0`` increasing). The gap is about
    ``log(s)``; the estimator uses them to skip candidates that cannot carry weight.

    Example:
        >>> lo, hi = log_normalizer_bounds(torch.tensor([[5.0, 3.0, 1.0]], dtype=torch.float64))
        >>> log_c, _ = matrix_fisher_moments(torch.tensor([[5.0, 3.0, 1.0]], dtype=torch.float64))
        >>> bool(lo <= log_c <= hi)
        True
    """
    s = s.to(torch.float64)
    b = 0.5 * (s[..., 0] + s[..., 1])
    s3 = s[..., 2]
    delta = 1 / (1 + b + s3.abs())
    arg = b * (2 - delta)
    lower = torch.log(delta / 2) + arg + torch.log(torch.special.i0e(arg)) + s3 - s3.abs() * delta
    return lower, s.sum(-1)


def matrix_fisher_mean(f: Tensor, nodes: int = NODES, panels: Optional[int] = None) -> tuple[Tensor, Tensor]:
    r"""``log c(F)`` (``[...]``) and ``E[R]`` (``[..., 3, 3]``) of the matrix Fisher distribution with
    parameter ``F [..., 3, 3]`` (density ``exp(tr(Fᵀ R)) / c(F)`` w.r.t. normalized Haar measure).

    Example:
        >>> f = torch.diag(torch.tensor([1e9, 1e9, 1e9], dtype=torch.float64))  # vanishing noise
        >>> log_c, mean = matrix_fisher_mean(f)
        >>> bool(torch.allclose(mean, torch.eye(3, dtype=torch.float64), atol=1e-8))
        True
    """
    u, s, v = proper_svd(f)
    log_c, d = matrix_fisher_moments(s, nodes, panels=panels)
    return log_c, u @ (d.unsqueeze(-1) * v.mT)
