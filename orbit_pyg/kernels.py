r"""Forward kernels ``q_t(x_t | x0)``: how noisy positions are made and how likely they are.

Two kernels share one interface:

* ``perturb(x0, alpha, sigma, eps)`` -> ``x_t`` (``alpha``/``sigma`` per node, ``[N, 1]``);
* ``log_prob_terms(xt, x0, alpha, sigma)`` -> per-coordinate log densities ``[..., N, 3]``
  (broadcast over leading candidate dimensions);
* ``score(xt, x0, alpha, sigma)`` -> ``grad_{x_t} log q_t(x_t | x0)``;
* ``log_prob_and_score(...)`` -> both, sharing the work;
* ``linear``: whether ``E[target | x_t]`` is linear in the candidate positions (Gaussian: yes,
  which lets the estimator exploit the structure of rotation orbits).

The Gaussian kernel is the one of Euclidean diffusion and flow models; the wrapped normal is the
kernel of fractional coordinates on the torus ``[0, 1)^d`` (DiffCSP).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


class GaussianKernel:
    r"""Isotropic Gaussian kernel ``x_t = alpha * x0 + sigma * eps``,

    ``log q(x_t | x0) = sum_d [ -(x_t - alpha x0)_d^2 / (2 sigma^2) - log sigma - log(2 pi) / 2 ]``,
    ``score = -(x_t - alpha x0) / sigma^2``.

    Example:
        >>> k = GaussianKernel()
        >>> x0 = torch.zeros(2, 3); xt = torch.ones(2, 3)
        >>> k.score(xt, x0, torch.ones(2, 1), torch.ones(2, 1))[0].tolist()
        [-1.0, -1.0, -1.0]
    """

    linear = True

    def perturb(self, x0: Tensor, alpha: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
        return alpha * x0 + sigma * eps

    def log_prob_terms(self, xt: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        z = (xt - alpha * x0) / sigma
        return -0.5 * z * z - torch.log(sigma) - 0.5 * _LOG_2PI

    def score(self, xt: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return -(xt - alpha * x0) / sigma**2

    def log_prob_and_score(self, xt: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Both in one pass."""
        z = (xt - alpha * x0) / sigma
        return -0.5 * z * z - torch.log(sigma) - 0.5 * _LOG_2PI, -z / sigma

    def __repr__(self) -> str:
        return "GaussianKernel()"


