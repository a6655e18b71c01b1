"""Theorem 2: the orbit target is equivariant, target(x0, h∘x_t) = h∘target(x0, x_t)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _reference import cube_rotations, so3_posterior_mean
from conftest import explicit_batch, graph_slice, make_batch, make_ctx
from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.orbits import O3, SO3, ExplicitPermutations, FiniteGroup, OrbitContext, SpeciesPermutation, random_rotations


def _with_xt(ctx: OrbitContext, xt: torch.Tensor) -> OrbitContext:
    return OrbitContext(x0=ctx.x0, xt=xt, batch=ctx.batch, num_graphs=ctx.num_graphs, alpha=ctx.alpha,
                        sigma=ctx.sigma, kernel=ctx.kernel, data=ctx.data)


def _random_species_perm(data, gen) -> torch.Tensor:
    """A random permutation of the nodes within each (graph, species) class: ``(h∘x)_i = x[h[i]]``."""
    h = torch.arange(data.num_nodes)
    key = data.batch * 1000 + data.z
    for k in key.unique():
        idx = torch.nonzero(key == k).flatten()
        h[idx] = idx[torch.randperm(idx.numel(), generator=gen)]
    return h


@pytest.mark.parametrize("proposal", ["uniform", "guided"])
def test_species_permutation_target_is_exactly_equivariant(ragged_batch, gen, proposal):
    ctx = make_ctx(ragged_batch, sigma=0.5, centered=False)
    orbit = SpeciesPermutation(max_candidates=50, proposal=proposal)  # all groups enumerated
    base = orbit_estimate(orbit, ctx, generator=gen)
    for _ in range(3):
        h = _random_species_perm(ragged_batch, gen)
        assert not torch.equal(h, torch.arange(ragged_batch.num_nodes))
        moved = orbit_estimate(orbit, _with_xt(ctx, ctx.xt[h]), generator=gen)
        assert torch.allclose(moved.target, base.target[h], atol=1e-12)
        assert torch.allclose(moved.ess, base.ess, rtol=1e-10)
    # not trivially true: the target is not permutation invariant
    assert not torch.allclose(base.target[h], base.target, atol=1e-3)


def test_finite_group_target_is_exactly_equivariant(ragged_batch):
    rots = torch.as_tensor(cube_rotations())
    ctx = make_ctx(ragged_batch, sigma=0.6)
    orbit = FiniteGroup(rots)
    base = orbit_estimate(orbit, ctx).target
    for h in rots[[3, 11, 17]]:
        moved = orbit_estimate(orbit, _with_xt(ctx, ctx.xt @ h.T)).target
        assert torch.allclose(moved, base @ h.T, atol=1e-12)
        assert not torch.allclose(base @ h.T, base, atol=1e-3)


def test_explicit_permutation_target_is_exactly_equivariant():
    data, groups = explicit_batch(seed=3)
    ctx = make_ctx(data, sigma=0.5, centered=False)
    base = orbit_estimate(ExplicitPermutations(), ctx).target
    # h: the third listed element of every graph's group (identity where a graph has fewer)
    h = torch.arange(data.num_nodes)
    for b, group in enumerate(groups):
        sl = graph_slice(data, b)
        p = group[min(2, len(group) - 1)]
        h[sl] = torch.tensor(p) + sl.start
    moved = orbit_estimate(ExplicitPermutations(), _with_xt(ctx, ctx.xt[h])).target
    assert torch.allclose(moved, base[h], atol=1e-12)


def test_matrix_fisher_reference_is_equivariant():
    """Sanity of the reference used below (exact posterior means)."""
    data = make_batch([[1] * 5], seed=11)
    ctx = make_ctx(data, sigma=0.7, seed=12)
    x0, xt = ctx.x0.numpy(), ctx.xt.numpy()
    h = random_rotations((1,), torch.Generator().manual_seed(0))[0].numpy()
    for improper in (False, True):
        ref = so3_posterior_mean(x0, xt, 1.0, 0.7, improper)
        assert np.allclose(so3_posterior_mean(x0, xt @ h.T, 1.0, 0.7, improper), ref @ h.T, atol=1e-7)
    mirror = np.diag([1.0, 1.0, -1.0])
    ref = so3_posterior_mean(x0, xt, 1.0, 0.7, True)
    assert np.allclose(so3_posterior_mean(x0, xt @ mirror, 1.0, 0.7, True), ref @ mirror, atol=1e-7)


@pytest.mark.parametrize("orbit_name,k", [("so3-uniform", 32768), ("so3-guided", 4096), ("o3-guided", 8192)])
def test_rotation_target_is_equivariant_within_monte_carlo_error(orbit_name, k):
    data = make_batch([[1] * 5, [6, 1, 1, 1]], seed=11)
    sigma = 0.7
    ctx = make_ctx(data, sigma=sigma, seed=12)
    make = {"so3-uniform": lambda: SO3(k), "so3-guided": lambda: SO3(k, proposal="guided"),
            "o3-guided": lambda: O3(k, proposal="guided")}[orbit_name]
    g = torch.Generator().manual_seed(0)
    hs = [random_rotations((1,), g)[0]]
    if orbit_name.startswith("o3"):
        hs.append(torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)) @ hs[0])  # improper h
    base = orbit_estimate(make(), ctx, generator=torch.Generator().manual_seed(1)).target
    for h in hs:
        moved = orbit_estimate(make(), _with_xt(ctx, ctx.xt @ h.T), generator=torch.Generator().manual_seed(2)).target
        err = float((moved - base @ h.T).norm() / math.sqrt(ctx.x0.size(0)))
        effect = float((base @ h.T - base).norm() / math.sqrt(ctx.x0.size(0)))
        assert err < 0.04, f"equivariance error {err}"
        assert effect > 20 * err
    # the estimate is the exact posterior mean up to the same Monte-Carlo error
    x0, xt = ctx.x0.numpy(), ctx.xt.numpy()
    for b in range(2):
        sl = graph_slice(data, b)
        ref = so3_posterior_mean(x0[sl], xt[sl], 1.0, sigma, improper=orbit_name.startswith("o3"))
        assert np.linalg.norm(base[sl].numpy() - ref) / math.sqrt(sl.stop - sl.start) < 0.04


def test_guided_rotation_proposal_is_built_equivariantly(ragged_batch):
    """Same noise, rotated x_t: every guided candidate is rotated by h and keeps its proposal density."""
    ctx = make_ctx(ragged_batch, sigma=0.4)
    h = random_rotations((1,), torch.Generator().manual_seed(5))[0]
    orbit = SO3(64, proposal="guided", uniform_fraction=1e-12)  # (almost) no Haar component
    a = orbit.candidates(ctx, torch.Generator().manual_seed(9))
    b = orbit.candidates(_with_xt(ctx, ctx.xt @ h.T), torch.Generator().manual_seed(9))
    multi = [i for i in range(ctx.num_graphs) if int(ragged_batch.ptr[i + 1] - ragged_batch.ptr[i]) > 2]
    assert torch.allclose(b.linear[multi, 1:], h @ a.linear[multi, 1:], atol=1e-8)
    assert torch.allclose(b.linear_log_nu[multi, 1:], a.linear_log_nu[multi, 1:], atol=1e-6, rtol=1e-8)
