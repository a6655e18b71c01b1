"""Crystal orbits: torus translations and lattice permutations, checked against independent math.

Every reference quantity here (wrapped-normal densities and scores, posterior integrals, joint
softmaxes) is computed in numpy with explicit loops or dense quadrature, never with the code under
test.
"""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch

import functools

import _reference
from _reference import softmax, wrap

wn_log_pdf = functools.partial(_reference.wrapped_normal_logpdf, n_images=_reference.WN_IMAGES)
wn_score = functools.partial(_reference.wrapped_normal_score, n_images=_reference.WN_IMAGES)
from orbit_pyg.estimator import orbit_estimate
from orbit_pyg.kernels import WrappedNormalKernel
from orbit_pyg.orbits import OrbitContext, ProductOrbit
from orbit_pyg.integrations.crystal.orbits import (
    LatticePermutation,
    TorusTranslation,
    circular_mean_shift,
    lattice_permutations,
)

from _reference import PEROV_CSV  # noqa: E402
PROPOSALS = ("uniform", "wrapped_normal", "guided")


# ------------------------------------------------------------------------------------------------
# independent references (numpy, float64)






def torus_ctx(x0, xt, batch, sigma, data=None) -> OrbitContext:
    b = int(batch.max()) + 1
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(b).clone()
    return OrbitContext(x0=x0, xt=xt, batch=batch, num_graphs=b, alpha=torch.ones(b, dtype=torch.float64),
                        sigma=sigma, kernel=WrappedNormalKernel(), data=data)


