"""Exact torus-translation marginals: per-axis quadrature vs brute force and importance sampling."""
import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion, CrystalDiffusionLoss, crystal_orbit
from orbit_pyg.integrations.crystal.orbits import LatticePermutation, TorusTranslation
from orbit_pyg.kernels import WrappedNormalKernel
from orbit_pyg.orbits import OrbitContext, SpeciesPermutation
from orbit_pyg.orbits.torus_quadrature import circular_least_squares_mean

F64 = torch.float64
KERNEL = WrappedNormalKernel()
SIZES = [5, 8, 1]


def _crystals(g, dtype=F64, sizes=SIZES):
    batch = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return torch.rand(batch.numel(), 3, generator=g, dtype=F64).to(dtype), batch


def _ctx(x0, batch, sigma, g, data=None):
    b = int(batch.max()) + 1
    s = sigma * torch.linspace(0.7, 1.3, b, dtype=F64)
    xt = torch.remainder(x0.to(F64) + s[batch].view(-1, 1) * torch.randn(x0.shape, generator=g, dtype=F64), 1.0)
    return OrbitContext(x0, xt.to(x0.dtype), batch, b, torch.ones(b, dtype=F64), s, KERNEL, data=data)


def _dense_reference(ctx, positions, log_lik=None, grid=2**15):
    """Brute force: every candidate's per-axis posterior on a dense periodic grid, joint softmax."""
    m = torch.arange(grid, dtype=F64) / grid
    b = ctx.num_graphs
    log_z, targets = [], []
    for pos in positions:  # [N, 3] per candidate
        delta = (ctx.xt.to(F64) - pos.to(F64)).unsqueeze(-1) - m  # [N, 3, G]
        lp, sc = KERNEL.log_prob_and_score(delta, torch.zeros(()), None, ctx.sigma[ctx.batch].view(-1, 1, 1))
        ll = torch.zeros(b, 3, grid, dtype=F64).index_add_(0, ctx.batch, lp)
        lse = torch.logsumexp(ll, -1)
        post = torch.exp(ll - lse.unsqueeze(-1))
        targets.append((post[ctx.batch] * sc).sum(-1))
        log_z.append((lse - math.log(grid)).sum(-1))
    log_z = torch.stack(log_z, 1)  # [B, C]
    if log_lik is not None:
        log_z = log_z + log_lik
    w = torch.softmax(log_z, 1)
    return sum(w[ctx.batch, k].view(-1, 1) * t for k, t in enumerate(targets)), w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [1e-3, 5e-3, 0.02, 0.05, 0.1, 0.3, 1.0])
def test_exact_shift_matches_dense_quadrature(sigma, dtype):
    g = torch.Generator().manual_seed(0)
    x0, batch = _crystals(g, dtype)
    ctx = _ctx(x0, batch, sigma, g)
    est = orbit_estimate(TorusTranslation(proposal="exact"), ctx, target="score")
    assert est.target.dtype == dtype and torch.equal(est.ess, torch.ones(3, dtype=F64))
    ref, _ = _dense_reference(ctx, [x0])
    scale = 1 + float(ref.abs().max())
    tol = (2e-6 if dtype == torch.float32 else 1e-10) * scale
    assert float((est.target.to(F64) - ref).abs().max()) <= tol
    # one atom: every shift fits it exactly, so the averaged score vanishes
    assert float(est.target[-1].abs().max()) <= tol


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.4])
def test_exact_shift_matches_large_k_importance_sampling(sigma):
    g = torch.Generator().manual_seed(1)
    x0, batch = _crystals(g)
    ctx = _ctx(x0, batch, sigma, g)
    exact = orbit_estimate(TorusTranslation(proposal="exact"), ctx, target="score").target
    runs = torch.stack([orbit_estimate(TorusTranslation(20_000, proposal="guided"), ctx, target="score", generator=g).target
                        for _ in range(4)])
    se = runs.std(0) / 2
    assert float((exact - runs.mean(0)).abs().max()) <= 6 * float(se.max()) + 1e-9


