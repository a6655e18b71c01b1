"""The reverse process as an ASE dynamics, ``generate`` and the ``ase`` CLI: the dynamics runs the crystal
sampler's own update (same numbers as the batched sampler), recovers the crystal of an exact denoiser,
writes trajectories that read back; generation is seeded, valid and refuses bad input clearly."""
from __future__ import annotations

import argparse
import io
import math

import numpy as np
import pytest
import torch

pytest.importorskip("ase")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from torch_geometric.data import Data  # noqa: E402

from _reference import wrapped_normal_score  # noqa: E402
from orbit_pyg.integrations.ase import (  # noqa: E402
    CrystalDenoiser, ReverseDiffusion, as_denoiser, generate, load_denoiser, parse_composition, write_structures,
)
from orbit_pyg.integrations.ase.cli import add_parser  # noqa: E402
from orbit_pyg.integrations.crystal.csp import CSPConfig, train_csp  # noqa: E402
from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion  # noqa: E402
from orbit_pyg.integrations.crystal.sampling import PredictorCorrector  # noqa: E402

T = 40
DIFF = CrystalDiffusion(T)
L0 = np.array([[3.9, 0.2, -0.1], [0.3, 4.2, 0.15], [-0.2, 0.1, 3.7]])
F0 = np.array([[0.1, 0.2, 0.3], [0.55, 0.45, 0.6], [0.8, 0.05, 0.5], [0.3, 0.7, 0.9]])
Z = [38, 22, 8, 8]


def oracle(z, frac, cell, t, batch, b):
    """Exact denoiser of the data set {(F0, L0)}."""
    k = int(round(float(t[0]) * T))
    sigma, abar = float(DIFF.sigmas[k - 1]), float(DIFF.alpha_bars[k])
    score = wrapped_normal_score(frac.double().numpy() - F0, sigma) / math.sqrt(float(DIFF.score_norms[k - 1]))
    eps = (cell.double().numpy() - math.sqrt(abar) * L0) / math.sqrt(1 - abar)
    return torch.from_numpy(eps).to(cell.dtype), torch.from_numpy(score).to(frac.dtype)


def template() -> Atoms:
    return Atoms(numbers=Z, cell=np.eye(3) * 5.0, scaled_positions=np.zeros((4, 3)), pbc=True)