def random_crystals(sizes, sigma, seed=0):
    """Random fractional coordinates ``x0`` and ``xt = (x0 + sigma eps) mod 1`` for a ragged batch."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x0 = torch.rand(int(sum(sizes)), 3, generator=g, dtype=torch.float64)
    sig = torch.as_tensor(sigma, dtype=torch.float64).expand(len(sizes))[batch].view(-1, 1)
    xt = torch.remainder(x0 + sig * torch.randn(x0.shape, generator=g, dtype=torch.float64), 1.0)
    return x0, xt, batch


@pytest.fixture(scope="module")
def perov_structures():
    pytest.importorskip("pymatgen")
    if not PEROV_CSV.is_file():
        pytest.skip(f"Perov-5 CSV not found at {PEROV_CSV}")
    from pymatgen.core import Structure

    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(4), csv.DictReader(f))]
    return [Structure.from_str(r["cif"], fmt="cif") for r in rows]


# ------------------------------------------------------------------------------------------------
# torus translations


def test_circular_mean_shift_recovers_a_known_shift():
    sizes = [1, 5, 3, 8]
    g = torch.Generator().manual_seed(3)
    x0, _, batch = random_crystals(sizes, 0.0, seed=1)
    m = torch.rand(len(sizes), 3, generator=g, dtype=torch.float64)
    exact = torch.remainder(x0 + m[batch], 1.0)
    got = circular_mean_shift(exact, x0, batch, len(sizes))
    assert got.shape == (len(sizes), 3) and bool(((got >= 0) & (got < 1)).all())
    assert np.abs(wrap((got - m).numpy())).max() < 1e-12
    # with small noise, the circular mean lands within a few noise widths / sqrt(n) of the shift
    noisy = torch.remainder(exact + 0.01 * torch.randn(x0.shape, generator=g, dtype=torch.float64), 1.0)
    got = circular_mean_shift(noisy, x0, batch, len(sizes))
    err = np.abs(wrap((got - m).numpy()))
    assert err.max() < 0.05
    # and it is exactly the per-axis circular mean computed by hand
    for b in range(len(sizes)):
        d = (noisy - x0)[batch == b].numpy()
        ang = np.arctan2(np.sin(2 * np.pi * d).sum(0), np.cos(2 * np.pi * d).sum(0)) / (2 * np.pi)
        assert np.abs(wrap(ang - got[b].numpy())).max() < 1e-12


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_torus_candidates_are_translations_mod_1(proposal):
    sizes = [1, 4, 6]
    x0, xt, batch = random_crystals(sizes, 0.08, seed=2)
    ctx = torus_ctx(x0, xt, batch, [0.02, 0.08, 0.3])
    k = 64
    cands = TorusTranslation(k, proposal=proposal).candidates(ctx, torch.Generator().manual_seed(0))
    assert cands.num_candidates == k and cands.shift.shape == (3, k, 3)
    assert cands.perm is None and cands.linear is None
    shift = cands.shift.numpy()
    assert ((shift >= 0) & (shift < 1)).all()
    assert np.all(shift[:, 0] == 0.0), "candidate 0 must be the identity"
    pos = cands.materialize(x0, batch, torch.arange(k))  # [K, N, 3]
    assert torch.equal(pos[0], x0), "candidate 0 must reproduce x0 exactly"
    diff = pos.numpy() - x0.numpy()[None]
    for b in range(len(sizes)):
        sel = (batch == b).numpy()
        per_atom = diff[:, sel]  # [K, n, 3]
        # the same shift for every atom of the crystal, equal to the stored shift, modulo 1
        assert np.abs(wrap(per_atom - shift[b][:, None, :])).max() < 1e-12
        # wrapped pairwise differences are preserved
        p = pos.numpy()[:, sel]
        pair = wrap(p[:, :, None, :] - p[:, None, :, :])
        pair0 = wrap(x0.numpy()[sel][:, None, :] - x0.numpy()[sel][None, :, :])
        assert np.abs(wrap(pair - pair0[None])).max() < 1e-12
    log_nu = cands.shift_log_nu
    if proposal == "uniform":
        assert log_nu is None  # density 1 w.r.t. Haar
    else:
        assert log_nu.shape == (3, k) and bool(torch.isfinite(log_nu).all())


@pytest.mark.parametrize("sigma", [0.004, 0.05, 0.5])
def test_proposal_log_nu_matches_an_independent_density(sigma):
    """Wrapped-normal and guided ``log nu`` equal the documented densities, evaluated in numpy."""
    sizes = [5, 2]
    x0, xt, batch = random_crystals(sizes, sigma, seed=4)
    ctx = torus_ctx(x0, xt, batch, sigma)
    k = 200
    wn = TorusTranslation(k, proposal="wrapped_normal", scale=2.0).candidates(ctx, torch.Generator().manual_seed(1))
    expected = wn_log_pdf(wn.shift.numpy(), 2.0 * sigma).sum(-1)
    np.testing.assert_allclose(wn.shift_log_nu.numpy(), expected, rtol=1e-9, atol=1e-9)

    lam, width = 0.25, 2.0
    gd = TorusTranslation(k, proposal="guided", width=width, uniform_fraction=lam).candidates(ctx, torch.Generator().manual_seed(1))
    center = circular_mean_shift(xt, x0, batch, 2).numpy()
    for b, n in enumerate(sizes):
        tau = min(width * sigma / math.sqrt(n), 1.0)
        dens = lam + (1 - lam) * np.exp(wn_log_pdf(gd.shift[b].numpy() - center[b], tau).sum(-1))
        np.testing.assert_allclose(gd.shift_log_nu[b].numpy(), np.log(dens), rtol=1e-9, atol=1e-9)
        if tau < 0.04:
            continue  # a spike too narrow for plain Monte Carlo over the torus (covered by the next test)
        # that density integrates to one over the torus: E_uniform[nu(u)] = 1
        u = np.random.default_rng(b).random((100_000, 3))
        val = lam + (1 - lam) * np.exp(wn_log_pdf(u - center[b], tau).sum(-1))
        se = val.std() / math.sqrt(len(val))
        assert abs(val.mean() - 1) < 5 * se + 1e-3, (val.mean(), se)


@pytest.mark.parametrize("proposal,sigma", [("wrapped_normal", 0.1), ("wrapped_normal", 0.3),
                                            ("guided", 0.01), ("guided", 0.1), ("guided", 0.5)])
def test_proposal_density_is_the_density_of_the_draws(proposal, sigma):
    """Importance identity ``E_nu[f / nu] = ∫ f du`` with the code's own draws and ``log nu``.

    (``1 / nu`` must have a finite variance for the check to be sharp: the guided mixture keeps
    ``nu >= lambda``; the wrapped-normal proposal is checked where its tails are not too thin.)

    ``f = 1`` checks normalization; ``f = cos 2pi(m_d - c_d)`` (integral 0) checks the shape.
    """
    sizes = [5, 1]
    x0, xt, batch = random_crystals(sizes, sigma, seed=5)
    ctx = torus_ctx(x0, xt, batch, sigma)
    k = 40_001
    cands = TorusTranslation(k, proposal=proposal).candidates(ctx, torch.Generator().manual_seed(2))
    inv = torch.exp(-cands.shift_log_nu[:, 1:]).numpy()  # drop the fixed identity candidate
    center = circular_mean_shift(xt, x0, batch, 2).numpy() if proposal == "guided" else np.zeros((2, 3))
    for b in range(2):
        for f in (np.ones(k - 1), *(np.cos(2 * np.pi * (cands.shift[b, 1:, d].numpy() - center[b, d])) for d in range(3))):
            vals = f * inv[b]
            se = vals.std() / math.sqrt(vals.size)
            target = 1.0 if np.all(f == 1) else 0.0
            assert abs(vals.mean() - target) < 5 * se + 2e-3, (b, vals.mean(), se)


def test_guided_draws_concentrate_on_the_circular_mean():
    sizes = [6]
    sigma = 0.02
    x0, xt, batch = random_crystals(sizes, sigma, seed=6)
    ctx = torus_ctx(x0, xt, batch, sigma)
    k = 8001
    lam, width = 0.25, 2.0
    cands = TorusTranslation(k, proposal="guided", width=width, uniform_fraction=lam).candidates(ctx, torch.Generator().manual_seed(3))
    center = circular_mean_shift(xt, x0, batch, 1)[0].numpy()
    tau = width * sigma / math.sqrt(sizes[0])
    d = wrap(cands.shift[0, 1:].numpy() - center)
    close = np.abs(d).max(-1) < 5 * tau
    # (1 - lambda) of the draws come from the guided component; the uniform ones almost never land there
    assert abs(close.mean() - (1 - lam)) < 0.03, close.mean()
    # the guided component is centred on m* with width tau per axis
    assert np.abs(d[close].mean(0)).max() < 0.1 * tau
    np.testing.assert_allclose(d[close].std(0), tau, rtol=0.06)
    # and m* is close to the true shift (the identity: x_t was made from x0)
    assert np.abs(wrap(center)).max() < 4 * sigma / math.sqrt(sizes[0])


@pytest.mark.parametrize("sigma", [0.005, 0.01])
def test_guided_keeps_ess_where_uniform_collapses(sigma):
    sizes = [5, 5, 3]
    x0, xt, batch = random_crystals(sizes, sigma, seed=7)
    ctx = torus_ctx(x0, xt, batch, sigma)
    gen = torch.Generator().manual_seed(0)
    uni = orbit_estimate(TorusTranslation(256, "uniform"), ctx, target="score", generator=gen)
    gui = orbit_estimate(TorusTranslation(256, "guided"), ctx, target="score", generator=gen)
    assert bool((uni.ess < 1.5).all()), uni.ess  # (almost) all weight on the identity
    assert bool((gui.ess > 30).all()), gui.ess
    assert bool(((gui.ess >= 1) & (gui.ess <= 256 + 1e-9)).all())


def _exact_torus_posterior(x0, xt, sigma, grid: int = 4096):
    """Per-axis exact shift posterior on a dense periodic grid: ``(m [G], p [3, G])``.

    The wrapped-normal likelihood of a shift factorizes over the 3 axes, so the posterior is a
    product of 1-D densities ``p_d(m) ∝ prod_i WN(xt_id - x0_id - m; sigma)``.
    """
    m = np.arange(grid) / grid
    d = (xt - x0).numpy()  # [n, 3]
    logp = wn_log_pdf(d.T[:, :, None] - m[None, None, :], sigma).sum(1)  # [3, G]
    p = np.exp(logp - logp.max(1, keepdims=True))
    return m, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("proposal,sigma,n", [("uniform", 0.3, 2), ("wrapped_normal", 0.3, 2),
                                              ("guided", 0.3, 2), ("guided", 0.1, 5), ("guided", 0.02, 5)])
def test_torus_estimate_converges_to_the_exact_posterior_mean(proposal, sigma, n):
    """Self-normalized importance sampling → the exact posterior integrals (dense quadrature).

    Checks both the score target ``E[score(x_t - x0 - m)]`` and the spread ``E[1 - cos 2pi(m - c)]``
    of the weighted shifts (which a wrong ``log nu`` would bias).
    """
    x0, xt, batch = random_crystals([n], sigma, seed=8)
    ctx = torus_ctx(x0, xt, batch, sigma)
    m, p = _exact_torus_posterior(x0, xt, sigma)
    d = (xt - x0).numpy()
    exact_score = np.stack([(p[k] * wn_score(d[:, k, None] - m[None], sigma)).sum(-1) for k in range(3)], -1)
    c = m[p.argmax(1)]  # per-axis mode
    exact_spread = (p * (1 - np.cos(2 * np.pi * (m[None] - c[:, None])))).sum(1)

    k = 6000
    if proposal == "uniform" or (proposal == "wrapped_normal" and sigma < 0.2):
        k = 20_000
    cands = TorusTranslation(k, proposal=proposal).candidates(ctx, torch.Generator().manual_seed(9))
    est = orbit_estimate(cands, ctx, target="score")
    w = est.weights[0].numpy()
    spread = (w[:, None] * (1 - np.cos(2 * np.pi * (cands.shift[0].numpy() - c)))).sum(0)
    scale = 1.0 / sigma  # typical score magnitude
    err = np.abs(est.target.numpy() - exact_score).max() / scale
    assert err < 0.05, (err, float(est.ess[0]))
    np.testing.assert_allclose(spread, exact_spread, rtol=0.08)


def test_materialized_torus_estimate_equals_brute_force():
    """``orbit_estimate`` == an explicit loop over graphs and candidates (guided ``log nu`` included)."""
    sizes = [3, 1, 5]
    sig = [0.03, 0.2, 0.45]
    x0, xt, batch = random_crystals(sizes, sig, seed=10)
    ctx = torus_ctx(x0, xt, batch, sig)
    k = 7
    cands = TorusTranslation(k, "guided").candidates(ctx, torch.Generator().manual_seed(11))
    est = orbit_estimate(cands, ctx, target="score")
    x0n, xtn, shift, log_nu = x0.numpy(), xt.numpy(), cands.shift.numpy(), cands.shift_log_nu.numpy()
    target = np.zeros_like(x0n)
    for b in range(len(sizes)):
        idx = np.flatnonzero(batch.numpy() == b)
        logits = []
        for j in range(k):
            lq = 0.0
            for i in idx:
                for dim in range(3):
                    lq += wn_log_pdf(xtn[i, dim] - (x0n[i, dim] + shift[b, j, dim]), sig[b])
            logits.append(lq - log_nu[b, j])
        w = softmax(logits)
        np.testing.assert_allclose(est.weights[b].numpy(), w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(float(est.ess[b]), 1 / np.sum(w**2), rtol=1e-9)
        for i in idx:
            for dim in range(3):
                target[i, dim] = sum(w[j] * wn_score(xtn[i, dim] - x0n[i, dim] - shift[b, j, dim], sig[b]) for j in range(k))
    np.testing.assert_allclose(est.target.numpy(), target, rtol=1e-8, atol=1e-8)
    # chunking does not change anything
    for chunk in (1, 3):
        again = orbit_estimate(cands, ctx, target="score", chunk_size=chunk)
        np.testing.assert_allclose(again.target.numpy(), est.target.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(again.weights.numpy(), est.weights.numpy(), rtol=1e-12, atol=1e-15)


def test_torus_translation_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_candidates"):
        TorusTranslation(0)
    with pytest.raises(ValueError, match="proposal"):
        TorusTranslation(10, proposal="gaussian")
    with pytest.raises(ValueError, match="uniform_fraction"):
        TorusTranslation(10, proposal="guided", uniform_fraction=0.0)
    x0, xt, batch = random_crystals([3], 0.1)
    ctx = torus_ctx(x0, None, batch, 0.1)
    with pytest.raises(ValueError, match="xt"):
        TorusTranslation(10, proposal="guided").candidates(ctx)


# ------------------------------------------------------------------------------------------------
# lattice permutations


def test_lattice_permutation_group_elements():
    for signed, size in ((False, 6), (True, 48)):
        g = lattice_permutations(signed).numpy()
        assert g.shape == (size, 3, 3)
        np.testing.assert_array_equal(g[0], np.eye(3))
        for p in g:  # signed permutation matrices: orthogonal, entries in {0, ±1}, one per row
            np.testing.assert_allclose(p @ p.T, np.eye(3), atol=0)
            assert set(np.unique(np.abs(p))) <= {0.0, 1.0} and (np.abs(p).sum(1) == 1).all()
        assert len({p.tobytes() for p in g}) == size  # distinct
        # closed under composition: a group
        keys = {(p + 0.0).tobytes() for p in g}  # + 0.0 folds -0.0 into 0.0
        assert all((a @ b + 0.0).tobytes() in keys for a, b in itertools.product(g, g))


def _distorted(structure, seed=0):
    """A low-symmetry version of a Perov-5 structure: triclinic strain and displaced atoms."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    lat = structure.lattice.matrix @ (np.eye(3) + 0.15 * rng.standard_normal((3, 3)))
    frac = structure.frac_coords + 0.05 * rng.standard_normal(structure.frac_coords.shape)
    return Structure(Lattice(lat), structure.species, frac)


