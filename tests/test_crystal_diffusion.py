"""DiffCSP-style crystal diffusion: schedules, score normalization, plain / augment / orbit targets,
and the predictor-corrector sampler, checked against independent numpy / scipy references."""
from __future__ import annotations

import csv
import functools
import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data


import _reference
from _reference import softmax, wrap

wn_log_pdf = functools.partial(_reference.wrapped_normal_logpdf, n_images=_reference.WN_IMAGES)
wn_score = functools.partial(_reference.wrapped_normal_score, n_images=_reference.WN_IMAGES)
from orbit_pyg.integrations.crystal.diffusion import (
    CrystalDiffusion,
    CrystalDiffusionLoss,
    crystal_orbit,
    score_norm,
)
from orbit_pyg.integrations.crystal.orbits import lattice_permutations
from orbit_pyg.integrations.crystal.sampling import PredictorCorrector, step_grid

from _reference import PEROV_CSV  # noqa: E402


# ------------------------------------------------------------------------------------------------
# independent references






@functools.lru_cache(maxsize=None)
def reference_lambda(sigma: float) -> float:
    """``∫ WN(d; sigma) score(d)^2 dd`` over one period by adaptive quadrature (scipy)."""
    from scipy.integrate import quad

    half = min(0.5, 14 * sigma)  # outside, the integrand is below exp(-98)

    def f(d):
        return math.exp(float(wn_log_pdf(d, sigma))) * float(wn_score(d, sigma)) ** 2

    return quad(f, -half, half, points=[0.0], limit=500, epsabs=0.0, epsrel=1e-11)[0]


def reference_sigmas(num_steps, lo=0.005, hi=0.5):
    return np.exp(np.linspace(math.log(lo), math.log(hi), num_steps))


def reference_alpha_bars(num_steps, s=0.008):
    """DiffCSP / Nichol-Dhariwal cosine schedule, betas clipped to [1e-4, 0.9999]; abar_0 = 1."""
    u = np.arange(num_steps + 1) / num_steps
    f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 1e-4, 0.9999)
    return np.concatenate([[1.0], np.cumprod(1 - betas)])


@functools.lru_cache(maxsize=None)
def diffusion(num_steps: int) -> CrystalDiffusion:
    """One shared (stateless) diffusion per ``T`` (building T = 1000 costs a few tenths of a second)."""
    return CrystalDiffusion(num_steps)


@pytest.fixture(scope="module")
def perov_data():
    """The first Perov-5 crystals as float64 Data (skipped without pymatgen or the CSV)."""
    pytest.importorskip("pymatgen")
    if not PEROV_CSV.is_file():
        pytest.skip(f"Perov-5 CSV not found at {PEROV_CSV}")
    from pymatgen.core import Structure

    from orbit_pyg.integrations.crystal import structure_to_data

    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(6), csv.DictReader(f))]
    return [structure_to_data(Structure.from_str(r["cif"], fmt="cif"), dtype=torch.float64, niggli=True, canonical=True)
            for r in rows]