def frac_error(atoms: Atoms) -> float:
    d = atoms.get_scaled_positions(wrap=False) - F0
    return float(np.abs(d - np.round(d)).max())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny CSP model trained for a few steps on random perovskite-like cells, saved as a run folder."""
    g = torch.Generator().manual_seed(0)
    data = [Data(z=torch.tensor([38, 22, 8, 8, 8]), frac_coords=torch.rand(5, 3, generator=g),
                 cell=(3.9 + 0.1 * torch.rand(1, generator=g)) * torch.eye(3).unsqueeze(0), num_nodes=5) for _ in range(8)]
    cfg = CSPConfig(hidden=16, layers=1, n_freq=4, steps=3, batch_size=4, translations=8, diffusion_steps=50,
                    sample_steps=8, ema_decay=None)
    out = tmp_path_factory.mktemp("run")
    train_csp(data, cfg, out_dir=str(out))
    return str(out)


# ------------------------------------------------------------------------------------------------ dynamics


def test_dynamics_recovers_the_crystal_of_the_exact_denoiser_and_the_trajectory_reads_back(tmp_path):
    atoms = template()
    path = str(tmp_path / "rev.traj")
    log = io.StringIO()
    with ReverseDiffusion(atoms, CrystalDenoiser(oracle, DIFF, step_lr=0.0), seed=0, trajectory=path, logfile=log) as dyn:
        assert dyn.run() is True
    np.testing.assert_allclose(atoms.cell.array, L0, atol=1e-8)
    assert frac_error(atoms) < 1e-6
    frames = ase.io.read(path, index=":")
    assert len(frames) == T + 1  # the prior draw and every step
    np.testing.assert_allclose(frames[-1].positions, atoms.positions, atol=1e-12)
    np.testing.assert_allclose(frames[-1].cell.array, atoms.cell.array, atol=1e-12)
    ts = [f.info["denoiser_t"] for f in frames]
    assert ts[0] == 1.0 and ts[-1] == 0.0 and all(a > b for a, b in zip(ts, ts[1:]))
    cells = np.stack([f.cell.array for f in frames])
    assert np.abs(cells[0] - L0).max() > 1.0  # the cell moved from the prior to L0
    assert len(log.getvalue().splitlines()) == T + 2  # header + one line per frame


def test_dynamics_is_the_batched_sampler_step_for_step():
    """Same seed -> the same crystal as PredictorCorrector.sample on a batch of one (shared update code)."""
    den = CrystalDenoiser(oracle, DIFF, num_steps=10, step_lr=1e-4)
    atoms = template()
    ReverseDiffusion(atoms, den, seed=7).run()
    frac, cell = PredictorCorrector(oracle, DIFF, num_steps=10, step_lr=1e-4).sample(
        torch.tensor(Z), torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = Atoms(numbers=Z, cell=cell[0].numpy(), scaled_positions=frac.numpy(), pbc=True)
    np.testing.assert_allclose(atoms.positions, expected.positions, atol=1e-10)
    assert abs(abs(np.linalg.det(atoms.cell.array)) - abs(np.linalg.det(cell[0].numpy()))) < 1e-8


def test_dynamics_observers_partial_runs_and_refinement():
    atoms = template()
    dyn = ReverseDiffusion(atoms, CrystalDenoiser(oracle, DIFF), num_steps=6, seed=1)
    seen = []
    dyn.attach(lambda: seen.append((dyn.nsteps, atoms.info["denoiser_step"])), interval=2)
    assert dyn.run(steps=3) is False and dyn.nsteps == 3
    assert dyn.run() is True and dyn.nsteps == 6
    assert [s for s, _ in seen] == [0, 2, 4, 6] and seen[-1][1] == 0
    with pytest.raises(RuntimeError, match="already reached"):
        dyn.step()
    # t_start < 1: noise the true crystal a little and denoise it back
    start = Atoms(numbers=Z, cell=L0, scaled_positions=F0, pbc=True)
    ReverseDiffusion(start, CrystalDenoiser(oracle, DIFF, step_lr=0.0), t_start=0.2, seed=2).run()
    assert frac_error(start) < 1e-6 and np.abs(start.cell.array - L0).max() < 1e-6


def test_dynamics_refuses_a_non_periodic_atoms():
    with pytest.raises(ValueError, match="crystal model needs a periodic Atoms"):
        ReverseDiffusion(Atoms("H2O", positions=np.eye(3)), CrystalDenoiser(oracle, DIFF))


# ------------------------------------------------------------------------------------------------ generate


def test_generated_crystals_are_valid_and_seeded(run_dir):
    model = load_denoiser(run_dir)
    a = generate(model, "SrTiO3", n=3, seed=5)
    b = generate(run_dir, "SrTiO3", n=3, seed=5)
    c = generate(model, "SrTiO3", n=3, seed=6)
    assert [x.get_chemical_formula() for x in a] == ["O3SrTi"] * 3
    for x in a:
        assert x.pbc.all() and np.linalg.det(x.cell.array) > 0 and x.get_volume() > 0
        assert np.isfinite(x.positions).all() and np.isfinite(x.cell.array).all()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.cell.array, y.cell.array)
    assert not np.allclose(a[0].positions, c[0].positions)
    assert not np.allclose(a[0].cell.array, a[1].cell.array)  # samples of one batch differ
    t = generate(model, bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 2), n=2, seed=0)
    assert [x.get_chemical_formula() for x in t] == ["Cl2Na2"] * 2
    assert generate(model, "SrTiO3", n=1, formula_units=2)[0].get_chemical_formula() == "O6Sr2Ti2"


def test_generation_refuses_bad_input_clearly(run_dir):
    model = load_denoiser(run_dir)
    with pytest.raises(ValueError, match="unknown element 'Qq'"):
        generate(model, "QqTiO3")
    with pytest.raises(ValueError, match="empty composition"):
        generate(model, "")
    with pytest.raises(ValueError, match="empty composition"):
        generate(model, "   ")
    with pytest.raises(ValueError, match="does not parse"):
        generate(model, "srtio3")
    with pytest.raises(ValueError, match="max_atoms"):
        generate(model, "Sr40Ti40O120")
    with pytest.raises(ValueError, match="crystal model needs a periodic Atoms"):
        generate(model, Atoms("H2O", positions=np.eye(3)))
    with pytest.raises(TypeError, match="composition string or a periodic template"):
        generate(model, 42)
    with pytest.raises(ValueError, match="positive number"):
        generate(model, "SrTiO3", n=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_denoiser(str(run_dir) + "-missing")
    assert parse_composition("Sr2Ti2O6") == [38, 38, 22, 22, 8, 8, 8, 8, 8, 8]


@pytest.mark.parametrize("name", ["out.cif", "out.extxyz", "out.traj"])
def test_written_structures_read_back(run_dir, tmp_path, name):
    images = generate(load_denoiser(run_dir), "CuAuO3", n=2, seed=0)
    write_structures(images, str(tmp_path / name))
    back = ase.io.read(str(tmp_path / name), index=":")
    assert len(back) == 2
    for x, y in zip(images, back):
        assert x.get_chemical_formula() == y.get_chemical_formula()
        np.testing.assert_allclose(x.cell.cellpar(), y.cell.cellpar(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.sort(x.get_all_distances(mic=True).ravel()),
                                   np.sort(y.get_all_distances(mic=True).ravel()), atol=1e-3)


def test_as_denoiser_overrides_and_cli(run_dir, tmp_path, capsys):
    den = as_denoiser(run_dir, num_steps=3)
    assert den.num_steps == 3 and as_denoiser(den) is den
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    out = tmp_path / "c.extxyz"
    args = parser.parse_args(["ase", "generate", "--run", run_dir, "--composition", "SrTiO3", "-n", "2", "--out", str(out)])
    assert args.func(args) == 0
    assert len(ase.io.read(str(out), index=":")) == 2
    traj = tmp_path / "t.traj"
    args = parser.parse_args(["ase", "trajectory", "--run", run_dir, "--composition", "SrTiO3", "--num-steps", "4",
                              "--out", str(traj)])
    assert args.func(args) == 0
    assert len(ase.io.read(str(traj), index=":")) == 5
    assert "wrote" in capsys.readouterr().out
    args = parser.parse_args(["ase", "generate", "--run", run_dir, "--smiles", "CCO", "--out", str(out)])
    with pytest.raises(SystemExit, match="crystal model"):
        args.func(args)
