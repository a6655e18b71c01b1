"""The denoiser as an ASE calculator: forces / stress are the gradients of -kT log p_t (checked by
finite differences against an exact denoiser), and the ASE calculator contract holds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("ase")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.calculator import PropertyNotImplementedError  # noqa: E402
from ase.io.trajectory import Trajectory  # noqa: E402

from _reference import wrapped_normal_logpdf, wrapped_normal_score  # noqa: E402
from orbit_pyg.integrations.ase import CrystalDenoiser, DenoiserCalculator  # noqa: E402
from orbit_pyg.integrations.crystal.csp import CSPConfig, train_csp  # noqa: E402
from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion  # noqa: E402

T = 100
DIFF = CrystalDiffusion(T)
# a low-symmetry reference crystal: the exact denoiser of a data set holding only it
L0 = np.array([[3.9, 0.2, -0.1], [0.3, 4.2, 0.15], [-0.2, 0.1, 3.7]])
F0 = np.array([[0.1, 0.2, 0.3], [0.55, 0.45, 0.6], [0.8, 0.05, 0.5], [0.3, 0.7, 0.9]])
Z = np.array([38, 22, 8, 8])


class Oracle:
    """Exact scores of the single crystal (F0, L0): wrapped-normal score of F, DDPM eps of L; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z, frac, cell, t, batch, b):
        self.calls += 1
        k = int(round(float(t[0]) * T))
        sigma, abar = float(DIFF.sigmas[k - 1]), float(DIFF.alpha_bars[k])
        score = wrapped_normal_score(frac.double().numpy() - F0, sigma) / math.sqrt(float(DIFF.score_norms[k - 1]))
        eps = (cell.double().numpy() - math.sqrt(abar) * L0) / math.sqrt(1 - abar)
        return torch.from_numpy(eps).to(cell.dtype), torch.from_numpy(score).to(frac.dtype)


def energy(atoms: Atoms, k: int, kT: float) -> float:
    """-kT log p_k(X, L) of the single-crystal density, up to a constant (numpy reference)."""
    sigma, abar = float(DIFF.sigmas[k - 1]), float(DIFF.alpha_bars[k])
    cell = atoms.cell.array
    frac = np.linalg.solve(cell.T, atoms.positions.T).T
    log_f = wrapped_normal_logpdf(frac - F0, sigma).sum()
    log_l = -((cell - math.sqrt(abar) * L0) ** 2).sum() / (2 * (1 - abar))
    return -kT * (log_f + log_l)


def crystal(shift=0.0) -> Atoms:
    g = np.random.default_rng(0)
    frac = F0 + 0.04 * g.standard_normal(F0.shape) + shift
    cell = L0 + 0.1 * g.standard_normal((3, 3))
    return Atoms(numbers=Z, cell=cell, scaled_positions=frac, pbc=True)


@pytest.mark.parametrize("t,kT", [(0.3, 0.7), (0.8, 1.0)])
def test_forces_and_stress_are_gradients_of_minus_kT_log_p(t, kT):
    atoms = crystal()
    calc = DenoiserCalculator(CrystalDenoiser(Oracle(), DIFF), t=t, kT=kT)
    atoms.calc = calc
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    k = calc.denoiser.step_of(t)
    h = 1e-5
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, c] += h
            minus.positions[i, c] -= h
            fd[i, c] = -(energy(plus, k, kT) - energy(minus, k, kT)) / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=1e-5, atol=1e-6)
    assert np.abs(forces).max() > 1e-2  # the check is not vacuous
    # stress = (1/V) dE/de under L -> L (I + e) with fractional coordinates fixed (ASE's convention)
    fd_s = np.zeros((3, 3))
    frac = atoms.get_scaled_positions(wrap=False)
    for a in range(3):
        for b in range(3):
            vals = []
            for sign in (1, -1):
                e = np.zeros((3, 3))
                e[a, b] = sign * h
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ (np.eye(3) + e), scale_atoms=False)
                strained.set_scaled_positions(frac)
                vals.append(energy(strained, k, kT))
            fd_s[a, b] = (vals[0] - vals[1]) / (2 * h) / atoms.get_volume()
    np.testing.assert_allclose(stress, 0.5 * (fd_s + fd_s.T), rtol=1e-5, atol=1e-7)
    assert np.abs(stress).max() > 1e-3