@pytest.mark.parametrize("signed", [False, True])
def test_lattice_permutations_leave_the_crystal_unchanged(perov_structures, signed):
    from orbit_pyg.integrations.crystal import as_structure, crystal_to_data, make_matcher, rms_dist, structure_to_data

    strict = make_matcher(stol=0.01, ltol=0.01, angle_tol=0.5)
    orbit = LatticePermutation(signed=signed)
    n_elem = 48 if signed else 6
    for s in (perov_structures[0], _distorted(perov_structures[1], seed=1)):
        d = structure_to_data(s, dtype=torch.float64, niggli=False)
        batch = torch.zeros(d.num_nodes, dtype=torch.long)
        ctx = OrbitContext(x0=d.frac_coords, xt=None, batch=batch, num_graphs=1)
        cands = orbit.candidates(ctx)
        assert cands.linear.shape == (1, n_elem, 3, 3) and cands.linear_log_lik is None
        frac = cands.materialize(d.frac_coords, batch, torch.arange(n_elem))  # f -> P f
        cells = cands.linear[0] @ d.cell[0]  # L -> P L
        cart = d.frac_coords @ d.cell[0]
        ref = as_structure(d)
        for j in range(n_elem):
            np.testing.assert_allclose((frac[j] @ cells[j]).numpy(), cart.numpy(), atol=1e-10)
            moved = as_structure(crystal_to_data(d.z, frac[j], cells[j], dtype=torch.float64))
            assert strict.fit(moved, ref), j
            assert rms_dist(moved, ref, strict) < 1e-6
    # negative control: relabelling the lattice rows alone changes a low-symmetry crystal
    s = _distorted(perov_structures[1], seed=1)
    d = structure_to_data(s, dtype=torch.float64, niggli=False)
    p = lattice_permutations()[3]
    wrong = as_structure(crystal_to_data(d.z, d.frac_coords, p @ d.cell[0], dtype=torch.float64))
    assert not strict.fit(wrong, as_structure(d))