def random_crystal(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cell = 4 * torch.eye(3, dtype=dtype) + 0.6 * torch.randn(3, 3, generator=g, dtype=dtype)
    return Data(z=torch.randint(1, 90, (n,), generator=g), frac_coords=torch.rand(n, 3, generator=g, dtype=dtype),
                cell=cell.unsqueeze(0), num_nodes=n)


def low_symmetry_batch(seed=0, sizes=(5, 1, 3, 7)):
    return Batch.from_data_list([random_crystal(n, seed + i) for i, n in enumerate(sizes)])


# ------------------------------------------------------------------------------------------------
# schedules and the score normalization


def test_schedules_match_diffcsp():
    for t in (1000, 37):
        d = diffusion(t)
        np.testing.assert_allclose(d.sigmas.numpy(), reference_sigmas(t), rtol=1e-12)
        np.testing.assert_allclose(d.alpha_bars.numpy(), reference_alpha_bars(t), rtol=1e-10, atol=1e-14)
        k = torch.tensor([1, t // 2, t])
        co = d.coefficients(k)
        abar = reference_alpha_bars(t)[k.numpy()]
        np.testing.assert_allclose(co["lattice_alpha"].numpy(), np.sqrt(abar), rtol=1e-10)
        np.testing.assert_allclose(co["lattice_sigma"].numpy(), np.sqrt(1 - abar), rtol=1e-10)
        np.testing.assert_allclose(co["sigma"].numpy(), reference_sigmas(t)[k.numpy() - 1], rtol=1e-12)
        np.testing.assert_allclose(co["t"].numpy(), k.numpy() / t, rtol=1e-15)
    assert float(diffusion(1000).alpha_bars[-1]) < 1e-4  # the lattice is pure noise at k = T


def test_score_norm_small_sigma_is_gaussian():
    sig = torch.tensor([1e-3, 0.005, 0.02, 0.049], dtype=torch.float64)
    np.testing.assert_allclose(score_norm(sig).numpy(), 1 / sig.numpy() ** 2, rtol=1e-12)
    # just above the threshold the quadrature still agrees with the Gaussian value (wrapping is tiny)
    np.testing.assert_allclose(score_norm(torch.tensor([0.05, 0.07], dtype=torch.float64)).numpy(),
                               [1 / 0.05**2, 1 / 0.07**2], rtol=1e-9)
    # the quadrature, forced below its threshold, agrees with 1 / sigma^2 there
    np.testing.assert_allclose(score_norm(torch.tensor([0.03, 0.06], dtype=torch.float64), gaussian_below=1e-3).numpy(),
                               [1 / 0.03**2, 1 / 0.06**2], rtol=1e-8)


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.15, 0.3, 0.5, 0.8])
def test_score_norm_matches_adaptive_quadrature(sigma):
    got = float(score_norm(torch.tensor(sigma, dtype=torch.float64)))
    np.testing.assert_allclose(got, reference_lambda(sigma), rtol=1e-4 if sigma < 0.1 else 1e-9)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
def test_score_norm_matches_monte_carlo(sigma):
    """``lambda = E[score(d)^2]``, ``d = sigma eps mod 1`` (the DiffCSP estimate), within MC error."""
    rng = np.random.default_rng(int(sigma * 100))
    d = wrap(sigma * rng.standard_normal(400_000))
    sq = wn_score(d, sigma, n_images=6) ** 2
    se = sq.std() / math.sqrt(sq.size)
    got = float(score_norm(torch.tensor(sigma, dtype=torch.float64)))
    assert abs(sq.mean() - got) < 4 * se, (sq.mean(), got, se)
    assert se < 0.01 * got  # the check is sharp


def test_score_norm_over_the_diffcsp_range():
    d = diffusion(1000)
    lam = d.score_norms.numpy()
    assert np.isfinite(lam).all() and (lam > 0).all()
    assert (np.diff(lam) < 0).all()  # sigma_k increases with k, lambda decreases
    np.testing.assert_allclose(lam[0], 1 / 0.005**2, rtol=1e-12)
    # wrapping matters at the top of the range: lambda(0.5) is far below the Gaussian 1/sigma^2
    assert lam[-1] < 0.01 * 4.0
    # no jump where the Gaussian value hands over to the quadrature
    lo, hi = score_norm(torch.tensor([0.1 - 1e-9, 0.1], dtype=torch.float64)).numpy()
    assert abs(lo - hi) / hi < 1e-4


# ------------------------------------------------------------------------------------------------
# the loss: plain / augment / orbit targets


def test_plain_targets_are_the_true_scaled_score_and_lattice_eps(perov_data):
    t = 1000
    loss = CrystalDiffusionLoss("plain", diffusion=diffusion(t))
    data = Batch.from_data_list(perov_data[:3])
    step = torch.tensor([1, 500, 1000])
    noisy = loss.corrupt(data, torch.Generator().manual_seed(0), step=step)
    assert torch.equal(noisy.frac0, data.frac_coords) and torch.equal(noisy.cell0, data.cell)
    assert torch.equal(noisy.step, step) and noisy.num_graphs == 3
    np.testing.assert_allclose(noisy.t.numpy(), step.numpy() / t)
    assert bool(((noisy.frac_t >= 0) & (noisy.frac_t < 1)).all())
    sig = reference_sigmas(t)[step.numpy() - 1]
    lam = np.array([reference_lambda(s) for s in sig])
    b = data.batch.numpy()
    d = noisy.frac_t.numpy() - data.frac_coords.numpy()
    expected = wn_score(d, sig[b][:, None]) / np.sqrt(lam[b])[:, None]
    np.testing.assert_allclose(noisy.coord_target.numpy(), expected, rtol=1e-6, atol=1e-9)
    abar = reference_alpha_bars(t)[step.numpy()][:, None, None]
    eps = (noisy.cell_t.numpy() - np.sqrt(abar) * data.cell.numpy()) / np.sqrt(1 - abar)
    np.testing.assert_allclose(noisy.lattice_target.numpy(), eps, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(noisy.ess.numpy(), 1.0)


def test_plain_noise_has_the_right_law():
    """Wrapped displacement / sigma_k and the lattice eps are standard normal (moments over a big batch)."""
    data = Batch.from_data_list([random_crystal(4, 0)] * 400)
    loss = CrystalDiffusionLoss("plain", diffusion=CrystalDiffusion(100))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(1), step=torch.tensor(20))
    sigma = reference_sigmas(100)[19]
    z = wrap((noisy.frac_t - data.frac_coords).numpy()) / sigma
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.03
    e = noisy.lattice_target.numpy()
    assert abs(e.mean()) < 0.07 and abs(e.std() - 1) < 0.05


def _find_permutation(cell0, cell):
    p = cell0 @ np.linalg.inv(cell)
    r = np.round(p)
    np.testing.assert_allclose(p, r, atol=1e-8)
    return r


@pytest.mark.parametrize("lattice", [True, "signed"])
def test_augment_moves_by_a_consistent_symmetry(lattice):
    data = low_symmetry_batch(seed=3, sizes=(5, 2, 4, 6, 3, 5))
    loss = CrystalDiffusionLoss("augment", crystal_orbit(16, lattice=lattice), CrystalDiffusion(100))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(2))
    group = {(m + 0.0).tobytes() for m in lattice_permutations(lattice == "signed").numpy()}
    b = data.batch.numpy()
    f, f0 = data.frac_coords.numpy(), noisy.frac0.numpy()
    moved_lattice = 0
    for g in range(data.num_graphs):
        cell, cell0 = data.cell[g].numpy(), noisy.cell0[g].numpy()
        p = _find_permutation(cell0, cell)
        assert (p + 0.0).tobytes() in group
        moved_lattice += int(not np.allclose(p, np.eye(3)))
        np.testing.assert_allclose(cell0, p @ cell, atol=1e-12)
        sel = b == g
        shift = wrap(f0[sel] - f[sel] @ p.T)  # one torus shift for the whole crystal
        assert np.abs(wrap(shift - shift[0])).max() < 1e-10
        # Cartesian positions: the original ones translated rigidly, up to lattice vectors per atom
        cart, cart0 = f[sel] @ cell, f0[sel] @ cell0
        rel = (cart0 - cart) - (cart0[0] - cart[0])
        lattice_coords = rel @ np.linalg.inv(cell)
        np.testing.assert_allclose(lattice_coords, np.round(lattice_coords), atol=1e-9)
    assert moved_lattice >= 2  # the augmentation is not the identity
    assert bool(((noisy.frac0 >= 0) & (noisy.frac0 < 1)).all())
    # targets are the plain ones of the augmented crystal
    sig = reference_sigmas(100)[noisy.step.numpy() - 1]
    lam = np.array([reference_lambda(x) for x in sig])
    expected = wn_score(noisy.frac_t.numpy() - f0, sig[b][:, None]) / np.sqrt(lam[b])[:, None]
    np.testing.assert_allclose(noisy.coord_target.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_augmented_crystal_is_the_same_structure(perov_data):
    """pymatgen agrees: the augmented (frac0, cell0) is the reference crystal (torus shift, signed
    basis relabelling and a permutation of equal-species atoms together)."""
    from orbit_pyg.integrations.crystal import as_structure, crystal_to_data, make_matcher, rms_dist

    data = Batch.from_data_list(perov_data[:4])
    loss = CrystalDiffusionLoss("augment", crystal_orbit(4, lattice="signed", species=10), CrystalDiffusion(50))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(5))
    strict = make_matcher(stol=0.01, ltol=0.01, angle_tol=0.5)
    assert not torch.allclose(noisy.frac0, data.frac_coords)
    for g in range(4):
        sel = data.batch == g
        assert torch.equal(data.z[sel], perov_data[g].z)
        ref = as_structure(perov_data[g])
        aug = as_structure(crystal_to_data(perov_data[g].z, noisy.frac0[sel], noisy.cell0[g], dtype=torch.float64))
        assert strict.fit(aug, ref) and rms_dist(aug, ref, strict) < 1e-6


