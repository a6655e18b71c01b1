"""The Rao-Blackwell estimator: exact enumeration against brute force, Monte-Carlo convergence,
agreement of the structured and materialized paths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _reference import (
    cube_rotations,
    hexagonal_lattice_group,
    matrix_fisher_mean,
    ess,
    gaussian_posterior_mean,
    so3_posterior_mean,
    species_group,
)
from conftest import explicit_batch, graph_slice, make_batch, make_ctx
from orbit_pyg.estimator import _materialized, _structured, effective_sample_size, orbit_estimate
from orbit_pyg.orbits import (
    O3,
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    SpeciesPermutation,
)

ALPHAS = [0.95, 0.8, 1.0, 0.7, 0.9]
SIGMAS = [0.3, 0.45, 0.6, 0.5, 0.35]


def _np(x):
    return x.detach().double().numpy()


def _check_brute(est, ctx, data, groups, tol=1e-10):
    """Compare an estimate with the brute-force posterior mean over ``groups[b]`` (lists of
    candidate position arrays) graph by graph."""
    x0, xt = _np(ctx.x0), _np(ctx.xt)
    assert torch.allclose(est.weights.sum(1), torch.ones(ctx.num_graphs, dtype=torch.float64), atol=1e-12)
    for b in range(ctx.num_graphs):
        sl = graph_slice(data, b)
        cands = groups[b](x0[sl])
        mean, w = gaussian_posterior_mean(x0[sl], xt[sl], float(ctx.alpha[b]), float(ctx.sigma[b]), cands)
        assert np.allclose(_np(est.target[sl]), mean, atol=tol, rtol=0), f"graph {b}"
        assert float(est.ess[b]) == pytest.approx(ess(w), rel=1e-9)
        # the nonzero weights are the brute-force weights (up to candidate order)
        got = np.sort(_np(est.weights[b])[_np(est.weights[b]) > 0])
        assert np.allclose(got, np.sort(w[w > 0]), atol=1e-12)


# --- exact enumeration ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["default", "materialized", "materialized-chunk3"])
def test_species_enumeration_equals_brute_force(ragged_batch, path):
    ctx = make_ctx(ragged_batch, sigma=torch.tensor(SIGMAS), alpha=torch.tensor(ALPHAS), centered=False)
    orbit = SpeciesPermutation(max_candidates=50)
    if path == "default":
        est = orbit_estimate(orbit, ctx)
    else:
        est = _materialized(orbit.candidates(ctx), ctx, "x0", 3 if path.endswith("3") else None)
    groups = [
        (lambda z: (lambda x: [x[list(p)] for p in species_group(z)]))(ragged_batch.z[graph_slice(ragged_batch, b)].tolist())
        for b in range(ragged_batch.num_graphs)
    ]
    _check_brute(est, ctx, ragged_batch, groups)
    assert est.ess[0] == 1.0  # single atom: one candidate


def test_explicit_permutations_equal_brute_force():
    data, groups = explicit_batch()
    ctx = make_ctx(data, sigma=torch.tensor(SIGMAS), alpha=torch.tensor(ALPHAS), centered=False)
    est = orbit_estimate(ExplicitPermutations(), ctx)
    _check_brute(est, ctx, data, [(lambda gr: (lambda x: [x[list(p)] for p in gr]))(gr) for gr in groups])
    assert est.weights.shape == (5, 8) and bool((est.weights[3, 1:] == 0).all())


@pytest.mark.parametrize("group", ["cube-24", "cube-48", "hexagonal-lattice"])
def test_finite_group_equals_brute_force(ragged_batch, group):
    rots = cube_rotations()
    if group == "cube-48":
        rots = np.concatenate([rots, -rots])
    elif group == "hexagonal-lattice":  # non-orthogonal maps: ||A x0||^2 differs between candidates
        rots = hexagonal_lattice_group()
    ctx = make_ctx(ragged_batch, sigma=torch.tensor(SIGMAS), alpha=torch.tensor(ALPHAS))
    est = orbit_estimate(FiniteGroup(torch.as_tensor(rots)), ctx)
    _check_brute(est, ctx, ragged_batch, [lambda x: [x @ r.T for r in rots]] * ctx.num_graphs)


def test_enumerated_graphs_stay_exact_in_a_partly_sampled_batch(gen):
    species = [[6, 1, 1, 8], [1, 1, 1], [1] * 7, [6, 6, 1, 1, 1, 8]]  # orders 2, 6, 5040, 12
    data = make_batch(species, seed=2)
    ctx = make_ctx(data, sigma=0.5, centered=False)
    for proposal in ("uniform", "guided"):
        est = orbit_estimate(SpeciesPermutation(max_candidates=24, proposal=proposal), ctx, generator=gen)
        x0, xt = _np(ctx.x0), _np(ctx.xt)
        for b in (0, 1, 3):
            sl = graph_slice(data, b)
            cands = [x0[sl][list(p)] for p in species_group(species[b])]
            mean, w = gaussian_posterior_mean(x0[sl], xt[sl], 1.0, 0.5, cands)
            assert np.allclose(_np(est.target[sl]), mean, atol=1e-10)
            assert float(est.ess[b]) == pytest.approx(ess(w), rel=1e-9)
        assert est.weights.shape == (4, 24) and int((est.weights[0] > 0).sum()) == 2


def test_extra_factor_log_likelihood_enters_the_weights(ragged_batch):
    """``*_log_lik`` terms add to the log weights (e.g. a lattice kernel per candidate)."""
    ctx = make_ctx(ragged_batch, sigma=0.5)
    rots = torch.as_tensor(cube_rotations())
    cands = FiniteGroup(rots).candidates(ctx)
    extra = torch.randn(ctx.num_graphs, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cands.linear_log_lik = extra
    est_s = _structured(cands, ctx)
    est_m = _materialized(cands, ctx, "x0", 5)
    x0, xt = _np(ctx.x0), _np(ctx.xt)
    for b in range(ctx.num_graphs):
        sl = graph_slice(ragged_batch, b)
        ys = np.stack([x0[sl] @ r.T for r in _np(cands.linear[b])])
        logits = -((xt[sl][None] - ys) ** 2).sum((1, 2)) / (2 * 0.25) + _np(extra[b])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        for est in (est_s, est_m):
            assert np.allclose(_np(est.weights[b]), w, atol=1e-12)
            assert np.allclose(_np(est.target[sl]), np.einsum("k,kni->ni", w, ys), atol=1e-10)


# --- Monte-Carlo convergence ---------------------------------------------------------------------


def _mean_error(orbit_fn, ctx, exact, seeds=range(5)):
    errs = []
    for s in seeds:
        est = orbit_estimate(orbit_fn(), ctx, generator=torch.Generator().manual_seed(s))
        errs.append(np.linalg.norm(_np(est.target) - exact) / math.sqrt(exact.shape[0]))
    return float(np.mean(errs))


@pytest.mark.parametrize("proposal", ["uniform", "guided"])
def test_sampled_species_estimate_converges_to_exact(proposal):
    data = make_batch([[1] * 7], seed=3)  # |G| = 5040, sampled for every K below
    sigma = 0.8
    ctx = make_ctx(data, sigma=sigma, centered=False, seed=4)
    x0, xt = _np(ctx.x0), _np(ctx.xt)
    exact, w = gaussian_posterior_mean(x0, xt, 1.0, sigma, [x0[list(p)] for p in species_group([1] * 7)])
    assert 10 < ess(w) < 1000  # a spread posterior: the test is not trivial
    small = _mean_error(lambda: SpeciesPermutation(max_candidates=8, proposal=proposal), ctx, exact)
    large = _mean_error(lambda: SpeciesPermutation(max_candidates=4000, proposal=proposal), ctx, exact)
    assert large < 0.3 * small
    assert large < (0.15 if proposal == "uniform" else 0.04)


def test_matrix_fisher_reference_matches_haar_monte_carlo():
    """The closed-form reference (1-D integral) against plain importance sampling with scipy's Haar
    rotations: no orbit_pyg code involved."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    rots = Rotation.random(200000, random_state=1).as_matrix()
    for scale in (0.5, 3.0):
        f = scale * rng.normal(size=(3, 3))
        logits = np.einsum("kij,ij->k", rots, f)
        w = np.exp(logits - logits.max())
        mc = np.einsum("k,kij->ij", w / w.sum(), rots)
        exact, log_c = matrix_fisher_mean(f)
        assert np.abs(exact - mc).max() < 0.01
        assert log_c == pytest.approx(np.log(np.mean(np.exp(logits))), abs=0.01)


