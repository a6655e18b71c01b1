"""Orbits: group actions are isometries, compose correctly, and sample from the stated laws."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torch_geometric.data import Batch, Data

from _reference import cube_rotations, dihedral_square, haar_angle_cdf, proper_svd, rotation_angle_np, species_group
from conftest import center, graph_slice, make_batch, make_ctx
from orbit_pyg.orbits import (
    O3,
    SO3,
    ExplicitPermutations,
    FiniteGroup,
    OrbitCandidates,
    OrbitContext,
    SpeciesPermutation,
    quaternion_to_matrix,
    random_rotations,
    rotation_angle,
)
from orbit_pyg.orbits.rotation import kabsch, log_tangent_gaussian_density

# --- fixtures ----------------------------------------------------------------------------------


def symmetric_batch() -> Batch:
    """Graphs whose listed automorphisms are isometries of their geometry (for ExplicitPermutations)."""
    square = torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64)
    tri = torch.tensor([[1.0, 0, 0], [-0.5, math.sqrt(3) / 2, 0], [-0.5, -math.sqrt(3) / 2, 0]], dtype=torch.float64)
    water = torch.tensor([[0.0, 0.0, 0.1], [0.8, 0.0, -0.5], [-0.8, 0.0, -0.5]], dtype=torch.float64)
    lone = torch.zeros(1, 3, dtype=torch.float64)
    a = 8
    perms = [
        dihedral_square(),
        [tuple(p) for p in itertools.permutations(range(3))],
        [(0, 1, 2), (0, 2, 1)],
        [(0,)],
    ]
    datas = []
    for pos, group in zip([square, tri, water, lone], perms):
        table = torch.full((pos.size(0), a), -1, dtype=torch.long)
        for col, p in enumerate(group):
            table[:, col] = torch.tensor(p)
        datas.append(Data(pos=pos, orbit_perm=table, z=torch.ones(pos.size(0), dtype=torch.long)))
    return Batch.from_data_list(datas)


def orbit_factories():
    return {
        "so3-uniform": lambda: SO3(33),
        "so3-guided": lambda: SO3(33, proposal="guided"),
        "o3-uniform": lambda: O3(34),
        "o3-guided": lambda: O3(34, proposal="guided"),
        "species-enumerated": lambda: SpeciesPermutation(max_candidates=50),
        "species-sampled": lambda: SpeciesPermutation(max_candidates=5),
        "species-guided": lambda: SpeciesPermutation(max_candidates=5, proposal="guided"),
        "cube": lambda: FiniteGroup(torch.as_tensor(cube_rotations())),
        "species-x-so3": lambda: SpeciesPermutation(max_candidates=4) * SO3(5, proposal="guided"),
    }


def all_positions(cands: OrbitCandidates, x0: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return cands.materialize(x0, batch, torch.arange(cands.num_candidates))


def valid_mask(cands: OrbitCandidates, b: int) -> torch.Tensor:
    _, mask = cands.joint_log_nu_and_mask("cpu")
    return mask.reshape(b, -1)


def pdist(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x)


# --- isometry and group structure ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(orbit_factories()))
def test_orbit_actions_are_isometries(name, ragged_batch, gen):
    orbit = orbit_factories()[name]()
    ctx = make_ctx(ragged_batch, sigma=0.3)
    cands = orbit.candidates(ctx, gen)
    pos = all_positions(cands, ctx.x0, ctx.batch)
    mask = valid_mask(cands, ctx.num_graphs)
    assert torch.equal(pos[0], ctx.x0), "candidate 0 must be the identity"
    has_perm = cands.perm is not None
    for b in range(ctx.num_graphs):
        sl = graph_slice(ragged_batch, b)
        d0 = pdist(ctx.x0[sl])
        for k in torch.nonzero(mask[b]).flatten().tolist():
            dk = pdist(pos[k, sl])
            if has_perm:
                # a permutation only reorders the distance matrix: compare the multisets
                assert torch.allclose(dk.flatten().sort().values, d0.flatten().sort().values, atol=1e-10)
            else:
                assert torch.allclose(dk, d0, atol=1e-10)
    if has_perm:
        z, n = ragged_batch.z, ctx.x0.size(0)
        for k in range(cands.perm.size(0)):
            p = cands.perm[k]
            assert torch.equal(p.sort().values, torch.arange(n)), "not a bijection"
            assert torch.equal(z[p], z), "permutes across species"
            assert torch.equal(ctx.batch[p], ctx.batch), "moves a node to another graph"


def test_explicit_permutations_are_isometries_of_symmetric_graphs(gen):
    data = symmetric_batch()
    x0 = center(data.pos, data.batch, data.num_graphs)
    ctx = OrbitContext(x0=x0, xt=x0, batch=data.batch, num_graphs=data.num_graphs, data=data)
    cands = ExplicitPermutations().candidates(ctx)
    mask = valid_mask(cands, data.num_graphs)
    assert mask.sum(1).tolist() == [8, 6, 2, 1]
    pos = all_positions(cands, x0, data.batch)
    for b in range(data.num_graphs):
        sl = graph_slice(data, b)
        for k in torch.nonzero(mask[b]).flatten().tolist():
            assert torch.allclose(pdist(pos[k, sl]), pdist(x0[sl]), atol=1e-12)
        local = {tuple((cands.perm[k, sl] - sl.start).tolist()) for k in torch.nonzero(mask[b]).flatten().tolist()}
        assert len(local) == int(mask[b].sum())  # each element listed once
        # the listed set is closed under composition (a group)
        for p in local:
            for q in local:
                assert tuple(p[i] for i in q) in local


def test_rotation_candidates_orthogonal_with_right_determinant(ragged_batch, gen):
    ctx = make_ctx(ragged_batch, sigma=0.5)
    eye = torch.eye(3, dtype=torch.float64)
    for proposal in ("uniform", "guided"):
        so3 = SO3(64, proposal=proposal).candidates(ctx, gen).linear
        assert torch.allclose(so3 @ so3.transpose(-1, -2), eye.expand_as(so3), atol=1e-12)
        assert torch.allclose(torch.linalg.det(so3), torch.ones(so3.shape[:2], dtype=torch.float64), atol=1e-12)
        o3 = O3(64, proposal=proposal).candidates(ctx, gen).linear
        assert torch.allclose(o3 @ o3.transpose(-1, -2), eye.expand_as(o3), atol=1e-12)
        det = torch.linalg.det(o3)
        assert torch.allclose(det.abs(), torch.ones_like(det), atol=1e-12)
        assert torch.equal(o3[:, 0], eye.expand(ctx.num_graphs, 3, 3))
        # half of the candidates are improper
        assert ((det < 0).sum(1) == 32).all() and ((det > 0).sum(1) == 32).all()
    el = O3().random_element(make_ctx(make_batch([[1]] * 400), sigma=1.0), gen).linear
    signs = torch.linalg.det(el).round()
    assert 150 < int((signs > 0).sum()) < 250 and int((signs.abs() == 1).sum()) == 400
    el = SO3().random_element(make_ctx(make_batch([[1]] * 50), sigma=1.0), gen).linear
    assert torch.allclose(torch.linalg.det(el), torch.ones(50, 1, dtype=torch.float64), atol=1e-12)


def _check_combined(c1, c2, x0, batch):
    both = c1.combine(c2)
    k1, k2 = c1.num_candidates, c2.num_candidates
    assert both.num_candidates == k1 * k2
    pos2 = all_positions(c2, x0, batch)
    for i in range(k1):
        for j in range(k2):
            # the pair (i, j) sits at flat index i * k2 + j, whether both act on the same factor
            # (composed factor) or on different ones (perm-major joint order)
            got = both.materialize(x0, batch, torch.tensor([i * k2 + j]))[0]
            expected = c1.materialize(pos2[j], batch, torch.tensor([i]))[0]  # apply h = c2[j], then g = c1[i]
            assert torch.allclose(got, expected, atol=1e-12)
    return both


def test_combine_equals_applying_both(ragged_batch, gen):
    ctx = make_ctx(ragged_batch, sigma=0.5)
    x0, batch = ctx.x0, ctx.batch
    rot1 = SO3(4, proposal="guided").candidates(ctx, gen)
    rot2 = SO3(3).candidates(ctx, gen)
    both = _check_combined(rot1, rot2, x0, batch)  # linear x linear: matrix product
    l1, l2 = rot1.linear_log_nu, rot2.linear_log_nu
    assert torch.allclose(both.linear_log_nu, (l1.unsqueeze(2) + l2.unsqueeze(1)).reshape(ctx.num_graphs, -1))
    sp1 = SpeciesPermutation(max_candidates=3).candidates(ctx, gen)
    sp2 = SpeciesPermutation(max_candidates=2).candidates(ctx, gen)
    both = _check_combined(sp1, sp2, x0, batch)  # perm x perm: composition of index maps
    m1, m2 = sp1.perm_mask, sp2.perm_mask
    assert torch.equal(both.perm_mask, (m1.unsqueeze(2) & m2.unsqueeze(1)).reshape(ctx.num_graphs, -1))
    _check_combined(sp1, rot2, x0, batch)  # perm x linear: the two commute


def test_finite_group_closure_inverse_and_identity():
    cube = torch.as_tensor(cube_rotations())
    orbit = FiniteGroup(cube[torch.randperm(24, generator=torch.Generator().manual_seed(0))])
    g = orbit.elements
    assert g.shape == (24, 3, 3)
    assert torch.equal(g[0], torch.eye(3, dtype=torch.float64))
    data = make_batch([[1, 1, 1]])
    ctx = make_ctx(data, sigma=1.0)
    c = orbit.candidates(ctx)
    prod = c.combine(c).linear[0]  # all 576 products g h
    dist = (prod.unsqueeze(1) - g.unsqueeze(0)).abs().amax((-1, -2))  # [576, 24]
    assert float(dist.min(1).values.max()) < 1e-12, "not closed under composition"
    assert torch.equal(torch.bincount(dist.argmin(1), minlength=24), torch.full((24,), 24))  # each element 24 times
    inv = (g.transpose(-1, -2).unsqueeze(1) - g.unsqueeze(0)).abs().amax((-1, -2))
    assert float(inv.min(1).values.max()) < 1e-12, "not closed under inverse"
    # the identity is added when absent
    no_id = FiniteGroup(-torch.eye(3).unsqueeze(0))
    assert no_id.elements.size(0) == 2 and torch.equal(no_id.elements[0], torch.eye(3, dtype=torch.float64))


def test_species_enumeration_is_the_whole_group(ragged_batch):
    ctx = make_ctx(ragged_batch, sigma=1.0)
    cands = SpeciesPermutation(max_candidates=50).candidates(ctx)
    mask = valid_mask(cands, ctx.num_graphs)
    for b in range(ctx.num_graphs):
        sl = graph_slice(ragged_batch, b)
        group = species_group(ragged_batch.z[sl].tolist())
        ks = torch.nonzero(mask[b]).flatten().tolist()
        local = [tuple((cands.perm[k, sl] - sl.start).tolist()) for k in ks]
        assert len(local) == len(group) == len(set(local)), f"graph {b}: duplicates or wrong order"
        assert set(local) == set(group)
        assert local[0] == tuple(range(sl.stop - sl.start))
    assert cands.perm.size(0) == 12  # padded to the largest order (2! 3! = 12)


def test_species_sampling_when_group_too_large(gen):
    data = make_batch([[1] * 6, [6, 1, 1]])
    ctx = make_ctx(data, sigma=1.0)
    cands = SpeciesPermutation(max_candidates=40).candidates(ctx, gen)
    mask = valid_mask(cands, 2)
    assert mask[0].all() and int(mask[1].sum()) == 2  # 720 > 40 sampled; the second graph enumerated
    local = [tuple(cands.perm[k, :6].tolist()) for k in range(40)]
    assert local[0] == tuple(range(6)) and len(set(local)) > 30  # uniform draws, few repeats


# --- Haar sampling -----------------------------------------------------------------------------


def _ks(angles: np.ndarray, cdf) -> float:
    return stats.kstest(angles, cdf).pvalue


def test_haar_rotation_angle_distribution_and_moments():
    n = 20000
    g = torch.Generator().manual_seed(0)
    r = random_rotations((n,), g)
    theta = rotation_angle(r).numpy()
    assert _ks(theta, haar_angle_cdf) > 1e-3
    # E[R] = 0 and E[R_ij^2] = 1/3 (entries have variance 1/3, R_ij^2 variance 4/45)
    assert float(r.mean(0).abs().max()) < 5 * math.sqrt(1 / (3 * n))
    assert float(((r**2).mean(0) - 1 / 3).abs().max()) < 5 * math.sqrt(4 / 45 / n)
    # left invariance: Q^T R is Haar too
    q = random_rotations((1,), g)[0]
    assert _ks(rotation_angle(q.T @ r).numpy(), haar_angle_cdf) > 1e-3
    # power check: the same test rejects a non-uniform quaternion law
    bad = quaternion_to_matrix(torch.rand(n, 4, generator=g, dtype=torch.float64) * 2 - 1)
    assert _ks(rotation_angle(bad).numpy(), haar_angle_cdf) < 1e-6


def test_uniform_candidates_and_random_elements_are_haar(gen):
    data = make_batch([[1, 1, 1, 1], [6, 1, 1, 1, 1]])
    ctx = make_ctx(data, sigma=0.1)
    lin = SO3(4001).candidates(ctx, gen).linear[:, 1:]  # candidate 0 is the identity
    assert _ks(rotation_angle(lin).flatten().numpy(), haar_angle_cdf) > 1e-3
    assert float(lin.mean((0, 1)).abs().max()) < 5 * math.sqrt(1 / (3 * 8000))
    lin = O3(4001).candidates(ctx, gen).linear[:, 1:]
    det = torch.linalg.det(lin)
    proper = torch.where((det > 0).view(2, -1, 1, 1), lin, -lin)
    assert _ks(rotation_angle(proper).flatten().numpy(), haar_angle_cdf) > 1e-3
    many = make_ctx(make_batch([[1, 1]] * 3000), sigma=1.0)
    el = SO3().random_element(many, gen).linear[:, 0]
    assert _ks(rotation_angle(el).numpy(), haar_angle_cdf) > 1e-3


# --- guided rotation proposal ------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.03, 0.2, 0.5, 1.0, 2.0])
def test_tangent_gaussian_density_integrates_to_one(tau):
    theta = torch.linspace(0, math.pi, 400001, dtype=torch.float64)[1:]
    dens = torch.exp(log_tangent_gaussian_density(theta, torch.full_like(theta, tau)))
    haar = (1 - torch.cos(theta)) / math.pi
    integral = torch.trapezoid(dens * haar, theta)
    assert float(integral) == pytest.approx(1.0, abs=2e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_tangent_gaussian_density_haar_expectation_is_one(tau):
    n = 200000
    r = random_rotations((n,), torch.Generator().manual_seed(int(tau * 10)))
    theta = rotation_angle(r)
    vals = torch.exp(log_tangent_gaussian_density(theta, torch.full_like(theta, tau)))
    mean, se = float(vals.mean()), float(vals.std() / math.sqrt(n))
    assert abs(mean - 1) < 5 * se and se < 0.03


def _guided_setup(taus, width=1.5, tau_max=2.0, seed=0):
    """A batch with one graph per target tau; x_t = Q x0 (Q random), sigma chosen to give tau."""
    data = make_batch([[1] * 6] * len(taus), seed=seed)
    x0 = center(data.pos, data.batch, data.num_graphs)
    g = torch.Generator().manual_seed(seed + 100)
    qs = random_rotations((len(taus),), g)
    xt = torch.einsum("nij,nj->ni", qs[data.batch], x0)
    sig = []
    centers, tau_eff = [], []
    for b, tau in enumerate(taus):
        sl = graph_slice(data, b)
        m = xt[sl].numpy().T @ x0[sl].numpy()
        u, s, vt = proper_svd(m)
        centers.append(u @ vt)
        # tau = width / sqrt((alpha / sigma^2)(s2 + s3)) with alpha = 1
        sig.append(tau * math.sqrt(s[1] + s[2]) / width)
        tau_eff.append(min(tau, tau_max))
    sigma = torch.tensor(sig, dtype=torch.float64)
    ctx = OrbitContext(x0=x0, xt=xt, batch=data.batch, num_graphs=len(taus), alpha=torch.ones(len(taus), dtype=torch.float64),
                       sigma=sigma, kernel=None, data=data)
    return ctx, np.stack(centers), qs.numpy(), tau_eff


def _mixture_cdf(tau, lam):
    theta = torch.linspace(0, math.pi, 200001, dtype=torch.float64)
    haar = (1 - torch.cos(theta)) / math.pi
    dens = torch.exp(log_tangent_gaussian_density(theta.clamp(min=1e-9), torch.full_like(theta, tau)))
    pdf = (lam + (1 - lam) * dens) * haar
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(pdf, theta)])
    cdf = (cdf / cdf[-1]).numpy()
    grid = theta.numpy()
    return lambda x: np.interp(x, grid, cdf)


@pytest.mark.parametrize("lam", [0.01, 0.25])
def test_guided_so3_draws_follow_the_stated_density(lam, gen):
    taus = [0.15, 0.6, 1.2, 5.0]  # the last is clipped to tau_max = 2 (angles wrap past pi)
    ctx, centers, qs, tau_eff = _guided_setup(taus)
    assert np.allclose(centers, qs, atol=1e-8)  # noise-free: the Kabsch centre is the true rotation
    orbit = SO3(3001, proposal="guided", uniform_fraction=lam)
    cands = orbit.candidates(ctx, gen)
    rel = np.einsum("bji,bkjl->bkil", centers, cands.linear.numpy())  # center^T R
    angles = rotation_angle_np(rel)
    for b, tau in enumerate(tau_eff):
        p = _ks(angles[b, 1:], _mixture_cdf(tau, lam))
        assert p > 1e-3, f"graph {b} (tau={tau}): KS p = {p}"
        # the importance density returned is the mixture density at each candidate's angle
        th = torch.as_tensor(angles[b]).clamp(min=1e-9)
        expected = torch.log(lam + (1 - lam) * torch.exp(log_tangent_gaussian_density(th, torch.full_like(th, tau))))
        assert torch.allclose(cands.linear_log_nu[b], expected, rtol=1e-6, atol=1e-6)
    # power check: the wrong tau is rejected
    assert _ks(angles[1, 1:], _mixture_cdf(tau_eff[1] * 1.3, lam)) < 1e-3


def test_kabsch_is_equivariant_and_optimal():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(20, 3, 3, generator=g, dtype=torch.float64)
    h = random_rotations((20,), g)
    r, s = kabsch(m)
    rh, sh = kabsch(h @ m)
    assert torch.allclose(rh, h @ r, atol=1e-10) and torch.allclose(s, sh, atol=1e-10)
    assert torch.allclose(torch.linalg.det(r), torch.ones(20, dtype=torch.float64), atol=1e-12)
    # optimal: no random rotation does better than <R*, M>
    best = (r * m).sum((-1, -2))
    others = torch.einsum("kij,bij->bk", random_rotations((2000,), g), m)
    assert bool((others <= best.unsqueeze(1) + 1e-12).all())
    assert torch.allclose(best, s.sum(-1), atol=1e-10)  # <R*, M> = s1 + s2 + (+-)s3


# --- guided permutation proposal ----------------------------------------------------------------


def test_guided_species_proposal_density_is_normalized_and_followed():
    """Every permutation's stated density nu(pi) (relative to uniform) averages to 1 over the group,
    and draws occur with frequency nu(pi) / |G|."""
    data = make_batch([[1, 1, 1, 1, 6, 6, 6], [8, 1, 1]], seed=4)
    ctx = make_ctx(data, sigma=0.35, seed=5)
    orbit = SpeciesPermutation(max_candidates=100, proposal="guided", uniform_fraction=0.25)
    gen = torch.Generator().manual_seed(6)
    counts, nu = Counter(), {}
    for _ in range(60):
        c = orbit.candidates(ctx, gen)
        assert torch.equal(c.perm_log_nu[1], torch.zeros(100, dtype=torch.float64))  # enumerated graph
        for k in range(1, 100):
            p = tuple(c.perm[k, :7].tolist())
            ln = float(c.perm_log_nu[0, k])
            assert nu.setdefault(p, ln) == pytest.approx(ln, abs=1e-9)
            counts[p] += 1
    group = species_group([1, 1, 1, 1, 6, 6, 6])
    assert set(counts) <= set(group)
    assert len(counts) == len(group) == 144  # every element drawn (the uniform share guarantees it)
    probs = np.array([math.exp(nu[p]) for p in group]) / len(group)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    assert probs.max() > 5 * probs.min()  # the proposal is far from uniform here
    observed = np.array([counts[p] for p in group])
    expected = probs * observed.sum()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(group) - 1) > 1e-4


# --- uniform random elements (the augmentation baseline) ------------------------------------------


def _chi2_uniform(labels: list, num_cells: int) -> float:
    counts = np.array(list(Counter(labels).values()) + [0] * (num_cells - len(set(labels))))
    expected = len(labels) / num_cells
    return stats.chi2.sf(((counts - expected) ** 2 / expected).sum(), num_cells - 1)


def test_random_elements_are_uniform_on_finite_groups(gen):
    copies = 2400
    # species permutations of a 3-atom class: S_3, 6 elements, one draw per graph
    data = make_batch([[1, 1, 1]] * copies)
    ctx = make_ctx(data, sigma=1.0, centered=False)
    perm = SpeciesPermutation().random_element(ctx, gen).perm[0].view(copies, 3) - 3 * torch.arange(copies).view(-1, 1)
    labels = [tuple(p) for p in perm.tolist()]
    assert set(labels) == set(species_group([1, 1, 1]))
    assert _chi2_uniform(labels, 6) > 1e-4
    # the 24 cube rotations
    cube = torch.as_tensor(cube_rotations())
    el = FiniteGroup(cube).random_element(ctx, gen).linear[:, 0]  # [copies, 3, 3]
    idx = (el.unsqueeze(1) - FiniteGroup(cube).elements.unsqueeze(0)).abs().amax((-1, -2)).argmin(1)
    assert _chi2_uniform(idx.tolist(), 24) > 1e-4
    # listed automorphisms: the 8 symmetries of a square, in graphs padded to 8 columns
    sq = symmetric_batch().get_example(0)
    data = Batch.from_data_list([sq] * copies)
    ctx = OrbitContext(x0=data.pos, xt=None, batch=data.batch, num_graphs=copies, data=data)
    perm = ExplicitPermutations().random_element(ctx, gen).perm[0].view(copies, 4) - 4 * torch.arange(copies).view(-1, 1)
    labels = [tuple(p) for p in perm.tolist()]
    assert set(labels) == set(dihedral_square())
    assert _chi2_uniform(labels, 8) > 1e-4
    # a graph with only 2 listed elements never draws a padded column
    water = symmetric_batch().get_example(2)
    data = Batch.from_data_list([water] * 400)
    ctx = OrbitContext(x0=data.pos, xt=None, batch=data.batch, num_graphs=400, data=data)
    perm = ExplicitPermutations().random_element(ctx, gen).perm[0].view(400, 3) - 3 * torch.arange(400).view(-1, 1)
    labels = [tuple(p) for p in perm.tolist()]
    assert set(labels) == {(0, 1, 2), (0, 2, 1)} and _chi2_uniform(labels, 2) > 1e-4