@pytest.mark.parametrize("sigma", [0.01, 0.25])
def test_permutation_candidates_match_brute_force(sigma):
    """Species × lattice permutations with the shift integrated out: joint softmax of the 1-D
    log-normalizers (plus the lattice kernel), against a dense-grid brute force per candidate.
    Two atoms of one species sit close together, so that swapping them competes at low noise."""
    g = torch.Generator().manual_seed(2)
    sizes = [4, 5]
    x0, batch = _crystals(g, sizes=sizes)
    x0[1] = torch.remainder(x0[0] + 0.01 * torch.randn(3, generator=g, dtype=F64), 1.0)
    z = torch.tensor([1, 1, 2, 2, 3, 3, 3, 4, 4])
    cells = 4 * torch.eye(3, dtype=F64).expand(2, 3, 3) + 0.3 * torch.randn(2, 3, 3, generator=g, dtype=F64)
    data = Batch.from_data_list([Data(z=z[batch == i], cell=cells[i : i + 1], num_nodes=s) for i, s in enumerate(sizes)])
    data.cell_t = 0.9 * cells + 0.4 * torch.randn(2, 3, 3, generator=g, dtype=F64)
    data.lattice_alpha, data.lattice_sigma = torch.full((2,), 0.9, dtype=F64), torch.full((2,), 2.0, dtype=F64)
    ctx = _ctx(x0, batch, sigma, g, data=data)
    orbit = TorusTranslation(proposal="exact") * LatticePermutation() * SpeciesPermutation(key="z", max_candidates=12)
    cands = orbit.candidates(ctx)
    est = orbit_estimate(cands, ctx, target="score")
    k = cands.num_candidates
    positions = cands.materialize(x0, batch, torch.arange(k))
    offset, mask = cands.joint_log_nu_and_mask(x0.device)
    log_lik = torch.where(mask.reshape(2, k), -offset.reshape(2, k), -torch.inf)  # padded candidates: none
    ref, w = _dense_reference(ctx, list(positions), log_lik, grid=2**13)
    assert torch.allclose(est.weights, w, atol=1e-10)
    assert float((est.target - ref).abs().max()) <= 1e-9 * (1 + float(ref.abs().max()))
    assert 1.5 < float(est.ess.max())  # several candidates compete in at least one crystal


def test_circular_least_squares_mean_is_the_minimizer():
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 6, 11]
    batch = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    delta = torch.rand(4, batch.numel(), 2, generator=g, dtype=F64)
    delta[1] = 0.3 + 0.05 * torch.randn(batch.numel(), 2, generator=g, dtype=F64)  # clustered across the seam too
    delta[2] = torch.remainder(0.98 + 0.05 * torch.randn(batch.numel(), 2, generator=g, dtype=F64), 1.0)
    mean = circular_least_squares_mean(delta, batch, 4)  # [4, B, 2]
    m = torch.arange(20_000, dtype=F64) / 20_000
    wrap = lambda x: x - torch.round(x)  # noqa: E731
    cost = torch.zeros(4, 4, 2, m.numel(), dtype=F64).index_add_(1, batch, wrap(delta.unsqueeze(-1) - m) ** 2)
    best_cost = cost.min(-1).values
    at_mean = torch.zeros(4, 4, 2, dtype=F64).index_add_(1, batch, wrap(delta - mean[:, batch]) ** 2)
    assert bool((at_mean <= best_cost + 1e-12).all())