@pytest.mark.parametrize("proposal", ["uniform", "guided"])
def test_so3_estimate_converges_to_matrix_fisher_mean(proposal):
    data = make_batch([[1] * 5], seed=7)
    sigma = 0.6
    ctx = make_ctx(data, sigma=sigma, seed=8)
    exact = so3_posterior_mean(_np(ctx.x0), _np(ctx.xt), 1.0, sigma)
    assert np.linalg.norm(exact - _np(ctx.x0)) > 0.1  # the posterior is spread
    small = _mean_error(lambda: SO3(16, proposal=proposal), ctx, exact)
    big_k = 65536 if proposal == "uniform" else 4096
    large = _mean_error(lambda: SO3(big_k, proposal=proposal), ctx, exact)
    assert large < 0.1 * small
    assert large < 0.025


@pytest.mark.parametrize("proposal", ["uniform", "guided"])
def test_o3_estimate_converges_to_matrix_fisher_mixture(proposal):
    data = make_batch([[1] * 5], seed=9)
    sigma = 0.9
    ctx = make_ctx(data, sigma=sigma, seed=10)
    exact = so3_posterior_mean(_np(ctx.x0), _np(ctx.xt), 1.0, sigma, improper=True)
    proper_only = so3_posterior_mean(_np(ctx.x0), _np(ctx.xt), 1.0, sigma)
    assert np.linalg.norm(exact - proper_only) > 0.05  # reflections matter at this noise level
    large = _mean_error(lambda: O3(65536 if proposal == "uniform" else 8192, proposal=proposal), ctx, exact)
    small = _mean_error(lambda: O3(16, proposal=proposal), ctx, exact)
    assert large < 0.15 * small and large < 0.03


