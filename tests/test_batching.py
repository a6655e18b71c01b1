"""Ragged batches: per-graph softmax, batched == graph by graph, order independence, single atoms."""
from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from _reference import cube_rotations
from conftest import explicit_batch, graph_slice, make_batch, make_ctx
from orbit_pyg import OrbitDiffusionLoss, VPSchedule
from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.orbits import (
    O3,
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    OrbitCandidates,
    OrbitContext,
    SpeciesPermutation,
)

_KINDS = ("perm", "linear", "shift")


def slice_candidates(c: OrbitCandidates, data: Batch, b: int) -> OrbitCandidates:
    """The candidates of graph ``b`` alone, as a one-graph candidate set (local node indices)."""
    sl = graph_slice(data, b)
    out = OrbitCandidates(1)
    if c.perm is not None:
        out.perm = c.perm[:, sl] - sl.start
    if c.linear is not None:
        out.linear = c.linear[b : b + 1]
    if c.shift is not None:
        out.shift = c.shift[b : b + 1]
    for kind in _KINDS:
        for suffix in ("_log_nu", "_mask", "_log_lik"):
            value = getattr(c, kind + suffix, None)
            if value is not None:
                setattr(out, kind + suffix, value[b : b + 1])
    return out


def graph_ctx(ctx: OrbitContext, data: Batch, b: int) -> OrbitContext:
    sl = graph_slice(data, b)
    n = sl.stop - sl.start
    return OrbitContext(
        x0=ctx.x0[sl], xt=ctx.xt[sl], batch=torch.zeros(n, dtype=torch.long), num_graphs=1,
        alpha=ctx.alpha[b : b + 1], sigma=ctx.sigma[b : b + 1], kernel=ctx.kernel,
        data=Batch.from_data_list([data.get_example(b)]),
    )


def _orbits():
    return {
        "species": SpeciesPermutation(max_candidates=50),
        "species-sampled-guided": SpeciesPermutation(max_candidates=4, proposal="guided"),
        "so3-uniform": SO3(48),
        "so3-guided": SO3(48, proposal="guided"),
        "o3-guided": O3(48, proposal="guided"),
        "cube": FiniteGroup(torch.as_tensor(cube_rotations())),
        "species-x-so3": SpeciesPermutation(max_candidates=12) * SO3(16, proposal="guided"),
    }


@pytest.mark.parametrize("name", list(_orbits()))
def test_batched_equals_graph_by_graph(name, gen):
    data = make_batch(seed=21, scale=1.5)
    sig = torch.tensor([0.2, 0.5, 1.0, 0.05, 0.3], dtype=torch.float64)
    ctx = make_ctx(data, sigma=sig, alpha=torch.tensor([1.0, 0.9, 0.7, 1.0, 0.95]))
    cands = _orbits()[name].candidates(ctx, gen)  # drawn once, for the whole batch
    est = orbit_estimate(cands, ctx)
    for b in range(ctx.num_graphs):
        sl = graph_slice(data, b)
        one = orbit_estimate(slice_candidates(cands, data, b), graph_ctx(ctx, data, b))
        assert torch.allclose(one.target, est.target[sl], atol=1e-12, rtol=0), f"graph {b}"
        assert torch.allclose(one.weights[0], est.weights[b], atol=1e-12)
        assert torch.allclose(one.ess[0], est.ess[b], rtol=1e-12)


@pytest.mark.parametrize("name", ["species", "cube"])
def test_enumerated_orbit_objects_batched_equals_graph_by_graph(name):
    """With deterministic (enumerated) candidates the orbit objects themselves agree per graph."""
    data = make_batch(seed=22)
    ctx = make_ctx(data, sigma=torch.tensor([0.3, 0.6, 0.4, 0.8, 0.5]))
    orbit = _orbits()[name]
    est = orbit_estimate(orbit, ctx)
    for b in range(ctx.num_graphs):
        one = orbit_estimate(orbit, graph_ctx(ctx, data, b))
        assert torch.allclose(one.target, est.target[graph_slice(data, b)], atol=1e-12)
        assert torch.allclose(one.ess[0], est.ess[b], rtol=1e-12)


def test_explicit_permutations_batched_equals_graph_by_graph():
    data, _ = explicit_batch(seed=5)
    ctx = make_ctx(data, sigma=0.4, centered=False)
    est = orbit_estimate(ExplicitPermutations(), ctx)
    for b in range(ctx.num_graphs):
        one = orbit_estimate(ExplicitPermutations(), graph_ctx(ctx, data, b))
        assert torch.allclose(one.target, est.target[graph_slice(data, b)], atol=1e-12)


