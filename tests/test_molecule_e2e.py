"""Molecule door end to end: the samplers are exact for known denoisers (a point mass and a Gaussian
data distribution, both objectives, ODE and SDE), the EGNN is equivariant, and a tiny train →
save → load → sample → write SDF/XYZ → evaluate run works in seconds."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("rdkit")

from torch_geometric.data import Batch, Data  # noqa: E402

from orbit_pyg._utils import center  # noqa: E402
from orbit_pyg.orbits.rotation import random_rotations  # noqa: E402
from orbit_pyg.integrations.molecule import (  # noqa: E402
    AddAutomorphisms, ConformerConfig, EGNNDenoiser, MoleculeTransformer, evaluate_conformers, load_model,
    sample_conformers, sample_many, smiles_to_data, train_conformer_model, write_sdf, write_xyz,
)
from orbit_pyg.integrations.molecule.objectives import make_schedule  # noqa: E402
from orbit_pyg.integrations.molecule.sampling import sample_positions  # noqa: E402


class Oracle(nn.Module):
    """Exact denoiser for data ``x1 = scale · (centred Gaussian)`` (``x1_fixed=None``) or a point mass."""

    def __init__(self, objective: str, scale: float = 1.0, x1_fixed=None):
        super().__init__()
        self.config = ConformerConfig(objective=objective, num_steps=1000)
        self.schedule = make_schedule(self.config)
        self.parameterization = "eps" if objective == "diffusion" else "velocity"
        self.scale, self.x1 = scale, x1_fixed
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, xt, t, data):
        xt, t = xt.double(), t.double()
        b = data.batch
        a, s = self.schedule.alpha(t)[b].view(-1, 1), self.schedule.sigma(t)[b].view(-1, 1)
        if self.x1 is not None:
            x0 = self.x1
        else:  # posterior mean of an isotropic Gaussian prior N(0, scale^2) on the centred subspace
            x0 = a * self.scale**2 / (a**2 * self.scale**2 + s**2) * xt
        if self.parameterization == "eps":
            return ((xt - a * x0) / s).float()
        a_dot, s_dot = self.schedule.alpha_dot(t)[b].view(-1, 1), self.schedule.sigma_dot(t)[b].view(-1, 1)
        return (a_dot * x0 + s_dot / s * (xt - a * x0)).float()


def _graphs(num_graphs, nodes):
    z = torch.full((nodes,), 6, dtype=torch.long)
    empty = torch.zeros(2, 0, dtype=torch.long)
    return Batch.from_data_list([Data(z=z, edge_index=empty, edge_attr=torch.zeros(0, dtype=torch.long), num_nodes=nodes)
                                 for _ in range(num_graphs)])


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_sampler_recovers_point_mass(objective, sampler):
    batch = _graphs(2, 7)
    x1 = center(torch.randn(14, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), batch.batch, 2)
    model = Oracle(objective, x1_fixed=x1)
    out = sample_positions(model, batch, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.double(), x1, atol=1e-4)


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_sampler_reproduces_gaussian_data_scale(objective, sampler):
    # data N(0, 1.7^2 I) on the centred subspace: the samples must have that spread, not the prior's
    scale, nodes = 1.7, 400
    batch = _graphs(5, nodes)
    model = Oracle(objective, scale=scale)
    out = sample_positions(model, batch, steps=60, sampler=sampler, generator=torch.Generator().manual_seed(2))
    std = float(out.double().pow(2).mean().sqrt()) / ((nodes - 1) / nodes) ** 0.5
    assert abs(std - scale) < 0.06 * scale


def test_egnn_is_equivariant_and_transformer_is_not():
    d = smiles_to_data("CC(=O)N")
    b = Batch.from_data_list([d, smiles_to_data("CO")])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b.num_nodes, 3, generator=g)
    t = torch.rand(2, generator=g)
    r = random_rotations((), g, dtype=torch.float32)
    torch.manual_seed(0)
    egnn, tr = EGNNDenoiser(hidden=16, num_layers=2).eval(), MoleculeTransformer(hidden=16, num_layers=1, heads=2).eval()
    with torch.no_grad():
        assert torch.allclose(egnn(x @ r.T + 1.0, t, b), egnn(x, t, b) @ r.T, atol=1e-4)
        assert not torch.allclose(tr(x @ r.T, t, b), tr(x, t, b) @ r.T, atol=1e-2)


def test_tiny_train_sample_evaluate(tmp_path):
    smiles = ["CCO", "CC=O", "CCN", "COC", "CC(C)O", "OCC=O", "CC#N", "NCC=O"]
    aut = AddAutomorphisms(max_automorphisms=8)
    data = [aut(smiles_to_data(s, embed=True, seed=i)) for i, s in enumerate(smiles)]
    cfg = ConformerConfig(objective="flow", mode="orbit", model="transformer", hidden=16, layers=1, heads=2,
                          rotations=8, automorphisms=8, steps=6, batch_size=4, sample_steps=4)
    run = str(tmp_path / "run")
    rng = torch.get_rng_state()
    model, history = train_conformer_model(data, cfg, out_dir=run, log_every=3, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded by cfg.seed, the caller's RNG untouched
    assert [h["step"] for h in history] == [3, 6] and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    again, _ = train_conformer_model(data, cfg, log_every=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))  # same seed, same model
    loaded = load_model(run)
    probe = Batch.from_data_list(data[:2])
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.allclose(loaded(probe.pos, t, probe), model(probe.pos, t, probe), atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_conformers(loaded, smiles_to_data("CCO"), 3, generator=g1)
    b = sample_conformers(loaded, smiles_to_data("CCO"), 3, generator=g2)
    assert a.shape == (3, 9, 3) and torch.equal(a, b)
    assert torch.allclose(a.mean(1), torch.zeros(3, 3), atol=1e-5)  # centred conformers
    sde = sample_many(loaded, data[:2], [2, 2], steps=3, sampler="sde", generator=torch.Generator().manual_seed(0))
    ev = evaluate_conformers(data[:2], sde)
    assert 0 <= ev["cov_r"] <= 1 and ev["amr_r"] > 0 and ev["num_molecules"] == 2
    write_sdf(str(tmp_path / "c.sdf"), data[0], sde[0])
    write_xyz(str(tmp_path / "c.xyz"), data[0], sde[0])
    from ase.io import read
    from rdkit import Chem

    mols = [m for m in Chem.SDMolSupplier(str(tmp_path / "c.sdf"), removeHs=False, sanitize=False)]
    assert len(mols) == 2 and mols[1].GetConformer().GetPositions() == pytest.approx(sde[0][1].double().numpy(), abs=1e-3)
    frames = read(str(tmp_path / "c.xyz"), index=":")
    assert len(frames) == 2 and frames[0].get_chemical_formula() == "C2H6O"
    assert {"config.json", "last.pt", "metrics.jsonl"} <= set(os.listdir(run))


def test_training_refuses_missing_automorphisms():
    data = [smiles_to_data("CCO", embed=True)]
    cfg = ConformerConfig(mode="orbit", automorphisms=8, steps=1, batch_size=1, hidden=8, layers=1, heads=2)
    with pytest.raises(ValueError, match="orbit_perm"):
        train_conformer_model(data, cfg, progress=False)


def test_cli_train_sample_evaluate(tmp_path, capsys):
    import argparse
    import json

    from test_molecule_data import _embedded, _write_qm9_csv

    from orbit_pyg.integrations.molecule.cli import add_parser

    rows = [(s, *_embedded(s, seed=i)) for i, s in enumerate(["CCO", "CC=O", "CCN", "COC", "CC#N", "OCC=O"])]
    _write_qm9_csv(tmp_path / "qm9_part1.csv", rows)
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0

    run_dir, common = str(tmp_path / "run"), ["--source", str(tmp_path), "--root", str(tmp_path / "cache"), "--quiet"]
    run("molecule", "train", "--out", run_dir, "--n-test", "2", "--steps", "2", "--batch-size", "2", "--hidden", "8",
        "--layers", "1", "--heads", "2", "--rotations", "4", "--automorphisms", "4", *common)
    run("molecule", "sample", "--run", run_dir, "--num-steps", "3", "--source", str(tmp_path))
    run("molecule", "evaluate", "--run", run_dir, "--etkdg", "--source", str(tmp_path))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"]["num_molecules"] == 2 and result["etkdg"]["num_molecules"] == 2
    assert 0 <= result["etkdg"]["cov_r"] <= 1
    assert sorted(f for f in os.listdir(os.path.join(run_dir, "samples")) if f.endswith(".sdf")) == ["mol_0000.sdf", "mol_0001.sdf"]