def test_results_are_cached_until_the_system_or_a_parameter_changes():
    oracle = Oracle()
    atoms = crystal()
    calc = DenoiserCalculator(CrystalDenoiser(oracle, DIFF), t=0.2)
    atoms.calc = calc
    f1 = atoms.get_forces()
    atoms.get_forces(), atoms.get_stress()
    assert oracle.calls == 1  # one network call gives forces and stress
    assert calc.check_state(atoms) == []
    atoms.positions[0] += 0.05
    assert calc.check_state(atoms) == ["positions"]
    f2 = atoms.get_forces()
    assert oracle.calls == 2 and not np.allclose(f1, f2)
    atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=False)
    assert calc.check_state(atoms) == ["cell"]
    atoms.get_forces()
    assert oracle.calls == 3
    calc.set(t=0.2)  # unchanged parameter: results kept
    atoms.get_forces()
    assert oracle.calls == 3
    calc.set(t=0.6)
    assert calc.results == {}
    atoms.get_forces()
    assert oracle.calls == 4 and atoms.info["denoiser_t"] == 0.6
    atoms.numbers[-1] = 7
    assert "numbers" in calc.check_state(atoms)
    atoms.get_forces()
    assert oracle.calls == 5
    atoms.pbc = [True, True, False]
    assert "pbc" in calc.check_state(atoms)
    with pytest.raises(ValueError, match="periodic"):
        atoms.get_forces()


def test_property_errors_and_parameter_checks():
    atoms = crystal()
    atoms.calc = DenoiserCalculator(CrystalDenoiser(Oracle(), DIFF), t=0.2)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_potential_energy()
    with pytest.raises(PropertyNotImplementedError):
        atoms.calc.get_property("magmoms", atoms)
    with pytest.raises(ValueError, match="noise level"):
        atoms.calc.set(t=1.5)
    with pytest.raises(ValueError, match="kT"):
        DenoiserCalculator(CrystalDenoiser(Oracle(), DIFF), kT=-1.0)
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    molecule.calc = DenoiserCalculator(CrystalDenoiser(Oracle(), DIFF))
    with pytest.raises(ValueError, match="crystal model needs a periodic Atoms"):
        molecule.get_forces()
    with pytest.raises(TypeError, match="cannot make a denoiser"):
        DenoiserCalculator(object())


def test_extra_outputs_live_in_the_atoms_and_survive_files(tmp_path):
    atoms = crystal()
    atoms.calc = DenoiserCalculator(CrystalDenoiser(Oracle(), DIFF), t=0.02)
    forces = atoms.get_forces()
    k = atoms.calc.denoiser.step_of(0.02)
    sigma = float(DIFF.sigmas[k - 1])
    # Tweedie: at low noise the displacement points back to the clean crystal (up to the wrap)
    moved = atoms.get_scaled_positions(wrap=False) + np.linalg.solve(atoms.cell.array.T, atoms.arrays["denoiser_displacement"].T).T
    d_before = np.abs((atoms.get_scaled_positions(wrap=False) - F0) - np.round(atoms.get_scaled_positions(wrap=False) - F0))
    d_after = np.abs((moved - F0) - np.round(moved - F0))
    assert d_after.max() < 0.2 * d_before.max()
    np.testing.assert_allclose(atoms.info["denoiser_cell"], L0, atol=1e-9)  # the exact denoiser knows L0
    assert atoms.info["denoiser_sigma"] == pytest.approx(sigma)
    with Trajectory(str(tmp_path / "a.traj"), "w") as traj:
        traj.write(atoms)
    back = ase.io.read(str(tmp_path / "a.traj"))
    np.testing.assert_allclose(back.get_forces(), forces)
    np.testing.assert_allclose(back.info["denoiser_cell"], atoms.info["denoiser_cell"])
    ase.io.write(str(tmp_path / "a.extxyz"), atoms)
    back = ase.io.read(str(tmp_path / "a.extxyz"))
    np.testing.assert_allclose(back.arrays["denoiser_displacement"], atoms.arrays["denoiser_displacement"], atol=1e-7)


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    from torch_geometric.data import Data

    data = [Data(z=torch.tensor([38, 22, 8, 8, 8]), frac_coords=torch.rand(5, 3, generator=g),
                 cell=(3.9 + 0.1 * torch.rand(1, generator=g)) * torch.eye(3).unsqueeze(0), num_nodes=5) for _ in range(8)]
    cfg = CSPConfig(hidden=16, layers=1, n_freq=4, steps=3, batch_size=4, translations=8, diffusion_steps=50,
                    sample_steps=10, ema_decay=None)
    model, _ = train_csp(data, cfg)
    return model, cfg


def test_trained_model_forces_rotate_with_the_crystal_and_ignore_translations(trained):
    atoms = crystal()
    atoms.calc = DenoiserCalculator(trained, t=0.3)
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    assert np.isfinite(forces).all() and np.abs(forces).max() > 0
    shifted = atoms.copy()
    shifted.positions += np.array([0.7, -1.3, 2.1])
    shifted.calc = DenoiserCalculator(trained, t=0.3)
    np.testing.assert_allclose(shifted.get_forces(), forces, atol=1e-4)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ q.T, scale_atoms=True)  # x -> R x for cell rows and positions
    rotated.calc = DenoiserCalculator(trained, t=0.3)
    np.testing.assert_allclose(rotated.get_forces(), forces @ q.T, atol=1e-4)
    np.testing.assert_allclose(rotated.get_stress(voigt=False), q @ stress @ q.T, atol=1e-4)
