r"""Denoising losses with three switchable targets: ``plain``, ``augment`` and ``orbit``.

For a batch with clean positions ``x0`` and per-graph time ``t``:

* ``plain``: ``x_t ~ q_t(· | x0)``, target computed from ``x0``;
* ``augment``: one element ``h`` per graph drawn uniformly from the orbit, ``x_t ~ q_t(· | h ∘ x0)``,
  target from ``h ∘ x0`` (the data-augmentation baseline);
* ``orbit``: as ``augment`` (so the two have the same expected gradient), but the target is the
  Rao-Blackwell posterior mean over the orbit of ``h ∘ x0`` given ``x_t``
  (:func:`~orbit_pyg.estimator.orbit_estimate`): lower gradient variance, same single model call.

Targets for a Gaussian kernel follow from the (possibly Rao-Blackwellized) ``x0_hat``:

=============  ===============================================================
``x0``         ``x0_hat``
``eps``        ``(x_t - alpha x0_hat) / sigma``
``score``      ``-(x_t - alpha x0_hat) / sigma^2``
``velocity``   ``alpha' x0_hat + (sigma' / sigma)(x_t - alpha x0_hat)`` = ``E[dx_t/dt | x_t, x0]``
=============  ===============================================================

For the wrapped-normal kernel on the torus only ``score`` exists and the orbit target is
``sum_k w_k score_WN(x_t - g_k ∘ x0)``.

Two call styles:

* ``loss(model, batch)`` calls ``model(x_t, t, batch) -> [N, 3]`` (``x_t`` the noisy positions,
  ``t`` per-graph times ``[B]``, ``batch`` the PyG batch for everything else);
* split: ``noisy = loss.corrupt(batch)``; call the model however you like on ``noisy.xt``,
  ``noisy.t``; then ``loss.criterion(prediction, noisy)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ._utils import center as center_per_graph
from ._utils import check_batch, check_positions
from .estimator import orbit_estimate
from .kernels import GaussianKernel
from .orbits.base import Orbit, OrbitContext, apply_element
from .schedules import NoiseSchedule

MODES = ("plain", "augment", "orbit")
PARAMETERIZATIONS = ("eps", "x0", "score", "velocity")


@dataclass
class NoisyBatch:
    """What :meth:`OrbitDiffusionLoss.corrupt` produces: the model's input and its regression target.

    Attributes:
        xt: noisy positions ``[N, 3]``.
        t: per-graph times ``[B]`` (positions' dtype).
        target: regression target ``[N, 3]`` (detached).
        x0: the clean positions ``x_t`` was made from (centred / augmented), ``[N, 3]``.
        alpha, sigma: per-graph kernel coefficients ``[B]`` (float64).
        ess: per-graph effective sample size ``[B]`` (``1`` for plain / augment).
        batch: node-to-graph map ``[N]``; num_graphs: ``B``.
        weights: ``[B, K]`` normalized orbit weights (``orbit`` mode) or ``None``; ``log_weights``
            gives their log.
    """

    xt: Tensor
    t: Tensor
    target: Tensor
    x0: Tensor
    alpha: Tensor
    sigma: Tensor
    ess: Tensor
    batch: Tensor
    num_graphs: int
    mode: str
    parameterization: str
    weights: Optional[Tensor] = None

    @property
    def log_weights(self) -> Optional[Tensor]:
        """``log`` of :attr:`weights` (``-inf`` for padded candidates), or ``None``."""
        return None if self.weights is None else torch.log(self.weights)


def graph_batch(data: Any, pos: Tensor) -> tuple[Tensor, int]:
    """``(batch, num_graphs)`` of a PyG ``Data`` or ``Batch`` (a lone ``Data`` is one graph)."""
    batch = getattr(data, "batch", None)
    batch, num_graphs = check_batch(batch, pos.size(0), pos.device)
    declared = getattr(data, "num_graphs", None) if getattr(data, "batch", None) is not None else None
    if declared is not None and int(declared) > num_graphs:
        num_graphs = int(declared)
    return batch, num_graphs


class OrbitDiffusionLoss(nn.Module):
    """Denoising loss with ``plain`` / ``augment`` / ``orbit`` targets (see module docstring).

    Args:
        schedule: a :class:`~orbit_pyg.schedules.NoiseSchedule`.
        orbit: the symmetry orbit (required for ``augment`` and ``orbit``).
        mode: ``"plain"``, ``"augment"`` or ``"orbit"``.
        parameterization: ``"eps"``, ``"x0"``, ``"score"`` or ``"velocity"``.
        kernel: forward kernel, :class:`~orbit_pyg.kernels.GaussianKernel` by default.
        pos_key: attribute of the batch holding clean positions.
        center: centre positions and noise per graph (default: when the orbit needs it).
        chunk_size: candidates per chunk on the estimator's materialized path.
        reduction: squared error summed over the 3 coordinates, then ``"mean"`` over nodes,
            ``"sum"``, or ``"none"`` (one value per node).

    Example:
        >>> import torch
        >>> from torch_geometric.data import Batch, Data
        >>> from orbit_pyg import OrbitDiffusionLoss, VPSchedule
        >>> from orbit_pyg.orbits import SO3
        >>> batch = Batch.from_data_list([Data(pos=torch.randn(5, 3)), Data(pos=torch.randn(7, 3))])
        >>> loss_fn = OrbitDiffusionLoss(VPSchedule(), orbit=SO3(200), mode="orbit")
        >>> model = lambda xt, t, data: torch.zeros_like(xt)
        >>> bool(loss_fn(model, batch, generator=torch.Generator().manual_seed(0)) > 0)
        True
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        orbit: Optional[Orbit] = None,
        mode: str = "orbit",
        parameterization: str = "eps",
        kernel: Any = None,
        pos_key: str = "pos",
        center: Optional[bool] = None,
        chunk_size: Optional[int] = None,
        reduction: str = "mean",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}: use one of {PARAMETERIZATIONS}")
        if mode != "plain" and orbit is None:
            raise ValueError(f"mode {mode!r} needs an orbit")
        if orbit is not None and not isinstance(orbit, Orbit):
            raise TypeError(f"`orbit` must be an orbit_pyg.orbits.Orbit, got {type(orbit).__name__}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")
        self.kernel = kernel if kernel is not None else GaussianKernel()
        if not self.kernel.linear and parameterization != "score":
            raise ValueError(f"{self.kernel!r} supports parameterization='score' only")
        self.schedule, self.orbit, self.mode = schedule, orbit, mode
        self.parameterization, self.pos_key, self.reduction = parameterization, pos_key, reduction
        self.center = bool(orbit is not None and orbit.needs_centering) if center is None else bool(center)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, orbit={self.orbit!r}, mode={self.mode!r}, "
            f"parameterization={self.parameterization!r}, kernel={self.kernel!r}"
        )

    # --- the split form ----------------------------------------------------------------------
    def corrupt(self, data: Any, generator: Optional[torch.Generator] = None, t: Optional[Tensor] = None) -> NoisyBatch:
        """Noise a batch and compute its regression target (no gradient flows through the target)."""
        pos = getattr(data, self.pos_key, None)
        if pos is None:
            raise KeyError(f"the batch has no `{self.pos_key}` (clean positions [N, 3])")
        check_positions(pos, self.pos_key)
        batch, b = graph_batch(data, pos)
        device = pos.device
        with torch.no_grad():
            x0 = center_per_graph(pos, batch, b) if self.center else pos
            if t is None:
                t = self.schedule.sample_time(b, generator=generator, device=device)
            t = torch.as_tensor(t, dtype=torch.float64, device=device).reshape(-1)
            if t.numel() != b:
                raise ValueError(f"`t` must have one time per graph ({b}), got {t.numel()}")
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
            ctx = OrbitContext(x0=x0, xt=None, batch=batch, num_graphs=b, alpha=alpha, sigma=sigma, kernel=self.kernel, data=data)
            if self.mode != "plain":
                x0 = apply_element(self.orbit.random_element(ctx, generator), x0, batch)
                if not self.kernel.linear:  # torus coordinates stay in [0, 1)
                    x0 = torch.remainder(x0, 1.0)
                ctx.x0 = x0
            eps = torch.randn(pos.shape, generator=generator, dtype=pos.dtype, device=device)
            if self.center:
                eps = center_per_graph(eps, batch, b)
            a_n, s_n = alpha[batch].to(pos.dtype).view(-1, 1), sigma[batch].to(pos.dtype).view(-1, 1)
            xt = self.kernel.perturb(x0, a_n, s_n, eps)
            ess = torch.ones(b, dtype=torch.float64, device=device)
            weights = None
            if self.mode == "orbit":
                ctx.xt = xt
                kind = "x0" if self.kernel.linear else "score"
                est = orbit_estimate(self.orbit, ctx, target=kind, chunk_size=self.chunk_size, generator=generator)
                ref, ess, weights = est.target, est.ess, est.weights
            else:
                ref = x0 if self.kernel.linear else self.kernel.score(xt, x0, a_n, s_n)
            target = self._target(ref, xt, t, batch)
        return NoisyBatch(xt, t.to(pos.dtype), target, x0, alpha, sigma, ess, batch, b, self.mode, self.parameterization, weights)

    def _target(self, ref: Tensor, xt: Tensor, t: Tensor, batch: Tensor) -> Tensor:
        """Regression target from ``x0_hat`` (Gaussian) or ``score_hat`` (torus)."""
        if not self.kernel.linear:
            return ref
        p = self.parameterization
        if p == "x0":
            return ref
        a = self.schedule.alpha(t)[batch].to(xt.dtype).view(-1, 1)
        s = self.schedule.sigma(t)[batch].clamp(min=1e-12).to(xt.dtype).view(-1, 1)
        resid = xt - a * ref
        if p == "eps":
            return resid / s
        if p == "score":
            return -resid / s**2
        a_dot = self.schedule.alpha_dot(t)[batch].to(xt.dtype).view(-1, 1)
        s_dot = self.schedule.sigma_dot(t)[batch].to(xt.dtype).view(-1, 1)
        return a_dot * ref + (s_dot / s) * resid

    def criterion(self, prediction: Tensor, noisy: NoisyBatch) -> Tensor:
        """Squared error between the model's prediction ``[N, 3]`` and ``noisy.target``."""
        if not isinstance(prediction, Tensor) or prediction.shape != noisy.target.shape:
            shape = list(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
            raise ValueError(f"prediction must have shape {list(noisy.target.shape)} (one vector per node), got {shape}")
        per_node = ((prediction - noisy.target.to(prediction.dtype)) ** 2).sum(-1)
        if self.reduction == "none":
            return per_node
        return per_node.sum() if self.reduction == "sum" else per_node.mean()

    # --- the one-call form -------------------------------------------------------------------
    def forward(self, model: Callable[[Tensor, Tensor, Any], Tensor], data: Any, generator: Optional[torch.Generator] = None) -> Tensor:
        """``criterion(model(x_t, t, data), corrupt(data))``."""
        noisy = self.corrupt(data, generator)
        return self.criterion(model(noisy.xt, noisy.t, data), noisy)
