"""The ASE door with a conformer model: forces are kT ∇ log p_t of the molecule path (finite differences
against an exact single-conformer denoiser, diffusion and flow), the dynamics reproduces the molecule
sampler, generation from SMILES / RDKit / Atoms is seeded, and wrong inputs fail clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ase")
pytest.importorskip("rdkit")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.calculator import PropertyNotImplementedError  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402

from orbit_pyg.integrations.ase import DenoiserCalculator, ReverseDiffusion, generate, load_denoiser  # noqa: E402
from orbit_pyg.integrations.molecule import ConformerConfig, ConformerModel, smiles_to_data  # noqa: E402
from orbit_pyg.integrations.molecule.sampling import sample_positions  # noqa: E402

SMILES = "CCO"


def tiny(objective="diffusion", sampler="ode") -> ConformerModel:
    torch.manual_seed(0)
    return ConformerModel(ConformerConfig(objective=objective, hidden=8, layers=1, heads=2, sample_steps=6,
                                          sampler=sampler, rotations=4, automorphisms=0)).eval()


class _ExactNet(nn.Module):
    """Network output of the exact denoiser of one centred conformer x0 (eps or velocity)."""

    def __init__(self, model: ConformerModel, x0: torch.Tensor):
        super().__init__()
        self.sch, self.param, self.x0 = model.schedule, model.parameterization, x0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, data):
        t = t.to(torch.float64)
        a, s = self.sch.alpha(t), self.sch.sigma(t)
        x = x.to(torch.float64)
        eps = (x - a * self.x0) / s
        if self.param == "eps":
            return eps.float()
        return (self.sch.alpha_dot(t) * self.x0 + self.sch.sigma_dot(t) * eps).float()


def exact_model(objective: str, x0: torch.Tensor) -> ConformerModel:
    model = tiny(objective)
    model.net = _ExactNet(model, x0)
    return model


@pytest.mark.parametrize("objective,t", [("diffusion", 0.3), ("diffusion", 0.7), ("flow", 0.4)])
def test_forces_are_kT_grad_log_p_of_the_path(objective, t):
    g = np.random.default_rng(0)
    x0 = g.standard_normal((9, 3))
    x0 -= x0.mean(0)
    model = exact_model(objective, torch.from_numpy(x0))
    kT = 0.4
    atoms = Atoms(numbers=smiles_to_data(SMILES).z.numpy(), positions=x0 + 0.3 * g.standard_normal((9, 3)) + 5.0)
    atoms.calc = DenoiserCalculator(model, graph=SMILES, t=t, kT=kT)
    forces = atoms.get_forces()
    s = 1.0 - t if model.schedule.data_at_one else t
    tt = torch.tensor([s], dtype=torch.float64)
    a, sig = float(model.schedule.alpha(tt)), float(model.schedule.sigma(tt))

    def energy(pos):  # -kT log N(P x; a x0, sig^2) on the zero-centre-of-mass subspace
        xc = pos - pos.mean(0)
        return kT * ((xc - a * x0) ** 2).sum() / (2 * sig**2)

    h, fd = 1e-6, np.zeros_like(forces)
    for i in range(len(atoms)):
        for c in range(3):
            p, m = atoms.positions.copy(), atoms.positions.copy()
            p[i, c] += h
            m[i, c] -= h
            fd[i, c] = -(energy(p) - energy(m)) / (2 * h)
    np.testing.assert_allclose(forces, fd, rtol=1e-4, atol=1e-5)
    assert np.abs(forces).max() > 1e-2
    np.testing.assert_allclose(forces.sum(0), 0.0, atol=1e-6 * np.abs(forces).max())  # float32 network
    # the Tweedie step lands on the exact conformer (in the centred frame)
    xc = atoms.positions - atoms.positions.mean(0)
    np.testing.assert_allclose(xc + atoms.arrays["denoiser_displacement"], x0, atol=1e-5)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_potential_energy()


def test_molecule_calculator_contract_and_errors():
    model = tiny()
    atoms = generate(model, SMILES, n=1, seed=0)[0]
    atoms.calc = DenoiserCalculator(model, graph=SMILES, t=0.5)
    f = atoms.get_forces()
    assert atoms.calc.check_state(atoms) == []
    atoms.positions[0] += 0.1
    assert atoms.calc.check_state(atoms) == ["positions"]
    assert not np.allclose(atoms.get_forces(), f)
    with pytest.raises(ValueError, match="noise level"):
        atoms.calc.set(t=0.0)
    crystal = bulk("Cu")
    crystal.calc = DenoiserCalculator(model, t=0.5)
    with pytest.raises(ValueError, match="molecule model needs a non-periodic Atoms"):
        crystal.get_forces()
    wrong = Atoms("OCCHHHHHH", positions=atoms.positions)
    wrong.calc = DenoiserCalculator(model, graph=SMILES, t=0.5)
    with pytest.raises(ValueError, match="do not match the Atoms' numbers"):
        wrong.get_forces()


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_dynamics_reproduces_the_molecule_sampler(sampler, tmp_path):
    model = tiny(sampler=sampler)
    atoms = generate(model, SMILES, n=1, seed=1)[0]
    path = str(tmp_path / "m.traj")
    with ReverseDiffusion(atoms, model, graph=SMILES, seed=3, trajectory=path) as dyn:
        assert dyn.run() is True
    ref = sample_positions(model, Batch.from_data_list([smiles_to_data(SMILES)]), steps=6,
                           generator=torch.Generator().manual_seed(3), sampler=sampler)
    np.testing.assert_allclose(atoms.positions, ref.double().numpy(), atol=1e-5)
    frames = ase.io.read(path, index=":")
    assert len(frames) == 7 and [f.info["denoiser_t"] for f in frames][::6] == [1.0, 0.0]
    np.testing.assert_allclose(frames[-1].positions, atoms.positions)


def test_generation_from_smiles_rdkit_and_atoms_is_seeded(tmp_path):
    from rdkit import Chem

    model = tiny()
    a = generate(model, SMILES, n=3, seed=4)
    b = generate(model, SMILES, n=3, seed=4)
    c = generate(model, Chem.MolFromSmiles(SMILES), n=3, seed=4)
    d = generate(model, SMILES, n=3, seed=5)
    for x, y, w in zip(a, b, c):
        assert x.get_chemical_formula() == "C2H6O" and not x.pbc.any() and np.isfinite(x.positions).all()
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.positions, w.positions)
    assert not np.allclose(a[0].positions, d[0].positions)
    assert a[0].info["smiles"] == "CCO"
    from ase.build import molecule

    assert generate(model, molecule("CH4"), n=2)[0].get_chemical_formula() == "CH4"
    with pytest.raises(ValueError, match="empty SMILES"):
        generate(model, "")
    with pytest.raises(ValueError, match="molecule model needs a non-periodic Atoms"):
        generate(model, bulk("Cu"))
    with pytest.raises(ValueError, match="max_atoms"):
        generate(model, "CCCCCCCCCCCCCCCCCCCC", max_atoms=20)
    path = str(tmp_path / "conf.extxyz")
    from orbit_pyg.integrations.ase import write_structures

    write_structures(a, path)
    assert len(ase.io.read(path, index=":")) == 3


def test_load_denoiser_tells_conformer_runs_apart(tmp_path):
    from orbit_pyg.integrations.molecule import train_conformer_model

    data = [smiles_to_data(SMILES, embed=True, seed=i) for i in range(4)]
    cfg = ConformerConfig(hidden=8, layers=1, heads=2, steps=2, batch_size=2, rotations=4, automorphisms=0,
                          sample_steps=3, ema_decay=None)
    train_conformer_model(data, cfg, out_dir=str(tmp_path), progress=False)
    den = load_denoiser(str(tmp_path))
    assert den.kind == "molecule" and den.num_steps == 3
    assert len(generate(str(tmp_path), SMILES, n=2)) == 2


def test_cli_generates_conformers_and_refuses_a_composition(tmp_path, capsys):
    import argparse

    from orbit_pyg.integrations.ase.cli import add_parser
    from orbit_pyg.integrations.molecule import train_conformer_model

    data = [smiles_to_data(SMILES, embed=True, seed=i) for i in range(2)]
    cfg = ConformerConfig(hidden=8, layers=1, heads=2, steps=1, batch_size=2, rotations=4, automorphisms=0,
                          sample_steps=3, ema_decay=None)
    run = tmp_path / "run"
    train_conformer_model(data, cfg, out_dir=str(run), progress=False)
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    out = tmp_path / "c.extxyz"
    args = parser.parse_args(["ase", "generate", "--run", str(run), "--smiles", "CCO", "-n", "2", "--out", str(out)])
    assert args.func(args) == 0 and len(ase.io.read(str(out), index=":")) == 2
    traj = tmp_path / "m.traj"
    args = parser.parse_args(["ase", "trajectory", "--run", str(run), "--smiles", "CCO", "--out", str(traj)])
    assert args.func(args) == 0 and len(ase.io.read(str(traj), index=":")) == 4
    args = parser.parse_args(["ase", "generate", "--run", str(run), "--composition", "SrTiO3", "--out", str(out)])
    with pytest.raises(SystemExit, match="conformer model"):
        args.func(args)