@pytest.mark.parametrize("name", ["species", "cube", "explicit"])
def test_batch_order_does_not_matter(name):
    if name == "explicit":
        data, _ = explicit_batch(seed=6)
        orbit, centered = ExplicitPermutations(), False
    else:
        data, orbit, centered = make_batch(seed=23), _orbits()[name], True
    order = [3, 0, 4, 2, 1]
    sig = torch.tensor([0.3, 0.6, 0.4, 0.8, 0.5], dtype=torch.float64)
    ctx = make_ctx(data, sigma=sig, centered=centered)
    est = orbit_estimate(orbit, ctx)
    shuffled = Batch.from_data_list([data.get_example(i) for i in order])
    xt = torch.cat([ctx.xt[graph_slice(data, i)] for i in order])
    ctx2 = make_ctx(shuffled, sigma=sig[order], centered=centered, xt=xt)
    est2 = orbit_estimate(orbit, ctx2)
    for pos, i in enumerate(order):
        assert torch.allclose(est2.target[graph_slice(shuffled, pos)], est.target[graph_slice(data, i)], atol=1e-12)
        assert torch.allclose(est2.ess[pos], est.ess[i], rtol=1e-12)


@pytest.mark.parametrize("orbit_cls", [SO3, O3])
def test_single_atom_graph(orbit_cls, gen):
    data = make_batch([[6], [6, 1, 1]], seed=24)
    for sigma in (1e-3, 0.5, 50.0):
        ctx = make_ctx(data, sigma=sigma)
        assert float(ctx.x0[0].abs().max()) == 0.0  # centred single atom sits at the origin
        for proposal in ("uniform", "guided"):
            est = orbit_estimate(orbit_cls(16, proposal=proposal), ctx, generator=gen)
            assert torch.isfinite(est.target).all() and torch.isfinite(est.weights).all() and torch.isfinite(est.ess).all()
            assert float(est.target[0].abs().max()) == 0.0
            if proposal == "uniform":
                # every candidate leaves the atom in place: equal weights, ESS = K
                assert float(est.ess[0]) == pytest.approx(16.0, rel=1e-12)
    # through the loss, with a single-atom graph in the batch
    for proposal in ("uniform", "guided"):
        loss = OrbitDiffusionLoss(VPSchedule(), orbit_cls(16, proposal=proposal), mode="orbit")
        noisy = loss.corrupt(data, generator=gen)
        assert torch.isfinite(noisy.target).all() and torch.isfinite(noisy.ess).all()
        assert float(noisy.target[0].abs().max()) == 0.0  # centred single atom: x_t = x0_hat = 0
        if proposal == "uniform":
            assert float(noisy.ess[0]) == pytest.approx(16.0, rel=1e-12)
        else:
            assert float(noisy.ess[0]) > 1


def test_single_atom_species_and_finite_orbits():
    data = make_batch([[8], [1, 1]], seed=25)
    ctx = make_ctx(data, sigma=0.5)
    est = orbit_estimate(SpeciesPermutation(max_candidates=10), ctx)
    assert float(est.ess[0]) == 1.0 and torch.equal(est.target[0], ctx.x0[0])
    est = orbit_estimate(FiniteGroup(torch.as_tensor(cube_rotations())), ctx)
    assert float(est.ess[0]) == pytest.approx(24.0, rel=1e-12)


@pytest.mark.parametrize(
    "orbit,k",
    [(SO3(20), 20), (O3(20), 20), (SpeciesPermutation(max_candidates=9), 9),
     (SpeciesPermutation(max_candidates=9) * SO3(5), 45)],
    ids=["so3", "o3", "species-sampled", "product"],
)
def test_flat_likelihood_gives_uniform_weights(orbit, k, gen):
    """With a uniform proposal and a flat likelihood (huge noise) every candidate weighs the same."""
    data = make_batch([[1] * 6, [1] * 5], seed=26)  # |G| = 720 and 120 > 9: sampled
    ctx = make_ctx(data, sigma=1e7)
    est = orbit_estimate(orbit, ctx, generator=gen)
    assert torch.allclose(est.ess, torch.full((2,), float(k), dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 7, 20, 33])
def test_o3_components_get_equal_mass_under_a_flat_likelihood(k, gen):
    """Haar on O(3) puts 1/2 on rotations and 1/2 on reflections: with a flat likelihood the
    normalized weights of the improper candidates sum to 1/2 whatever the split of K."""
    data = make_batch([[1] * 6, [1] * 5], seed=26)
    ctx = make_ctx(data, sigma=1e7)
    cands = O3(k).candidates(ctx, gen)
    improper = torch.linalg.det(cands.linear) < 0
    assert bool(improper.any(1).all()) and bool((~improper).any(1).all())
    est = orbit_estimate(cands, ctx)
    mass = (est.weights * improper).sum(1)
    assert torch.allclose(mass, torch.full((2,), 0.5, dtype=torch.float64), atol=1e-12)


def test_species_classes_never_mix_across_graphs():
    """Two graphs with the same species: permutations stay inside each graph."""
    data = make_batch([[1, 1, 1], [1, 1, 1]], seed=27)
    ctx = make_ctx(data, sigma=0.5, centered=False)
    cands = SpeciesPermutation(max_candidates=6).candidates(ctx)
    assert cands.perm.shape == (6, 6)
    assert bool((cands.perm[:, :3] < 3).all()) and bool((cands.perm[:, 3:] >= 3).all())
