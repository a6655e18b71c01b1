r"""Noise schedules: the coefficients of the Gaussian path ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Every schedule exposes one interface:

* ``alpha(t)``, ``sigma(t)`` and their time derivatives ``alpha_dot(t)``, ``sigma_dot(t)``
  for ``t`` a tensor in ``[0, 1]`` (any shape; float64 is used internally);
* ``sample_time(n, generator=None, device=None)`` - training times, discrete on the schedule's
  grid of ``num_steps`` steps when ``discrete=True``, continuous otherwise;
* ``timesteps()`` - the discrete grid (used by samplers).

Diffusion schedules run from data (``t = 0``) to noise (``t = 1``); the flow interpolant runs the
other way, from the prior (``t = 0``) to data (``t = 1``), as in flow matching.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


class NoiseSchedule:
    """Base class. Subclasses define ``alpha``/``sigma`` and their derivatives.

    Args:
        num_steps: size of the discrete time grid (``T``).
        discrete: sample training times on the grid (``True``) or uniformly in ``[t_min, t_max]``.
    """

    #: ``True`` when ``t = 1`` is data (flow matching); ``False`` when ``t = 0`` is data.
    data_at_one: bool = False

    def __init__(self, num_steps: int = 1000, discrete: bool = True):
        if int(num_steps) < 1:
            raise ValueError(f"`num_steps` must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.discrete = bool(discrete)

    # --- to be provided by subclasses -------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def alpha_dot(self, t: Tensor) -> Tensor:
        """d alpha / dt (autograd through ``alpha``; subclasses may override with closed forms)."""
        return _derivative(self.alpha, t)

    def sigma_dot(self, t: Tensor) -> Tensor:
        """d sigma / dt (autograd through ``sigma``)."""
        return _derivative(self.sigma, t)

    def timesteps(self) -> Tensor:
        """The discrete grid ``t_1 < ... < t_T`` (float64)."""
        k = torch.arange(1, self.num_steps + 1, dtype=torch.float64)
        return k / self.num_steps

    def time_range(self) -> tuple[float, float]:
        """Continuous training times are drawn uniformly from this interval."""
        grid = self.timesteps()
        return float(grid[0]), float(grid[-1])

    def sample_time(
        self, n: int, generator: Optional[torch.Generator] = None, device=None
    ) -> Tensor:
        """Draw ``n`` training times (float64 ``[n]``) on ``device``."""
        if self.discrete:
            k = torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
            return self.timesteps().to(device)[k]
        lo, hi = self.time_range()
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return lo + (hi - lo) * u

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{self.__class__.__name__}({args})"

    def _repr_args(self) -> dict:
        return {"num_steps": self.num_steps, "discrete": self.discrete}


def _derivative(fn, t: Tensor) -> Tensor:
    with torch.enable_grad():
        tt = torch.as_tensor(t, dtype=torch.float64).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(tt).sum(), tt)
    return grad


def _as_time(t) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    if not torch.isfinite(t).all() or bool(((t < 0) | (t > 1)).any()):
        raise ValueError("`t` must lie in [0, 1]")
    return t


class VPSchedule(NoiseSchedule):
    r"""Variance-preserving (DDPM) schedule: ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``.

    ``abar_k = prod_{j<=k} (1 - beta_j)`` on the grid ``t_k = k / T``; between grid points
    ``log abar`` is interpolated linearly, so continuous times are supported.

    * ``"cosine"`` (Nichol & Dhariwal): ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)``,
      ``beta_k = 1 - f(k/T) / f((k-1)/T)`` clipped to ``[beta_min, beta_max]`` (DiffCSP lattice:
      ``s = 0.008``, clip ``[1e-4, 0.9999]``).
    * ``"linear"``: ``beta_k`` linear from ``beta_start`` to ``beta_end`` (DDPM: 1e-4 -> 0.02).

    Example:
        >>> sched = VPSchedule("cosine", num_steps=1000)
        >>> t = sched.sample_time(4, generator=torch.Generator().manual_seed(0))
        >>> bool(((sched.alpha(t) ** 2 + sched.sigma(t) ** 2 - 1).abs() < 1e-12).all())
        True
    """

    def __init__(
        self,
        kind: str = "cosine",
        num_steps: int = 1000,
        discrete: bool = True,
        s: float = 0.008,
        beta_min: float = 1e-4,
        beta_max: float = 0.9999,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__(num_steps, discrete)
        self.kind = kind
        k = torch.arange(num_steps + 1, dtype=torch.float64)
        if kind == "cosine":
            f = torch.cos((k / num_steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(beta_min, beta_max)
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown VP schedule kind {kind!r}: use 'cosine' or 'linear'")
        self.betas = betas
        log_abar = torch.cumsum(torch.log1p(-betas), 0)
        self._log_abar = torch.cat([log_abar.new_zeros(1), log_abar])  # index k = 0..T

    def _log_abar_at(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        table = self._log_abar.to(t.device)
        pos = t * self.num_steps
        lo = pos.floor().clamp(max=self.num_steps - 1).long()
        frac = pos - lo
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._log_abar_at(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._log_abar_at(t)))

    def _repr_args(self) -> dict:
        return {"kind": self.kind, **super()._repr_args()}


class VESchedule(NoiseSchedule):
    r"""Variance-exploding schedule with geometric sigma: ``alpha = 1``,
    ``sigma(t) = sigma_min^(1 - t) * sigma_max^t``.

    The discrete grid is ``t_k = (k - 1) / (T - 1)``, ``k = 1..T``, so that ``sigma(t_1) = sigma_min``
    and ``sigma(t_T) = sigma_max`` (DiffCSP fractional coordinates: 0.005 -> 0.5, ``T = 1000``).

    Example:
        >>> sched = VESchedule(0.005, 0.5, num_steps=1000)
        >>> [round(float(v), 4) for v in sched.sigma(sched.timesteps()[[0, -1]])]
        [0.005, 0.5]
    """

    def __init__(
        self, sigma_min: float = 0.005, sigma_max: float = 0.5, num_steps: int = 1000, discrete: bool = True
    ):
        super().__init__(num_steps, discrete)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def timesteps(self) -> Tensor:
        if self.num_steps == 1:
            return torch.ones(1, dtype=torch.float64)
        return torch.linspace(0, 1, self.num_steps, dtype=torch.float64)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_time(t))

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return self.sigma_min * torch.exp(t * math.log(self.sigma_max / self.sigma_min))

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_time(t))

    def sigma_dot(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def _repr_args(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._repr_args()}


class FlowSchedule(NoiseSchedule):
    r"""Linear flow-matching interpolant ``x_t = t * x1 + (1 - t) * x_prior + s_t * eps`` with
    ``x_prior, eps ~ N(0, I)`` and optional bridge noise ``s_t = noise * sqrt(t (1 - t))``.

    Conditioned on the data point alone, ``x_t | x1 ~ N(t * x1, sigma_t^2 I)`` with
    ``alpha(t) = t`` and ``sigma(t) = sqrt((1 - t)^2 + s_t^2)``, which is all the orbit
    estimator needs. The velocity target ``E[dx_t/dt | x_t, x1] = alpha' x1 + (sigma'/sigma)(x_t - alpha x1)``
    (see :mod:`orbit_pyg.losses`) holds for this interpolant exactly.

    Data is at ``t = 1``; training times are drawn in ``[0, t_max]`` so that ``sigma > 0``.

    Example:
        >>> sched = FlowSchedule(noise=0.1, discrete=False)
        >>> float(sched.alpha(torch.tensor(0.25)))
        0.25
    """

    data_at_one = True

    def __init__(self, noise: float = 0.0, num_steps: int = 1000, discrete: bool = False, t_max: float = 0.999):
        super().__init__(num_steps, discrete)
        if noise < 0:
            raise ValueError(f"`noise` must be >= 0, got {noise}")
        if not 0 < t_max < 1:
            raise ValueError(f"`t_max` must lie in (0, 1), got {t_max}")
        self.noise, self.t_max = float(noise), float(t_max)

    def timesteps(self) -> Tensor:
        return torch.linspace(0, self.t_max, self.num_steps, dtype=torch.float64)

    def alpha(self, t: Tensor) -> Tensor:
        return _as_time(t).clone()

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return torch.sqrt((1 - t) ** 2 + self.noise**2 * t * (1 - t))

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_time(t))

    def sigma_dot(self, t: Tensor) -> Tensor:
        t = _as_time(t)
        return (-(1 - t) + 0.5 * self.noise**2 * (1 - 2 * t)) / self.sigma(t)

    def _repr_args(self) -> dict:
        return {"noise": self.noise, "t_max": self.t_max, **super()._repr_args()}
