r"""Forward kernels ``q_t(x_t | x0)``: how noisy positions are made and how likely they are.

Two kernels share one interface:

* ``perturb(x0, alpha, sigma, eps)`` -> ``x_t`` (``alpha``/``sigma`` per node, ``[N, 1]``);
* ``log_prob_terms(xt, x0, alpha, sigma)`` -> per-coordinate log densities ``[..., N, 3]``
  (broadcast over leading candidate dimensions);
* ``score(xt, x0, alpha, sigma)`` -> ``grad_{x_t} log q_t(x_t | x0)``;
* ``linear``: whether ``E[target | x_t]`` is linear in the candidate positions (Gaussian: yes,
  which lets the estimator exploit the structure of rotation orbits).

The Gaussian kernel is the one of Euclidean diffusion and flow models; the wrapped normal is the
kernel of fractional coordinates on the torus ``[0, 1)^d`` (DiffCSP).
"""
from __future__ import annotations

import math

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
      difference in ``[-1/2, 1/2)``, combined with log-sum-exp (truncation error < exp(-34));
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
        """Log of each image term and ``(d + n)`` for the image sum, images on the last dim."""
        n = torch.arange(-self.n_images, self.n_images + 1, dtype=d.dtype, device=d.device)
        shifted = d.unsqueeze(-1) + n
        s = sigma.unsqueeze(-1)
        log_terms = -0.5 * (shifted / s) ** 2 - torch.log(s) - 0.5 * _LOG_2PI
        return log_terms, shifted

    def _fourier(self, d: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Theta series value and its d-derivative."""
        k = torch.arange(1, self.n_fourier + 1, dtype=d.dtype, device=d.device)
        s = sigma.unsqueeze(-1)
        decay = torch.exp(-2 * math.pi**2 * (s * k) ** 2)
        phase = 2 * math.pi * k * d.unsqueeze(-1)
        value = 1 + 2 * (decay * torch.cos(phase)).sum(-1)
        deriv = -4 * math.pi * (k * decay * torch.sin(phase)).sum(-1)
        return value, deriv

    def log_prob_terms(self, xt: Tensor, x0: Tensor, alpha, sigma: Tensor) -> Tensor:
        d = self._wrap(xt - x0)
        sigma = torch.as_tensor(sigma, dtype=d.dtype, device=d.device).expand_as(d)
        small = sigma < self.switch
        s_img = torch.where(small, sigma, torch.full_like(sigma, self.switch))
        s_fou = torch.where(small, torch.full_like(sigma, self.switch), sigma)
        log_terms, _ = self._images(d, s_img)
        via_images = torch.logsumexp(log_terms, dim=-1)
        value, _ = self._fourier(d, s_fou)
        return torch.where(small, via_images, torch.log(value))

    def score(self, xt: Tensor, x0: Tensor, alpha, sigma: Tensor) -> Tensor:
        d = self._wrap(xt - x0)
        sigma = torch.as_tensor(sigma, dtype=d.dtype, device=d.device).expand_as(d)
        small = sigma < self.switch
        s_img = torch.where(small, sigma, torch.full_like(sigma, self.switch))
        s_fou = torch.where(small, torch.full_like(sigma, self.switch), sigma)
        log_terms, shifted = self._images(d, s_img)
        w = torch.softmax(log_terms, dim=-1)
        via_images = -(w * shifted).sum(-1) / s_img**2
        value, deriv = self._fourier(d, s_fou)
        return torch.where(small, via_images, deriv / value)

    def __repr__(self) -> str:
        return f"WrappedNormalKernel(switch={self.switch}, n_images={self.n_images}, n_fourier={self.n_fourier})"