@pytest.mark.parametrize("proposal", ["uniform", "wrapped_normal", "guided"])
@pytest.mark.parametrize("step", [1, 500, 1000])
def test_orbit_targets_finite_with_valid_ess(proposal, step):
    data = low_symmetry_batch(seed=7)
    k = 24
    loss = CrystalDiffusionLoss("orbit", crystal_orbit(k, proposal, lattice=True), diffusion(1000))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(3), step=torch.tensor(step))
    for v in (noisy.coord_target, noisy.lattice_target, noisy.frac_t, noisy.cell_t, noisy.ess):
        assert bool(torch.isfinite(v).all())
    assert bool(((noisy.ess >= 1 - 1e-9) & (noisy.ess <= 6 * k + 1e-9)).all()), noisy.ess
    again = loss.corrupt(data, torch.Generator().manual_seed(3), step=torch.tensor(step))
    for a, b in ((noisy.coord_target, again.coord_target), (noisy.lattice_target, again.lattice_target),
                 (noisy.frac_t, again.frac_t), (noisy.cell_t, again.cell_t), (noisy.ess, again.ess)):
        assert torch.equal(a, b)
    other = loss.corrupt(data, torch.Generator().manual_seed(4), step=torch.tensor(step))
    assert not torch.equal(noisy.coord_target, other.coord_target)


