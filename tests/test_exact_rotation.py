"""Exact (matrix Fisher) rotation marginals: quadrature, estimator, permutations, O(3)."""
import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from orbit_pyg import OrbitDiffusionLoss, VPSchedule
from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.kernels import GaussianKernel
from orbit_pyg.orbits import O3, SO3, ExplicitPermutations, OrbitContext, SpeciesPermutation, kabsch, random_rotations
from orbit_pyg.orbits.matrix_fisher import matrix_fisher_mean, matrix_fisher_moments, proper_svd
from orbit_pyg.transforms import OrbitNoise

F64 = torch.float64


def _mp_reference(s, dps=20):
    """``log c`` and ``d`` by mpmath quadrature (breakpoints clustered at both ends)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = dps
    s1, s2, s3 = [mpmath.mpf(v) for v in s]
    ends = [mpmath.mpf(10) ** (-k) for k in range(1, 13, 2)]
    pts = [-1] + [-1 + e for e in ends[::-1]] + [0] + [1 - e for e in ends] + [1]

    def integral(si, sj, sk, power):
        def f(u):
            return (mpmath.besseli(0, (si - sj) * (1 - u) / 2) * mpmath.besseli(0, (si + sj) * (1 + u) / 2)
                    * mpmath.exp(sk * (u - 1) - si - sj) * u**power / 2)
        return mpmath.quad(f, pts)

    c3 = integral(s1, s2, s3, 0)
    log_c = float(mpmath.log(c3) + s1 + s2 + s3)
    d = [integral(a, b, k, 1) / integral(a, b, k, 0) for a, b, k in ((s2, s3, s1), (s1, s3, s2), (s1, s2, s3))]
    return log_c, [float(v) for v in d]


@pytest.mark.parametrize("s", [
    (0.5, 0.2, 0.1), (10.0, 5.0, -2.0),
    pytest.param((1e4, 1e2, -1e2), marks=pytest.mark.slow), pytest.param((1e6, 1.0, 0.0), marks=pytest.mark.slow),
    pytest.param((1e9, 1e9, -1e9), marks=pytest.mark.slow),
])
def test_moments_match_high_precision_quadrature(s):
    log_c, d = matrix_fisher_moments(torch.tensor([s], dtype=F64))
    ref_c, ref_d = _mp_reference(s)
    assert abs(float(log_c) - ref_c) <= 1e-13 * max(1.0, abs(ref_c))
    assert torch.allclose(d[0], torch.tensor(ref_d, dtype=F64), atol=1e-12, rtol=0)


def test_high_noise_rule_matches_log_scale_rule():
    """Small spectra (s_1 <= SMALL) take plain Gauss–Legendre; it must agree with the log-scale rule."""
    g = torch.Generator().manual_seed(11)
    s = torch.sort(18 * torch.rand(300, 3, generator=g, dtype=F64), descending=True).values
    s[::2, 2] *= -1
    log_c, d = matrix_fisher_moments(s)
    ref_c, ref_d = matrix_fisher_moments(s, nodes=64, panels=48)
    assert torch.allclose(log_c, ref_c, atol=1e-12, rtol=0) and torch.allclose(d, ref_d, atol=1e-12, rtol=0)


def test_moments_are_the_gradient_of_the_log_normalizer():
    s = torch.tensor([[4.0, 1.5, -0.7], [40.0, 30.0, 25.0], [2e3, 1e3, 5.0]], dtype=F64, requires_grad=True)
    log_c, d = matrix_fisher_moments(s)
    (grad,) = torch.autograd.grad(log_c.sum(), s)
    assert torch.allclose(grad, d, atol=1e-9)


def test_uniform_limit_and_normalization():
    log_c, d = matrix_fisher_moments(torch.zeros(1, 3, dtype=F64))
    assert abs(float(log_c)) < 1e-12 and float(d.abs().max()) < 1e-12
    # small F: c = 1 + |F|^2 / 6 + ..., E[R] = F / 3 + ... (Haar moments E[R_ij R_kl] = delta_ik delta_jl / 3)
    f = 1e-6 * torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    log_c, mean = matrix_fisher_mean(f)
    assert abs(float(log_c) - float(f.square().sum()) / 6) < 1e-12
    assert torch.allclose(mean, f / 3, atol=1e-12)


def test_quadrature_converged_at_extreme_spectra():
    """The default rule agrees with a 16x finer one where the integrand is most multi-scale."""
    s = torch.tensor([[1e12, 1e3, 1.0], [1e10, 1e10, -1e10], [1e6, 1e6, -999997.0], [1e6, 1.0, 0.0],
                      [1e8, 1e8, 1e8], [30.0, 0.0, 0.0]], dtype=F64)
    log_c, d = matrix_fisher_moments(s)
    ref_c, ref_d = matrix_fisher_moments(s, nodes=64, panels=48)
    assert torch.allclose(log_c, ref_c, rtol=1e-13, atol=1e-12)
    assert torch.allclose(d, ref_d, atol=1e-9)
    assert bool(torch.isfinite(log_c).all()) and bool((d.abs() <= 1).all())


@pytest.mark.parametrize("scale", [0.5, 3.0, 15.0])
def test_mean_matches_monte_carlo(scale):
    g = torch.Generator().manual_seed(2)
    f = scale * torch.randn(3, 3, dtype=F64, generator=g)
    log_c, mean = matrix_fisher_mean(f)
    r = random_rotations((400_000,), g)
    logits = (r * f).sum((-1, -2))
    w = torch.softmax(logits, 0)
    mc_mean = (w.view(-1, 1, 1) * r).sum(0)
    mc_log_c = float(torch.logsumexp(logits, 0)) - math.log(r.size(0))
    ess = 1 / float(w.square().sum())
    tol = 6 / math.sqrt(ess)
    assert float((mean - mc_mean).abs().max()) < tol
    assert abs(float(log_c) - mc_log_c) < tol


def test_proper_svd_and_kabsch_limit():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(50, 3, 3, dtype=F64, generator=g)
    u, s, v = proper_svd(f)
    assert torch.allclose(u @ torch.diag_embed(s) @ v.mT, f, atol=1e-12)
    assert torch.allclose(torch.linalg.det(u), torch.ones(50, dtype=F64)) and torch.allclose(torch.linalg.det(v), torch.ones(50, dtype=F64))
    assert bool((torch.sign(s[:, 2]) == torch.sign(torch.linalg.det(f))).all())
    _, mean = matrix_fisher_mean(1e10 * f)
    rot, _ = kabsch(f)
    assert torch.allclose(mean, rot, atol=1e-8)


def _molecule(n, g, dtype=F64):
    x = torch.randn(n, 3, generator=g, dtype=F64)
    return (x - x.mean(0)).to(dtype)


def _ctx(x0, xt, sigma, batch=None, num_graphs=1, data=None):
    batch = torch.zeros(x0.size(0), dtype=torch.long) if batch is None else batch
    alpha = torch.full((num_graphs,), math.sqrt(max(1 - sigma**2, 0.0)) if sigma < 1 else 0.5, dtype=F64)
    sig = torch.full((num_graphs,), sigma, dtype=F64)
    return OrbitContext(x0, xt, batch, num_graphs, alpha, sig, GaussianKernel(), data=data)


def _noisy(x0, sigma, g, alpha):
    return (alpha * x0.to(F64) + sigma * torch.randn(x0.shape, generator=g, dtype=F64)).to(x0.dtype)


def _sampled_mean(orbit, ctx, g, repeats=4):
    runs = torch.stack([orbit_estimate(orbit, ctx, generator=g).target.to(F64) for _ in range(repeats)])
    return runs.mean(0), runs.std(0) / math.sqrt(repeats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [1e-3, 0.05, 0.3, 1.0, 3.0])
def test_so3_exact_matches_large_k_importance_sampling(sigma, dtype):
    g = torch.Generator().manual_seed(4)
    x0 = _molecule(7, g, dtype)
    ctx = _ctx(x0, None, sigma)
    ctx.xt = _noisy(x0, sigma, g, float(ctx.alpha[0]))
    exact = orbit_estimate(SO3(proposal="exact"), ctx)
    assert exact.target.dtype == dtype and float(exact.ess[0]) == 1.0
    mc, se = _sampled_mean(SO3(20_000, proposal="guided"), ctx, g)
    tol = 6 * se.max() + (1e-5 if dtype == torch.float32 else 1e-9) * (1 + mc.abs().max())
    assert float((exact.target.to(F64) - mc).abs().max()) <= tol


@pytest.mark.parametrize("sigma", [0.02, 0.5, 2.0])
def test_o3_exact_matches_importance_sampling(sigma):
    g = torch.Generator().manual_seed(5)
    x0 = _molecule(6, g)
    ctx = _ctx(x0, None, sigma)
    # half the time a reflected molecule, so both components carry weight somewhere
    ctx.xt = _noisy(-x0, sigma, g, float(ctx.alpha[0]))
    exact = orbit_estimate(O3(proposal="exact"), ctx)
    assert exact.weights.shape == (1, 2) and 1.0 <= float(exact.ess[0]) <= 2.0
    mc, se = _sampled_mean(O3(20_000, proposal="guided"), ctx, g)
    assert float((exact.target - mc).abs().max()) <= 6 * float(se.max()) + 1e-9


def test_permutation_candidates_match_brute_force():
    """Species permutations (enumerated) × exact SO(3) vs the same permutations × sampled SO(3)."""
    g = torch.Generator().manual_seed(6)
    x0 = _molecule(6, g)
    z = torch.tensor([6, 1, 1, 1, 8, 8])
    sigma = 0.9
    ctx = _ctx(x0, None, sigma, data=Data(z=z, pos=x0))
    ctx.xt = _noisy(x0, sigma, g, float(ctx.alpha[0]))
    exact = orbit_estimate(SpeciesPermutation(max_candidates=12) * SO3(proposal="exact"), ctx)
    assert exact.weights.shape == (1, 12) and float(exact.ess[0]) > 1.5  # several permutations compete
    # brute force over the permutations, each with the closed form written out
    perms = SpeciesPermutation(max_candidates=12).candidates(ctx).perm
    a, s2 = float(ctx.alpha[0]), sigma**2
    f = torch.stack([(a / s2) * ctx.xt.T @ x0[p] for p in perms])
    log_c, mean = matrix_fisher_mean(f)
    w = torch.softmax(log_c, 0)
    brute = sum(w[k] * x0[p] @ mean[k].T for k, p in enumerate(perms))
    assert torch.allclose(exact.target, brute, atol=1e-10)
    mc, se = _sampled_mean(SpeciesPermutation(max_candidates=12) * SO3(4000, proposal="guided"), ctx, g)
    assert float((exact.target - mc).abs().max()) <= 6 * float(se.max()) + 1e-9


@pytest.mark.parametrize("orbit", [SO3(proposal="exact"), O3(proposal="exact"),
                                   ExplicitPermutations() * O3(proposal="exact")])
def test_exact_target_is_equivariant(orbit):
    g = torch.Generator().manual_seed(7)
    sizes = [5, 3]
    batch = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    x0 = torch.cat([_molecule(s, g) for s in sizes])
    sigma = 0.3
    data = Batch.from_data_list([Data(pos=x0[batch == i], orbit_perm=torch.tensor([list(range(s)), list(range(s))[::-1]]).T)
                                 for i, s in enumerate(sizes)])
    ctx = _ctx(x0, None, sigma, batch, 2, data=data)
    ctx.xt = _noisy(x0, sigma, g, float(ctx.alpha[0]))
    base = orbit_estimate(orbit, ctx).target
    q = random_rotations((1,), g)[0]
    improper = any(isinstance(o, O3) for o in getattr(orbit, "orbits", [orbit]))
    for sign in (1.0, -1.0) if improper else (1.0,):
        qs = sign * q
        moved = orbit_estimate(orbit, _ctx(x0, ctx.xt @ qs.T, sigma, batch, 2, data=data)).target
        assert torch.allclose(moved, base @ qs.T, atol=1e-9)
        # rotating the clean data does not change the target: the orbit is the same
        same = orbit_estimate(orbit, _ctx(x0 @ qs.T, ctx.xt, sigma, batch, 2, data=data)).target
        assert torch.allclose(same, base, atol=1e-9)


def test_kabsch_limit_at_tiny_noise():
    g = torch.Generator().manual_seed(8)
    x0 = _molecule(9, g)
    q = random_rotations((1,), g)[0]
    sigma = 1e-6
    ctx = _ctx(x0, None, sigma)
    ctx.xt = _noisy(x0 @ q.T, sigma, g, float(ctx.alpha[0]))
    est = orbit_estimate(SO3(proposal="exact"), ctx)
    rot, _ = kabsch(ctx.xt.T @ x0)
    assert torch.allclose(est.target, x0 @ rot.T, atol=1e-9)
    assert torch.allclose(est.target, x0 @ q.T, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_every_noise_level_and_degenerate_shapes(dtype):
    g = torch.Generator().manual_seed(9)
    shapes = [
        _molecule(6, g),  # generic
        torch.tensor([[0.0, 0.0, 0.0]], dtype=F64),  # one atom: F = 0
        torch.tensor([[-1.0, 0, 0], [0, 0, 0], [1.0, 0, 0]], dtype=F64),  # linear
        torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-1.0, -1.0, 0]], dtype=F64) / 3,  # planar
    ]
    sizes = [s.size(0) for s in shapes]
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    x0 = torch.cat([s - s.mean(0) for s in shapes]).to(dtype)
    for sigma in [1e-8, 1e-5, 1e-3, 0.1, 1.0, 10.0, 1e3]:
        ctx = _ctx(x0, None, sigma, batch, len(shapes))
        ctx.xt = _noisy(x0, sigma, g, float(ctx.alpha[0]))
        for orbit in (SO3(proposal="exact"), O3(proposal="exact")):
            est = orbit_estimate(orbit, ctx)
            assert bool(torch.isfinite(est.target).all()) and bool(torch.isfinite(est.weights).all())
            # the target is a contraction of x0 (E[R] has singular values <= 1)
            norms = torch.zeros(len(shapes), dtype=F64).index_add_(0, batch, est.target.to(F64).square().sum(1))
            ref = torch.zeros(len(shapes), dtype=F64).index_add_(0, batch, x0.to(F64).square().sum(1))
            assert bool((norms <= ref * (1 + 1e-5) + 1e-12).all())


def test_loss_transform_and_score_target_accept_exact():
    g = torch.Generator().manual_seed(10)
    batch = Batch.from_data_list([Data(pos=torch.randn(5, 3, generator=g), z=torch.tensor([6, 1, 1, 1, 1])),
                                  Data(pos=torch.randn(4, 3, generator=g), z=torch.tensor([8, 1, 1, 8]))])
    orbit = SpeciesPermutation(max_candidates=24) * O3(proposal="exact")
    loss = OrbitDiffusionLoss(VPSchedule(), orbit=orbit, mode="orbit", parameterization="eps")
    noisy = loss.corrupt(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(noisy.target).all() and noisy.weights.shape == (2, 48)
    out = OrbitNoise(VPSchedule(), SO3(proposal="exact"), generator=torch.Generator().manual_seed(1))(Data(pos=torch.randn(6, 3)))
    assert out.target.shape == (6, 3) and float(out.ess) == 1.0
    # the score form equals -(x_t - alpha x0_hat) / sigma^2
    x0 = _molecule(5, g)
    ctx = _ctx(x0, None, 0.4)
    ctx.xt = _noisy(x0, 0.4, g, float(ctx.alpha[0]))
    x0_hat = orbit_estimate(SO3(proposal="exact"), ctx).target
    score = orbit_estimate(SO3(proposal="exact"), ctx, target="score").target
    assert torch.allclose(score, -(ctx.xt - ctx.alpha[0] * x0_hat) / 0.16, atol=1e-10)
    assert repr(SO3(proposal="exact")) == "SO3(proposal='exact')"