def test_exact_target_is_invariant_to_shifts_and_equivariant_to_basis_relabelling():
    g = torch.Generator().manual_seed(4)
    x0, batch = _crystals(g)
    ctx = _ctx(x0, batch, 0.03, g)
    orbit = TorusTranslation(proposal="exact")
    base = orbit_estimate(orbit, ctx, target="score").target
    shift = torch.rand(3, 3, generator=g, dtype=F64)[batch]
    for xt, x in ((torch.remainder(ctx.xt + shift, 1.0), x0), (ctx.xt, torch.remainder(x0 + shift, 1.0))):
        moved = OrbitContext(x, xt, batch, 3, ctx.alpha, ctx.sigma, KERNEL)
        assert torch.allclose(orbit_estimate(orbit, moved, target="score").target, base, atol=1e-8)
    perm = torch.tensor([2, 0, 1])
    relabelled = OrbitContext(x0[:, perm], ctx.xt[:, perm], batch, 3, ctx.alpha, ctx.sigma, KERNEL)
    assert torch.allclose(orbit_estimate(orbit, relabelled, target="score").target, base[:, perm], atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_every_noise_level(dtype):
    g = torch.Generator().manual_seed(5)
    x0, batch = _crystals(g, dtype, sizes=[1, 3, 40])
    for sigma in [1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5, 2.0, 10.0]:
        ctx = _ctx(x0, batch, sigma, g)
        est = orbit_estimate(TorusTranslation(proposal="exact") * LatticePermutation(signed=True), ctx, target="score")
        assert bool(torch.isfinite(est.target).all()) and bool(torch.isfinite(est.weights).all())


def test_crystal_loss_accepts_exact():
    g = torch.Generator().manual_seed(6)
    d = [Data(z=torch.tensor([38, 22, 8, 8, 8]), frac_coords=torch.rand(5, 3, generator=g), cell=4 * torch.eye(3).unsqueeze(0), num_nodes=5),
         Data(z=torch.tensor([3, 8]), frac_coords=torch.rand(2, 3, generator=g), cell=3 * torch.eye(3).unsqueeze(0), num_nodes=2)]
    orbit = crystal_orbit(proposal="exact", lattice=True, species=6)
    assert "TorusTranslation(proposal='exact')" in repr(orbit)
    loss = CrystalDiffusionLoss("orbit", orbit, CrystalDiffusion(50))
    noisy = loss.corrupt(Batch.from_data_list(d), torch.Generator().manual_seed(0))
    assert torch.isfinite(noisy.coord_target).all() and torch.isfinite(noisy.lattice_target).all()
    assert bool((noisy.ess >= 1 - 1e-9).all()) and bool((noisy.ess <= 36 + 1e-9).all())
    from orbit_pyg.kernels import GaussianKernel

    ctx = OrbitContext(torch.rand(3, 3), torch.rand(3, 3), torch.zeros(3, dtype=torch.long), 1,
                       torch.ones(1, dtype=F64), torch.ones(1, dtype=F64), GaussianKernel())
    with pytest.raises(ValueError, match="wrapped-normal"):
        orbit_estimate(TorusTranslation(proposal="exact"), ctx, target="score")
    from orbit_pyg.kernels import WrappedNormalKernel
    from orbit_pyg.orbits import SO3

    ctx = OrbitContext(torch.rand(3, 3), torch.rand(3, 3), torch.zeros(3, dtype=torch.long), 1,
                       torch.ones(1, dtype=F64), torch.full((1,), 0.1, dtype=F64), WrappedNormalKernel())
    with pytest.raises(ValueError, match="do not combine"):
        orbit_estimate(TorusTranslation(proposal="exact") * SO3(proposal="exact"), ctx, target="score")


def test_local_grid_follows_the_mode_when_atoms_disagree():
    """A candidate whose atoms disagree (a wrong permutation): at low noise its posterior mode is the
    circular least-squares mean (0.18 here), not the circular mean (0.08), and the local grid must sit
    there for log Z and the target to be right."""
    from orbit_pyg.orbits.torus_quadrature import shift_marginal

    base = torch.tensor([0.0, 0.0, 0.0, 0.45, 0.45], dtype=F64)
    delta = torch.stack([base, torch.remainder(base + 0.3, 1.0), base.flip(0)], -1).unsqueeze(0)  # [1, 5, 3]
    batch = torch.zeros(5, dtype=torch.long)
    sigma = torch.full((1,), 0.01, dtype=F64)
    log_z, target = shift_marginal(delta, batch, 1, sigma, KERNEL)
    m = torch.arange(2**16, dtype=F64) / 2**16
    lp, sc = KERNEL.log_prob_and_score(delta[0].unsqueeze(-1) - m, torch.zeros(()), None, sigma.view(1, 1, 1))
    ll = lp.sum(0)  # [3, G]
    ref_log_z = (torch.logsumexp(ll, -1) - math.log(m.numel())).sum()
    ref_target = (torch.softmax(ll, -1) * sc).sum(-1)
    assert abs(float(log_z[0, 0]) - float(ref_log_z)) <= 1e-9 * abs(float(ref_log_z))
    assert torch.allclose(target[0], ref_target, rtol=1e-9, atol=1e-9)