def test_orbit_targets_equal_brute_force_over_lattice_permutations():
    """Identity-only torus × the 6 basis permutations: every target by an explicit joint softmax."""
    data = low_symmetry_batch(seed=11, sizes=(4, 2, 6))
    t = 200
    loss = CrystalDiffusionLoss("orbit", crystal_orbit(1, lattice=True), CrystalDiffusion(t))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(6), step=torch.tensor([150, 60, 200]))
    mats = lattice_permutations().numpy()
    abar = reference_alpha_bars(t)
    sig = reference_sigmas(t)
    b = data.batch.numpy()
    f0, ft = noisy.frac0.numpy(), noisy.frac_t.numpy()
    for g in range(3):
        k = int(noisy.step[g])
        a, s, sg = math.sqrt(abar[k]), math.sqrt(1 - abar[k]), sig[k - 1]
        cell0, cell_t = noisy.cell0[g].numpy(), noisy.cell_t[g].numpy()
        sel = b == g
        logits = [wn_log_pdf(ft[sel] - f0[sel] @ p.T, sg).sum() - np.sum((cell_t - a * p @ cell0) ** 2) / (2 * s**2) for p in mats]
        w = softmax(logits)
        score = sum(wl * wn_score(ft[sel] - f0[sel] @ p.T, sg) for wl, p in zip(w, mats))
        np.testing.assert_allclose(noisy.coord_target[sel].numpy(), score / math.sqrt(reference_lambda(sg)), rtol=1e-6, atol=1e-8)
        cell_hat = sum(wl * p @ cell0 for wl, p in zip(w, mats))
        np.testing.assert_allclose(noisy.lattice_target[g].numpy(), (cell_t - a * cell_hat) / s, rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(float(noisy.ess[g]), 1 / np.sum(w**2), rtol=1e-7)
    assert float(noisy.ess.max()) > 1.5  # at least one crystal's lattice posterior is spread


def test_orbit_with_species_permutations_is_finite(perov_data):
    """Torus × lattice × equal-species permutations (3! for the three anions of ABX3)."""
    data = Batch.from_data_list(perov_data[:3])
    loss = CrystalDiffusionLoss("orbit", crystal_orbit(8, "guided", lattice=True, species=10), diffusion(1000))
    for step in (1, 500, 1000):
        noisy = loss.corrupt(data, torch.Generator().manual_seed(step), step=torch.tensor(step))
        assert bool(torch.isfinite(noisy.coord_target).all() and torch.isfinite(noisy.lattice_target).all())
        assert bool(((noisy.ess >= 1 - 1e-9) & (noisy.ess <= 8 * 6 * 6 + 1e-9)).all()), noisy.ess
    assert float(noisy.ess.max()) > 8  # at k = T the posterior is spread over many candidates


def test_orbit_with_identity_only_equals_plain_on_the_augmented_crystal():
    data = low_symmetry_batch(seed=13)
    loss = CrystalDiffusionLoss("orbit", crystal_orbit(1), CrystalDiffusion(100))
    noisy = loss.corrupt(data, torch.Generator().manual_seed(8))
    assert not torch.allclose(noisy.frac0, data.frac_coords)  # augmented by a random shift
    b = data.batch.numpy()
    sig = reference_sigmas(100)[noisy.step.numpy() - 1]
    lam = np.array([reference_lambda(x) for x in sig])
    expected = wn_score(noisy.frac_t.numpy() - noisy.frac0.numpy(), sig[b][:, None]) / np.sqrt(lam[b])[:, None]
    np.testing.assert_allclose(noisy.coord_target.numpy(), expected, rtol=1e-6, atol=1e-9)
    abar = reference_alpha_bars(100)[noisy.step.numpy()][:, None, None]
    eps = (noisy.cell_t.numpy() - np.sqrt(abar) * noisy.cell0.numpy()) / np.sqrt(1 - abar)
    np.testing.assert_allclose(noisy.lattice_target.numpy(), eps, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(noisy.ess.numpy(), 1.0)


def test_orbit_lowers_target_variance_against_augmentation():
    """Rao-Blackwellization: over repeated draws of (orbit element, noise) at a fixed large sigma, the
    orbit coordinate target varies less than the augmented one for the same crystal."""
    data = Batch.from_data_list([random_crystal(3, 21)] * 64)
    diff = CrystalDiffusion(100)
    step = torch.tensor(90)
    aug = CrystalDiffusionLoss("augment", crystal_orbit(64), diff).corrupt(data, torch.Generator().manual_seed(0), step=step)
    orb = CrystalDiffusionLoss("orbit", crystal_orbit(64), diff).corrupt(data, torch.Generator().manual_seed(0), step=step)
    # same seed: the same shift and the same noise, so the two targets are paired;
    # E[aug^2] = E[orbit^2] + E[Var(aug | x_t)]
    v_aug = float(aug.coord_target.square().mean())
    v_orb = float(orb.coord_target.square().mean())
    assert v_orb < 0.8 * v_aug, (v_orb, v_aug)


def test_loss_forward_trains_a_csp_net():
    from orbit_pyg.integrations.crystal.model import CSPNet

    data = low_symmetry_batch(seed=17)
    data = Batch.from_data_list([Data(z=d.z, frac_coords=d.frac_coords.float(), cell=d.cell.float(), num_nodes=d.num_nodes)
                                 for d in data.to_data_list()])
    net = CSPNet(hidden=16, num_layers=1, n_freq=4, time_dim=8)
    loss_fn = CrystalDiffusionLoss("orbit", crystal_orbit(8, "guided", lattice=True), CrystalDiffusion(50))
    loss, logs = loss_fn(net, data, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    assert set(logs) == {"loss_lattice", "loss_coord", "ess"} and all(math.isfinite(v) for v in logs.values())
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_bad_input_raises_clear_errors():
    loss = CrystalDiffusionLoss("orbit", crystal_orbit(4, lattice=True), CrystalDiffusion(20))
    good = random_crystal(3, 0)
    with pytest.raises(KeyError, match="frac_coords"):
        loss.corrupt(Data(z=good.z, cell=good.cell, num_nodes=3))
    with pytest.raises(KeyError, match="cell"):
        loss.corrupt(Data(z=good.z, frac_coords=good.frac_coords, num_nodes=3))
    bad = good.clone()
    bad.frac_coords[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss.corrupt(bad)
    bad = good.clone()
    bad.cell[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss.corrupt(bad)
    two = Batch.from_data_list([good, random_crystal(2, 1)])
    one_cell = two.clone()
    one_cell.cell = one_cell.cell[:1]
    with pytest.raises(ValueError, match="one 3x3 lattice per crystal"):
        loss.corrupt(one_cell)
    with pytest.raises(ValueError, match=r"frac_coords.*\[N, 3\]"):
        loss.corrupt(Data(z=good.z, frac_coords=good.frac_coords[:, :2], cell=good.cell, num_nodes=3))
    with pytest.raises(ValueError, match="mode"):
        CrystalDiffusionLoss("rao-blackwell")
    # steps outside 1..T used to wrap around silently (k = 0 gave a NaN lattice target in orbit mode)
    for step in (0, -1, 21):
        with pytest.raises(ValueError, match=r"1\.\.20"):
            loss.corrupt(good, step=torch.tensor(step))
    with pytest.raises(ValueError, match="integer step"):
        loss.corrupt(good, step=torch.tensor(2.5))
    with pytest.raises(ValueError, match="one per crystal"):
        loss.corrupt(two, step=torch.tensor([1, 2, 3]))
    noisy = loss.corrupt(good, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lattice output"):
        loss.criterion(torch.zeros(3, 3), noisy.coord_target, noisy)
    with pytest.raises(ValueError, match="coordinate output"):
        loss.criterion(noisy.lattice_target, torch.zeros(3, 2, dtype=noisy.coord_target.dtype), noisy)


# ------------------------------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("total", [1, 2, 50, 1000])
def test_step_grid_properties(total):
    for n in sorted({1, 2, 3, total // 3, total // 2, total - 1, total} & set(range(1, total + 1))):
        g = step_grid(n, total)
        assert len(g) == n and g[0] == total and g[-1] >= 1
        assert all(isinstance(k, int) for k in g)
        assert all(a > b for a, b in zip(g[:-1], g[1:]))
        if n > 1:
            assert g[-1] == 1
    assert step_grid(total, total) == list(range(total, 0, -1))
    for bad in (0, total + 1):
        with pytest.raises(ValueError, match="num_steps"):
            step_grid(bad, total)
        with pytest.raises(ValueError, match="num_steps"):  # 0 used to fall back to T silently
            PredictorCorrector(_zero_model, diffusion(total), num_steps=bad)


def _zero_model(z, frac, cell, t, batch, num_graphs):
    return torch.zeros_like(cell), torch.zeros_like(frac)


def test_sampler_is_seeded_and_in_range():
    diff = CrystalDiffusion(60)
    z = torch.tensor([38, 22, 8, 8, 8, 11, 17])
    batch = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    calls = []

    def model(z_, frac, cell, t, batch_, b):
        calls.append(float(t[0]))
        g = torch.Generator().manual_seed(int(1000 * float(t[0])))
        return 0.1 * torch.randn(cell.shape, generator=g, dtype=cell.dtype), torch.sin(2 * math.pi * frac)

    sampler = PredictorCorrector(model, diff, num_steps=12, step_lr=1e-4)
    a = sampler.sample(z, batch, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(z, batch, generator=torch.Generator().manual_seed(0))
    c = sampler.sample(z, batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    frac, cell = a
    assert frac.shape == (7, 3) and cell.shape == (2, 3, 3)
    assert bool(torch.isfinite(frac).all() and torch.isfinite(cell).all())
    assert bool(((frac >= 0) & (frac < 1)).all())
    # two network calls per step (corrector + predictor) at t = k / T over the grid
    grid = step_grid(12, 60)
    np.testing.assert_allclose(calls[: 2 * 12], [k / 60 for k in grid for _ in range(2)], rtol=1e-6)
    seen = []
    PredictorCorrector(_zero_model, diff, num_steps=5).sample(z, batch, callback=lambda k, f, l: seen.append(k),
                                                             generator=torch.Generator().manual_seed(0))
    assert seen == step_grid(5, 60)
    with pytest.raises(ValueError, match="matching"):
        sampler.sample(z, batch[:-1])


def test_lattice_step_is_the_ddpm_posterior():
    """With consecutive steps and eta = 1 the lattice update is DDPM's ancestral step."""
    t = 100
    diff = CrystalDiffusion(t)
    sampler = PredictorCorrector(_zero_model, diff, num_steps=t)
    abar = reference_alpha_bars(t)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    for k in (t, 57, 2):
        eps = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
        xt = math.sqrt(abar[k]) * x0 + math.sqrt(1 - abar[k]) * eps
        out = sampler._lattice_step(xt, eps, abar[k], abar[k - 1], torch.Generator().manual_seed(9))
        noise = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        beta = 1 - abar[k] / abar[k - 1]
        mean = (math.sqrt(abar[k - 1]) * beta / (1 - abar[k])) * x0 + (math.sqrt(1 - beta) * (1 - abar[k - 1]) / (1 - abar[k])) * xt
        var = beta * (1 - abar[k - 1]) / (1 - abar[k])
        np.testing.assert_allclose(out.numpy(), (mean + math.sqrt(var) * noise).numpy(), rtol=1e-9, atol=1e-10)
    # the last step returns the clean prediction
    eps = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    xt = math.sqrt(abar[1]) * x0 + math.sqrt(1 - abar[1]) * eps
    np.testing.assert_allclose(sampler._lattice_step(xt, eps, abar[1], 1.0, g).numpy(), x0.numpy(), atol=1e-10)


def _oracle(f0: torch.Tensor, l0: torch.Tensor, diff: CrystalDiffusion):
    """The exact denoiser of a data set holding one crystal: WN score and lattice eps (numpy math)."""
    sig = reference_sigmas(diff.num_steps)
    abar = reference_alpha_bars(diff.num_steps)

    def model(z, frac, cell, t, batch, b):
        k = int(round(float(t[0]) * diff.num_steps))
        score = wn_score(frac.numpy() - f0.numpy(), sig[k - 1]) / math.sqrt(reference_lambda(sig[k - 1]))
        eps = (cell.numpy() - math.sqrt(abar[k]) * l0.numpy()) / math.sqrt(1 - abar[k])
        return torch.from_numpy(eps).to(cell.dtype), torch.from_numpy(score).to(frac.dtype)

    return model


@pytest.mark.parametrize("num_steps,step_lr", [(40, 0.0), (12, 1e-5)])
def test_sampler_recovers_a_single_crystal_with_the_exact_denoiser(perov_data, num_steps, step_lr):
    d = perov_data[1]
    f0, l0 = d.frac_coords, d.cell
    diff = CrystalDiffusion(40)
    sampler = PredictorCorrector(_oracle(f0, l0, diff), diff, num_steps=num_steps, step_lr=step_lr)
    frac, cell = sampler.sample(d.z, torch.zeros(d.num_nodes, dtype=torch.long), generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
    np.testing.assert_allclose(cell.numpy(), l0.numpy(), atol=1e-8)
    assert np.abs(wrap(frac.numpy() - f0.numpy())).max() < 1e-6


def test_lattice_clip_keeps_strided_samples_bounded():
    """A poor lattice prediction near k = T explodes the cell on a strided grid unless L0 is clipped."""
    wrong = lambda z, f, l, t, b, n: (torch.zeros_like(l) + 0.3, torch.zeros_like(f))  # noqa: E731
    diffusion = CrystalDiffusion(1000)
    z, batch = torch.tensor([8, 8, 8, 22, 38]), torch.zeros(5, dtype=torch.long)
    cells = {}
    for clip in (None, 10.0):
        sampler = PredictorCorrector(wrong, diffusion, num_steps=20, lattice_clip=clip)
        _, cell = sampler.sample(z, batch, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        cells[clip] = float(cell.abs().max())
    assert cells[None] > 1e3  # the failure this option exists for
    assert cells[10.0] <= 10.0 + 1e-6
    with pytest.raises(ValueError, match="lattice_clip"):
        PredictorCorrector(wrong, diffusion, lattice_clip=0.0)