class WrappedNormalKernel:
    r"""Wrapped normal on the torus ``[0, 1)^d``: ``x_t = (x0 + sigma * eps) mod 1`` (``alpha`` is
    ignored: fractional coordinates are not scaled).

    With ``d = x_t - x0`` per coordinate, the density is the periodic sum

    ``WN(d; sigma) = sum_n N(d + n; 0, sigma^2) = 1 + 2 sum_{k>=1} exp(-2 pi^2 sigma^2 k^2) cos(2 pi k d)``.

    Both series are exact; each is evaluated where it converges fast, so the density is accurate
    from ``sigma = 1e-4`` to ``sigma = 10`` and beyond:

    * ``sigma < switch`` (0.3): image sum over ``n`` in ``[-n_images, n_images]`` around the wrapped
      difference in ``[-1/2, 1/2)``, taken relative to its largest term so that it needs no
      log-sum-exp (truncation error < exp(-33));
    * ``sigma >= switch``: Fourier (theta-function) series with ``k <= n_fourier``
      (truncation error < exp(-28)); the sum is bounded below by 0.66 there, so its log is safe.

    The score is ``d/dx_t log WN(x_t - x0; sigma)``, periodic in ``x_t``.

    Example:
        >>> k = WrappedNormalKernel()
        >>> x0 = torch.zeros(1, 3); xt = torch.full((1, 3), 0.5)
        >>> bool(k.score(xt, x0, None, torch.full((1, 1), 0.1)).abs().max() < 1e-6)  # antipode
        True
    """

    linear = False

    def __init__(self, switch: float = 0.3, n_images: int = 3, n_fourier: int = 4):
        self.switch, self.n_images, self.n_fourier = float(switch), int(n_images), int(n_fourier)

    def perturb(self, x0: Tensor, alpha, sigma: Tensor, eps: Tensor) -> Tensor:
        return torch.remainder(x0 + sigma * eps, 1.0)

    @staticmethod
    def _wrap(d: Tensor) -> Tensor:
        return d - torch.round(d)

    def _images(self, d: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Image sum relative to its largest (``n = 0``) term: ``(log WN, score)``.

        For ``|d| <= 1/2`` and ``n != 0``, ``(d + n)^2 - d^2 = n^2 + 2 d n >= n^2 - |n|``, so every
        other image enters as ``exp(-(n^2 + 2 d n) / (2 sigma^2)) <= 1`` (no log-sum-exp needed), and
        images with ``(n^2 - n) / (2 sigma_max^2) > 40`` are below ``e^-40`` and skipped: at the
        DiffCSP noise levels (sigma < 0.15) only ``n = ±1`` is evaluated.
        """
        q = 0.5 / sigma**2
        q_min = float(q.min()) if q.numel() else 0.0
        total = torch.ones_like(d)
        moment = torch.zeros_like(d)  # sum_n n * term_n
        dq = d * q
        for n in range(1, self.n_images + 1):
            if n > 1 and (n * n - n) * q_min > 40:
                break
            # exponents clamped at -80: e^-80 is negligible next to the n = 0 term, and it keeps
            # exp out of subnormal results, which are an order of magnitude slower on x86
            plus = torch.exp((-2 * n * dq - n * n * q).clamp_(min=-80.0))
            minus = torch.exp((2 * n * dq - n * n * q).clamp_(min=-80.0))
            total += plus + minus
            moment += n * (plus - minus)
        log_density = torch.log(total).sub_(dq * d).sub_(torch.log(sigma) + 0.5 * _LOG_2PI)
        score = (d + moment / total).mul_(-2 * q)
        return log_density, score

    def _fourier(self, d: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Theta series: ``(log WN, score)``; terms below ``e^-40`` are skipped."""
        value = torch.ones_like(d)
        deriv = torch.zeros_like(d)
        s2_min = float((sigma**2).min()) if sigma.numel() else 0.0
        for k in range(1, self.n_fourier + 1):
            if k > 1 and 2 * math.pi**2 * k * k * s2_min > 40:
                break
            decay = torch.exp(-2 * math.pi**2 * k * k * sigma**2)
            phase = 2 * math.pi * k * d
            value += 2 * decay * torch.cos(phase)
            deriv -= 4 * math.pi * k * decay * torch.sin(phase)
        return torch.log(value), deriv / value

    def _series(self, d: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return self._images(d, sigma) if bool((sigma < self.switch).all()) else self._fourier(d, sigma)

    def _bands(self, sigma: Tensor) -> Tensor:
        """Band of each sigma: 0 needs only the images ``n = ±1``, 1 more images, 2 the theta series."""
        one_image = math.sqrt(0.5 * (2 * 2 - 2) / 40)  # images |n| >= 2 are below e^-40 under this sigma
        return (sigma >= one_image).long() + (sigma >= self.switch).long()

    def _evaluate(self, xt: Tensor, x0: Tensor, sigma, which: Optional[int]):
        d = self._wrap(xt - x0)
        sigma = torch.as_tensor(sigma, dtype=d.dtype, device=d.device)
        shape = torch.broadcast_shapes(d.shape, sigma.shape)
        d = d.expand(shape)
        bands = self._bands(sigma)
        if bool((bands == bands.reshape(-1)[0]).all()):  # one band: evaluate in place
            both = self._series(d.contiguous(), sigma)
        else:  # noise levels differ (per graph): each band on its own slice, with its own series
            both = self._banded(d, sigma, bands, shape)
        both = tuple(v.expand(shape) for v in both)
        return both if which is None else both[which]

    def _banded(self, d: Tensor, sigma: Tensor, bands: Tensor, shape) -> tuple[Tensor, Tensor]:
        """Evaluate per band, slicing along the axis that sigma varies on (nodes, typically)."""
        varying = [i for i in range(sigma.dim()) if sigma.size(i) > 1]
        if len(varying) == 1:  # e.g. sigma [N, 1] against d [C, N, 3]: select nodes, not elements
            axis = varying[0] - sigma.dim()
            out = (torch.empty(shape, dtype=d.dtype, device=d.device), torch.empty(shape, dtype=d.dtype, device=d.device))
            band_of = bands.reshape(-1)
            for band in band_of.unique().tolist():
                idx = (band_of == band).nonzero().squeeze(1)
                for o, part in zip(out, self._series(d.index_select(axis, idx), sigma.index_select(axis, idx))):
                    o.index_copy_(axis, idx, part)
            return out
        d_flat, s_flat = d.reshape(-1), sigma.expand(shape).reshape(-1)
        band_flat = bands.expand(shape).reshape(-1)
        out = (torch.empty_like(d_flat), torch.empty_like(d_flat))
        for band in band_flat.unique().tolist():
            idx = (band_flat == band).nonzero().squeeze(1)
            for o, part in zip(out, self._series(d_flat[idx], s_flat[idx])):
                o[idx] = part
        return tuple(v.view(shape) for v in out)

    def log_prob_terms(self, xt: Tensor, x0: Tensor, alpha, sigma: Tensor) -> Tensor:
        return self._evaluate(xt, x0, sigma, 0)

    def score(self, xt: Tensor, x0: Tensor, alpha, sigma: Tensor) -> Tensor:
        return self._evaluate(xt, x0, sigma, 1)

    def log_prob_and_score(self, xt: Tensor, x0: Tensor, alpha, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Both at the cost of one evaluation of the series."""
        return self._evaluate(xt, x0, sigma, None)

    def __repr__(self) -> str:
        return f"WrappedNormalKernel(switch={self.switch}, n_images={self.n_images}, n_fourier={self.n_fourier})"
