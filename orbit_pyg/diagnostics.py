r"""Health signals of the estimator and of a model: ESS, gradient variance, equivariance error."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .estimator import effective_sample_size
from .orbits.base import Orbit, OrbitContext, apply_element
from .losses import graph_batch

__all__ = ["effective_sample_size", "ess_summary", "gradient_variance", "equivariance_error"]


def ess_summary(ess: Tensor) -> dict[str, float]:
    """Mean, minimum, median and 10 % quantile of per-graph effective sample sizes.

    Example:
        >>> ess_summary(torch.tensor([1.0, 2.0, 3.0]))["mean"]
        2.0
    """
    ess = ess.detach().to(torch.float64).reshape(-1)
    if ess.numel() == 0:
        raise ValueError("`ess` is empty")
    return {
        "mean": float(ess.mean()),
        "min": float(ess.min()),
        "median": float(ess.median()),
        "q10": float(torch.quantile(ess, 0.1)),
    }


def gradient_variance(
    loss_fn: Callable[[nn.Module, Any, torch.Generator], Tensor],
    model: nn.Module,
    data: Any,
    num_draws: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    r"""Monte-Carlo mean and variance of the parameter gradient of a stochastic loss.

    Draws ``loss_fn(model, data, generator)`` ``num_draws`` times (fresh noise, time, orbit elements
    each draw; the model and data are fixed) and returns ``mean`` (the mean gradient, flattened),
    ``total_variance`` (``trace Cov[grad] = E||g - E g||^2``), ``mean_norm2`` (``||E g||^2``) and
    ``grads`` (``[num_draws, P]``). Used to compare ``plain`` / ``augment`` / ``orbit`` targets.

    Example:
        >>> from torch_geometric.data import Data
        >>> from orbit_pyg import OrbitDiffusionLoss, VPSchedule
        >>> from orbit_pyg.orbits import SO3
        >>> net = nn.Linear(3, 3)
        >>> loss = OrbitDiffusionLoss(VPSchedule(), SO3(32), mode="augment")
        >>> out = gradient_variance(lambda m, d, g: loss(lambda x, t, _: m(x), d, g), net, Data(pos=torch.randn(4, 3)), 8)
        >>> out["grads"].shape
        torch.Size([8, 12])
    """
    if num_draws < 2:
        raise ValueError(f"`num_draws` must be >= 2, got {num_draws}")
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=next(iter(params)).device if params else "cpu").manual_seed(seed)
    rows = []
    for _ in range(num_draws):
        loss = loss_fn(model, data, gen)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    g = torch.stack(rows).to(torch.float64)
    mean = g.mean(0)
    var = ((g - mean) ** 2).sum(1).mean() * num_draws / (num_draws - 1)
    return {"mean": mean, "total_variance": float(var), "mean_norm2": float(mean.pow(2).sum()), "grads": g}


def equivariance_error(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    data: Any,
    orbit: Orbit,
    t: Optional[Tensor] = None,
    pos_key: str = "pos",
    num_elements: int = 8,
    generator: Optional[torch.Generator] = None,
) -> float:
    r"""Relative equivariance error ``E_g ||f(g∘x) - g∘f(x)|| / ||f(x)||`` of a position-valued model.

    ``g`` is drawn uniformly from ``orbit`` (``num_elements`` draws); ``f = model(x, t, data)``.
    Zero for an equivariant model (to round-off), of order one for a generic one.
    """
    pos = getattr(data, pos_key)
    batch, b = graph_batch(data, pos)
    if t is None:
        t = torch.full((b,), 0.5, dtype=pos.dtype, device=pos.device)
    ctx = OrbitContext(x0=pos, xt=None, batch=batch, num_graphs=b, data=data)
    with torch.no_grad():
        ref = model(pos, t, data)
        errs = []
        for _ in range(num_elements):
            cands = orbit.random_element(ctx, generator)
            moved = model(apply_element(cands, pos, batch), t, data)
            errs.append((moved - apply_element(cands, ref, batch)).norm() / ref.norm().clamp(min=1e-30))
    return float(torch.stack(errs).mean())