def _lattice_data(cell, cell_t, alpha, sigma):
    from torch_geometric.data import Data

    return Data(cell=cell, cell_t=cell_t, lattice_alpha=torch.as_tensor(alpha, dtype=torch.float64),
                lattice_sigma=torch.as_tensor(sigma, dtype=torch.float64))


def _lattice_log_lik(cell_t, cell, p, alpha, sigma):
    return -np.sum((cell_t - alpha * (p @ cell)) ** 2) / (2 * sigma**2)


def test_product_reduces_to_torus_when_the_lattice_factor_is_flat():
    """Atoms on the body diagonal are fixed by every basis permutation, so with no lattice kernel the
    6 lattice candidates tie and the shift marginal of the joint softmax equals the torus-only one."""
    g = torch.Generator().manual_seed(12)
    a = torch.rand(4, 1, generator=g, dtype=torch.float64)
    x0 = a.expand(4, 3).clone()  # f_i = (a_i, a_i, a_i): P f_i = f_i
    batch = torch.zeros(4, dtype=torch.long)
    sigma = 0.15
    xt = torch.remainder(x0 + sigma * torch.randn(4, 3, generator=g, dtype=torch.float64), 1.0)
    cell = (torch.eye(3, dtype=torch.float64) * 4 + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)).unsqueeze(0)
    ctx = torus_ctx(x0, xt, batch, sigma, data=_lattice_data(cell, None, 0.9, 0.3))  # no cell_t: flat
    for proposal in PROPOSALS:
        torus = TorusTranslation(33, proposal)
        alone = torus.candidates(ctx, torch.Generator().manual_seed(5))
        joint = (torus * LatticePermutation()).candidates(ctx, torch.Generator().manual_seed(5))
        assert isinstance(torus * LatticePermutation(), ProductOrbit)
        assert torch.equal(joint.shift, alone.shift) and joint.sizes == (1, 6, 33)
        w_alone = orbit_estimate(alone, ctx, target="score")
        w_joint = orbit_estimate(joint, ctx, target="score")
        np.testing.assert_allclose(joint.marginal_weights(w_joint.weights, "shift").numpy(), w_alone.weights.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(joint.marginal_weights(w_joint.weights, "linear").numpy(), np.full((1, 6), 1 / 6), rtol=1e-10)
        np.testing.assert_allclose(w_joint.target.numpy(), w_alone.target.numpy(), rtol=1e-10, atol=1e-10)

        # with the lattice kernel on, the joint factorizes: lattice marginal = softmax of the lattice
        # kernel alone, shift marginal unchanged
        cell_t = 0.9 * cell[:, [1, 0, 2]] + 0.3 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
        ctx_l = torus_ctx(x0, xt, batch, sigma, data=_lattice_data(cell, cell_t, 0.9, 0.3))
        joint = (torus * LatticePermutation()).candidates(ctx_l, torch.Generator().manual_seed(5))
        est = orbit_estimate(joint, ctx_l, target="score")
        lat = softmax([_lattice_log_lik(cell_t[0].numpy(), cell[0].numpy(), p, 0.9, 0.3) for p in lattice_permutations().numpy()])
        np.testing.assert_allclose(joint.marginal_weights(est.weights, "linear")[0].numpy(), lat, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(joint.marginal_weights(est.weights, "shift").numpy(), w_alone.weights.numpy(), rtol=1e-9, atol=1e-14)
        assert lat.argmax() == 2  # the permutation that swaps a and b generated cell_t


@pytest.mark.parametrize("signed", [False, True])
def test_joint_torus_lattice_weights_equal_brute_force(perov_structures, signed):
    """Joint softmax over (basis permutation, shift) == explicit loops combining both kernels."""
    from orbit_pyg.integrations.crystal import structure_to_data

    datas = [structure_to_data(_distorted(s, seed=i), dtype=torch.float64, niggli=False) for i, s in enumerate(perov_structures[:2])]
    sizes = [d.num_nodes for d in datas]
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    x0 = torch.cat([d.frac_coords for d in datas])
    cell = torch.cat([d.cell for d in datas])
    g = torch.Generator().manual_seed(13)
    sig, alpha, lsig = [0.08, 0.25], [0.95, 0.7], [0.3, 0.7]
    # x_t from a non-identity basis relabelling of crystal 0, so that the lattice kernel matters
    p_true = lattice_permutations(signed)[4]
    src = x0.clone()
    src[batch == 0] = src[batch == 0] @ p_true.T
    sn = torch.tensor(sig, dtype=torch.float64)[batch].view(-1, 1)
    xt = torch.remainder(src + sn * torch.randn(x0.shape, generator=g, dtype=torch.float64), 1.0)
    cell_src = cell.clone()
    cell_src[0] = p_true @ cell[0]
    cell_t = torch.tensor(alpha, dtype=torch.float64).view(2, 1, 1) * cell_src + torch.tensor(lsig, dtype=torch.float64).view(2, 1, 1) * torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    ctx = torus_ctx(x0, xt, batch, sig, data=_lattice_data(cell, cell_t, alpha, lsig))
    ks = 5
    orbit = TorusTranslation(ks, "guided") * LatticePermutation(signed=signed)
    cands = orbit.candidates(ctx, torch.Generator().manual_seed(14))
    est = orbit_estimate(cands, ctx, target="score", chunk_size=7)
    mats = lattice_permutations(signed).numpy()
    x0n, xtn = x0.numpy(), xt.numpy()
    shift, log_nu = cands.shift.numpy(), cands.shift_log_nu.numpy()
    target = np.zeros_like(x0n)
    for b in range(2):
        idx = np.flatnonzero(batch.numpy() == b)
        logits = np.zeros((len(mats), ks))
        for l, p in enumerate(mats):
            lat = _lattice_log_lik(cell_t[b].numpy(), cell[b].numpy(), p, alpha[b], lsig[b])
            for j in range(ks):
                pos = x0n[idx] @ p.T + shift[b, j]
                logits[l, j] = wn_log_pdf(xtn[idx] - pos, sig[b]).sum() + lat - log_nu[b, j]
        w = softmax(logits.ravel()).reshape(logits.shape)
        # the estimator's flat order is (linear, shift) with the shift fastest
        np.testing.assert_allclose(est.weights[b].numpy(), w.ravel(), rtol=1e-8, atol=1e-13)
        np.testing.assert_allclose(cands.marginal_weights(est.weights, "linear")[b].numpy(), w.sum(1), rtol=1e-8, atol=1e-13)
        np.testing.assert_allclose(cands.marginal_weights(est.weights, "shift")[b].numpy(), w.sum(0), rtol=1e-8, atol=1e-13)
        for l, p in enumerate(mats):
            for j in range(ks):
                pos = x0n[idx] @ p.T + shift[b, j]
                target[idx] += w[l, j] * wn_score(xtn[idx] - pos, sig[b])
    np.testing.assert_allclose(est.target.numpy(), target, rtol=1e-7, atol=1e-7)
    lat_marg = cands.marginal_weights(est.weights, "linear")
    assert int(lat_marg[0].argmax()) == 4  # the generating relabelling is recognised


def test_lattice_orbit_target_is_invariant_to_relabelling_x0():
    """Enumerating a finite group: the Rao-Blackwell target of (P f0, P L0) equals that of (f0, L0)."""
    g = torch.Generator().manual_seed(15)
    n, sigma = 4, 0.12
    x0 = torch.rand(n, 3, generator=g, dtype=torch.float64)
    batch = torch.zeros(n, dtype=torch.long)
    cell = (3.5 * torch.eye(3, dtype=torch.float64) + 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)).unsqueeze(0)
    xt = torch.remainder(x0 + sigma * torch.randn(n, 3, generator=g, dtype=torch.float64), 1.0)
    cell_t = 0.8 * cell + 0.5 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    orbit = LatticePermutation(signed=True)

    def estimate(f0, l0):
        ctx = torus_ctx(f0, xt, batch, sigma, data=_lattice_data(l0, cell_t, 0.8, 0.5))
        cands = orbit.candidates(ctx)
        est = orbit_estimate(cands, ctx, target="score")
        mix = torch.einsum("bl,blij->bij", cands.marginal_weights(est.weights, "linear"), cands.linear) @ l0
        return est.target, mix, est.ess

    base = estimate(x0, cell)
    for p in lattice_permutations(True)[[1, 7, 30, 47]]:
        moved = estimate(x0 @ p.T, p @ cell)
        np.testing.assert_allclose(moved[0].numpy(), base[0].numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(moved[1].numpy(), base[1].numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(moved[2].numpy(), base[2].numpy(), rtol=1e-9)


def test_lattice_permutation_rejects_a_wrong_number_of_cells():
    x0, xt, batch = random_crystals([2, 3], 0.1)
    cell = torch.eye(3, dtype=torch.float64).expand(3, 3, 3).clone()  # 3 lattices for 2 crystals
    ctx = torus_ctx(x0, xt, batch, 0.1, data=_lattice_data(cell, cell, 1.0, 0.1))
    with pytest.raises(ValueError, match="one 3x3 lattice per graph"):
        LatticePermutation().candidates(ctx)


@pytest.mark.parametrize("proposal,k", [("uniform", 3000), ("guided", 3000)])
def test_joint_lattice_marginal_converges_to_the_exact_posterior(proposal, k):
    """``p(P | F_t, L_t) ∝ q(L_t | P L0) ∫ prod_i WN(F_t,i - P f_i - m) dm`` (the shift integral per axis
    by dense quadrature) is what the joint softmax's lattice marginal estimates."""
    g = torch.Generator().manual_seed(16)
    n, sigma, alpha, lsig = 3, 0.25, 0.3, 0.95
    x0 = torch.rand(n, 3, generator=g, dtype=torch.float64)
    batch = torch.zeros(n, dtype=torch.long)
    cell = (4 * torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, generator=g, dtype=torch.float64)).unsqueeze(0)
    p_true = lattice_permutations()[1]
    xt = torch.remainder(x0 @ p_true.T + sigma * torch.randn(n, 3, generator=g, dtype=torch.float64), 1.0)
    cell_t = alpha * p_true @ cell + lsig * torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    ctx = torus_ctx(x0, xt, batch, sigma, data=_lattice_data(cell, cell_t, alpha, lsig))
    grid = np.arange(4096) / 4096
    log_post = []
    for p in lattice_permutations().numpy():
        d = xt.numpy() - x0.numpy() @ p.T  # [n, 3]
        per_axis = wn_log_pdf(d.T[:, :, None] - grid, sigma).sum(1)  # [3, G]
        top = per_axis.max(1, keepdims=True)
        log_int = (top[:, 0] + np.log(np.exp(per_axis - top).mean(1))).sum()
        log_post.append(log_int + _lattice_log_lik(cell_t[0].numpy(), cell[0].numpy(), p, alpha, lsig))
    exact = softmax(log_post)
    assert exact.max() < 0.9 and np.sort(exact)[-2] > 0.05  # a spread posterior: a sharp check
    orbit = TorusTranslation(k, proposal) * LatticePermutation()
    est = [orbit_estimate(orbit, ctx, target="score", generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cands = orbit.candidates(ctx, torch.Generator().manual_seed(0))
    marg = np.mean([cands.marginal_weights(e.weights, "linear")[0].numpy() for e in est], 0)
    np.testing.assert_allclose(marg, exact, atol=0.02)