# --- structured == materialized -----------------------------------------------------------------


def _orbits_for_paths():
    return {
        "species": SpeciesPermutation(max_candidates=50),
        "species-guided-sampled": SpeciesPermutation(max_candidates=5, proposal="guided"),
        "so3-uniform": SO3(40),
        "so3-guided": SO3(40, proposal="guided"),
        "o3-guided": O3(40, proposal="guided"),
        "cube": FiniteGroup(torch.as_tensor(cube_rotations())),
        "hexagonal-lattice": FiniteGroup(torch.as_tensor(hexagonal_lattice_group())),
        "species-x-hexagonal": SpeciesPermutation(max_candidates=12) * FiniteGroup(torch.as_tensor(hexagonal_lattice_group())),
        "species-x-so3-guided": SpeciesPermutation(max_candidates=12) * SO3(9, proposal="guided"),
        "guided-species-x-o3": SpeciesPermutation(max_candidates=4, proposal="guided") * O3(6, proposal="guided"),
    }


@pytest.mark.parametrize("name", list(_orbits_for_paths()))
@pytest.mark.parametrize("sigma", [0.02, 0.5, 5.0])
def test_structured_and_materialized_paths_agree(name, sigma, ragged_batch, gen):
    ctx = make_ctx(ragged_batch, sigma=sigma, alpha=0.9)
    cands = _orbits_for_paths()[name].candidates(ctx, gen)
    ref = _structured(cands, ctx)
    assert torch.equal(orbit_estimate(cands, ctx).target, ref.target)  # the default path for Gaussian x0
    for chunk in (1, 7, None):
        mat = _materialized(cands, ctx, "x0", chunk)
        assert torch.allclose(mat.target, ref.target, atol=1e-10, rtol=0)
        assert torch.allclose(mat.weights, ref.weights, atol=1e-10, rtol=0)
        assert torch.allclose(mat.ess, ref.ess, rtol=1e-8)


def test_gaussian_score_target_is_consistent_with_x0_target(ragged_batch, gen):
    """For a Gaussian kernel, sum_k w_k score(x_t | g_k x0) = -(x_t - alpha x0_hat) / sigma^2."""
    ctx = make_ctx(ragged_batch, sigma=0.4, alpha=0.8)
    cands = (SpeciesPermutation(max_candidates=6) * SO3(20, proposal="guided")).candidates(ctx, gen)
    x0_hat = orbit_estimate(cands, ctx, target="x0").target
    score = orbit_estimate(cands, ctx, target="score").target
    assert torch.allclose(score, -(ctx.xt - 0.8 * x0_hat) / 0.16, atol=1e-9)


def test_weights_normalized_per_graph_and_ess_bounds(ragged_batch, gen):
    # graphs on very different scales: weights must never mix across graphs
    scaled = ragged_batch.clone()
    scaled.pos = ragged_batch.pos * torch.tensor([1.0, 30.0, 0.1, 5.0, 1.0], dtype=torch.float64)[ragged_batch.batch].view(-1, 1)
    ctx = make_ctx(scaled, sigma=0.3)
    est = orbit_estimate(SpeciesPermutation(max_candidates=50) * SO3(16), ctx, generator=gen)
    assert torch.allclose(est.weights.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert bool((est.weights >= 0).all())
    valid = (est.weights > 0).sum(1)
    assert bool((est.ess >= 1 - 1e-12).all()) and bool((est.ess <= valid + 1e-9).all())
    assert torch.allclose(effective_sample_size(est.log_weights), est.ess, rtol=1e-10)
    assert float(effective_sample_size(torch.log(torch.full((1, 8), 1 / 8.0)))) == pytest.approx(8.0)
    assert float(effective_sample_size(torch.tensor([[0.0, -math.inf]]))) == pytest.approx(1.0)


def test_identity_candidate_is_always_present(ragged_batch, gen):
    """With a Gaussian kernel at tiny noise the posterior sits on the generating element (the
    identity): the target equals x0 for every orbit."""
    ctx = make_ctx(ragged_batch, sigma=1e-4)
    for orbit in (SO3(8), O3(8), SpeciesPermutation(max_candidates=3), FiniteGroup(torch.as_tensor(cube_rotations()))):
        est = orbit_estimate(orbit, ctx, generator=gen)
        assert torch.allclose(est.target, ctx.x0, atol=1e-12)
