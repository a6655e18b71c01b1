"""Diagnostics, and the central claim: the orbit target keeps the augmentation gradient's mean and
lowers its variance (Rao-Blackwell)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _reference import cube_rotations
from conftest import make_batch
from orbit_pyg import OrbitDiffusionLoss, VPSchedule
from orbit_pyg.diagnostics import equivariance_error, ess_summary, gradient_variance
from orbit_pyg.nn import PositionTransformer
from orbit_pyg.orbits import SO3, FiniteGroup, SpeciesPermutation

SPECIES = [[1] * 5, [6, 1, 1, 1, 1], [8, 1, 1], [6, 6, 1, 1, 1, 1]]


def _linear_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Linear(3, 3).double()
    with torch.no_grad():  # a small, non-equivariant per-node map
        net.weight.mul_(0.3)
        net.bias.mul_(0.3)
    return net


def _compare(orbit, parameterization, model, call, num_draws, data):
    out = {}
    for mode in ("augment", "orbit"):
        loss = OrbitDiffusionLoss(VPSchedule(), orbit, mode=mode, parameterization=parameterization)
        out[mode] = gradient_variance(lambda m, d, g: loss(call(m), d, g), model, data, num_draws=num_draws, seed=1)
    return out


def _max_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |z| of the per-parameter mean of ``a - b`` (paired draws: same seed, same noise)."""
    d = a - b
    se = d.std(0) / math.sqrt(d.size(0))
    z = torch.where(se > 0, d.mean(0) / se.clamp(min=1e-300), torch.zeros_like(se))
    return float(z.abs().max())


def _mean_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||mean(a - b)||^2 / (tr Cov(a - b) / n)``: about 1 when the mean gradients agree (any number of
    parameters), large when they differ."""
    d = a - b
    return float(d.mean(0).pow(2).sum() / (d.var(0).sum() / d.size(0)))


@pytest.mark.parametrize("group", ["cube", "species"])
@pytest.mark.parametrize("parameterization", ["x0", "velocity"])
def test_orbit_gradient_has_augmentation_mean_and_lower_variance(group, parameterization):
    data = make_batch(SPECIES, seed=0)
    orbit = FiniteGroup(torch.as_tensor(cube_rotations())) if group == "cube" else SpeciesPermutation(max_candidates=200)
    net = _linear_model()
    res = _compare(orbit, parameterization, net, lambda m: (lambda x, t, _: m(x)), 300, data)
    aug, orb = res["augment"], res["orbit"]
    # Enumerated group: the orbit target is E[augmentation target | x_t] exactly, so the paired
    # differences have mean zero.
    assert _max_z(aug["grads"], orb["grads"]) < 4.5
    assert _mean_ratio(aug["grads"], orb["grads"]) < 4
    # Rao-Blackwell: Var[E[g | x_t]] <= Var[g], strictly here
    assert orb["total_variance"] < 0.9 * aug["total_variance"]
    assert aug["grads"].shape == (300, 12)


def test_orbit_gradient_with_a_tiny_transformer():
    data = make_batch(SPECIES, seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    net = PositionTransformer(hidden=8, num_layers=1, heads=2)
    res = _compare(FiniteGroup(torch.as_tensor(cube_rotations())), "x0", net, lambda m: m, 200, data)
    aug, orb = res["augment"], res["orbit"]
    # ~1600 parameters: the aggregate statistic, and a per-parameter bound with room for the maximum
    assert _mean_ratio(aug["grads"], orb["grads"]) < 4
    assert _max_z(aug["grads"], orb["grads"]) < 5.5
    assert orb["total_variance"] < 0.95 * aug["total_variance"]


def test_mean_gradient_test_has_power():
    """The paired z-test above detects a real difference of mean gradients (plain vs augment)."""
    data = make_batch(SPECIES, seed=0)
    net = _linear_model()
    orbit = FiniteGroup(torch.as_tensor(cube_rotations()))
    grads = {}
    for mode in ("plain", "augment"):
        loss = OrbitDiffusionLoss(VPSchedule(), orbit, mode=mode, parameterization="x0", center=True)
        grads[mode] = gradient_variance(lambda m, d, g: loss(lambda x, t, _: m(x), d, g), net, data, 300, seed=1)["grads"]
    assert _max_z(grads["plain"], grads["augment"]) > 8
    assert _mean_ratio(grads["plain"], grads["augment"]) > 20


def test_gradient_variance_statistics():
    data = make_batch([[1, 1, 1]], seed=1)
    net = _linear_model()
    loss = OrbitDiffusionLoss(VPSchedule(), SO3(8), mode="augment")
    out = gradient_variance(lambda m, d, g: loss(lambda x, t, _: m(x), d, g), net, data, num_draws=16, seed=3)
    g = out["grads"]
    assert torch.allclose(out["mean"], g.mean(0))
    assert out["total_variance"] == pytest.approx(float(g.var(0, unbiased=True).sum()), rel=1e-10)
    assert out["mean_norm2"] == pytest.approx(float(g.mean(0).pow(2).sum()), rel=1e-10)
    again = gradient_variance(lambda m, d, g: loss(lambda x, t, _: m(x), d, g), net, data, num_draws=16, seed=3)
    assert torch.equal(again["grads"], g)  # seeded
    with pytest.raises(ValueError, match="num_draws"):
        gradient_variance(lambda m, d, g: loss(lambda x, t, _: m(x), d, g), net, data, num_draws=1)


def test_ess_summary():
    out = ess_summary(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert out["mean"] == 4.0 and out["min"] == 1.0 and out["median"] == 2.0
    assert out["q10"] == pytest.approx(1.3)
    with pytest.raises(ValueError, match="empty"):
        ess_summary(torch.tensor([]))


def test_equivariance_error():
    data = make_batch([[6, 1, 1, 1], [8, 1, 1]], seed=2)
    gen = torch.Generator().manual_seed(0)
    assert equivariance_error(lambda x, t, d: 2 * x, data, SO3(), generator=gen) < 1e-12
    net = _linear_model()
    with torch.no_grad():
        err = equivariance_error(lambda x, t, d: net(x), data, SO3(), generator=gen)
    assert err > 0.05
    # permutations: a per-node map is equivariant, one that reads the node index is not
    species = SpeciesPermutation(max_candidates=10)
    assert equivariance_error(lambda x, t, d: x**3, data, species, generator=gen) < 1e-12
    idx = torch.arange(data.num_nodes, dtype=torch.float64).view(-1, 1)
    assert equivariance_error(lambda x, t, d: x + idx, data, species, generator=gen) > 0.05
