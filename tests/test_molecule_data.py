"""Molecule data and metrics: QM9 rows become graphs whose atom order matches the coordinates,
bad rows are counted skips with reasons, conversions round-trip, bad input raises clear errors, and
the symmetry-aware RMSD / coverage metrics agree with RDKit on hand-made cases."""
from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from orbit_pyg.orbits.rotation import random_rotations  # noqa: E402
from orbit_pyg.integrations.molecule import (  # noqa: E402
    MoleculeConversionError, QM9Conformers, atoms_to_data, best_rms, canonical_smiles, coverage_metrics,
    data_to_atoms, data_to_mol, evaluate_conformers, graph_automorphisms, mol_from_xyz, rmsd_matrix,
    smiles_to_data, smiles_to_mol, split_indices,
)

WATER = (["O", "H", "H"], [[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
METHANOL_SMILES = "CO"


def _write_qm9_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"])
        for i, (smi, el, xyz) in enumerate(rows):
            w.writerow([i + 1, smi, len(el), repr(el), repr(xyz)])


def _embedded(smiles, seed=0):
    from rdkit.Chem import AllChem

    mol = smiles_to_mol(smiles)
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    return [a.GetSymbol() for a in mol.GetAtoms()], mol.GetConformer().GetPositions().tolist()


def test_local_csv_counts_skips_by_reason(tmp_path):
    el, xyz = _embedded("CCO")
    far = [[c[0] + 20.0 * (i >= 3), c[1], c[2]] for i, c in enumerate(xyz)]  # atoms 3.. moved away: broken bonds
    el_m, xyz_m = _embedded("CO")
    rows = [
        ("CCO", el, xyz),
        ("C1CC", el, xyz),  # unparsable SMILES
        ("CCO", el, far),  # the geometry's bonds are not the SMILES's
        ("CO", el_m, xyz_m),
        ("CCO", el[::-1], xyz[::-1]),  # reversed order: still ethanol, atom order follows the XYZ
    ]
    src = tmp_path / "qm9_part1.csv"
    _write_qm9_csv(src, rows)
    ds = QM9Conformers(str(tmp_path / "root"), source=str(tmp_path), progress=False)
    assert len(ds) == 3 and ds.num_rows == 5
    assert ds.skip_reasons == {"smiles_parse": 1, "bond_determination": 1}
    assert {s["row"]: s["reason"] for s in ds.skipped} == {1: "smiles_parse", 2: "bond_determination"}
    reversed_ = ds[2]
    assert reversed_.smiles == "CCO"
    assert torch.allclose(reversed_.pos, torch.tensor(xyz[::-1], dtype=torch.float32))
    assert reversed_.z.tolist() == [{"C": 6, "O": 8, "H": 1}[e] for e in el[::-1]]
    # bonds follow the coordinates: every bond is short
    d = (reversed_.pos[reversed_.edge_index[0]] - reversed_.pos[reversed_.edge_index[1]]).norm(dim=-1)
    assert float(d.max()) < 1.6
    # cache: a second load reads the processed file (not rewritten) and gets the same tensors
    import os

    stamp = os.stat(ds.processed_paths[0]).st_mtime_ns
    again = QM9Conformers(str(tmp_path / "root"), source=str(tmp_path), progress=False)
    assert again.processed_paths == ds.processed_paths and os.stat(ds.processed_paths[0]).st_mtime_ns == stamp
    assert all(torch.equal(a.pos, b.pos) for a, b in zip(again, ds))


def test_qm9pack_first_rows_and_split(tmp_path):
    if importlib.util.find_spec("qm9pack") is None:
        pytest.skip("qm9pack data files not installed")
    ds = QM9Conformers(str(tmp_path), max_molecules=40, subset="first", automorphisms=10, progress=False)
    assert ds.num_rows == 40 and len(ds) + ds.num_skipped == 40
    for d in ds:  # atom order matches the coordinates: the graph of the geometry is the SMILES's
        assert canonical_smiles(data_to_mol(d)) == d.smiles
        assert d.orbit_perm.shape == (d.num_nodes, 10)
    assert ds[0].smiles == "C" and int(ds[0].aut_order) == 24
    s1, s2 = split_indices(len(ds), 10, 5, seed=0), split_indices(len(ds), 10, 5, seed=0)
    assert torch.equal(s1.test, s2.test) and not set(s1.train.tolist()) & set(s1.test.tolist())


def test_bad_input_errors():
    with pytest.raises(MoleculeConversionError, match="cannot parse") as e:
        smiles_to_data("C1CC")
    assert e.value.reason == "smiles_parse"
    with pytest.raises(MoleculeConversionError, match="disconnected") as e:
        smiles_to_data("C.O")
    assert e.value.reason == "disconnected"
    assert smiles_to_data("C.O", allow_disconnected=True).num_nodes == 8
    with pytest.raises(MoleculeConversionError) as e:  # five hydrogens on one carbon
        mol_from_xyz(["C", "H", "H", "H", "H", "H"],
                     [[0, 0, 0], [1.09, 0, 0], [-1.09, 0, 0], [0, 1.09, 0], [0, -1.09, 0], [0, 0, 1.09]], smiles="C")
    assert e.value.reason in ("bond_determination", "smiles_mismatch")
    with pytest.raises(MoleculeConversionError, match=r"shape \[3, 3\]"):
        mol_from_xyz(["O", "H", "H"], [[0, 0, 0]])


def test_conversions_round_trip():
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    d = atoms_to_data(atoms)
    assert d.smiles == "CCO" and torch.allclose(d.pos.double(), torch.tensor(atoms.get_positions()), atol=1e-6)
    back = data_to_atoms(d)
    assert (back.get_atomic_numbers() == atoms.get_atomic_numbers()).all()
    mol = data_to_mol(d)
    assert canonical_smiles(mol) == "CCO"
    assert np.allclose(mol.GetConformer().GetPositions(), atoms.get_positions(), atol=1e-5)
    w = mol_from_xyz(*WATER, smiles="O")
    assert [a.GetSymbol() for a in w.GetAtoms()] == ["O", "H", "H"]


def _conformer(smiles, seed=0):
    from rdkit.Chem import AllChem

    mol = smiles_to_mol(smiles)
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    from orbit_pyg.integrations.molecule import mol_to_data

    return mol_to_data(mol, dtype=torch.float64)


def test_rmsd_rotated_copy_is_zero_and_matches_rdkit():
    d = _conformer("CC(=O)NC1CC1")
    r = random_rotations((), torch.Generator().manual_seed(0))
    moved = d.pos @ r.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert rmsd_matrix(d, d.pos, moved.unsqueeze(0))[0, 0] < 1e-6
    other = _conformer("CC(=O)NC1CC1", seed=5).pos
    from rdkit.Chem import rdMolAlign, RemoveHs

    m_ref, m_gen = data_to_mol(d, d.pos), data_to_mol(d, other)
    expected = rdMolAlign.GetBestRMS(RemoveHs(m_gen), RemoveHs(m_ref))
    assert abs(rmsd_matrix(d, d.pos, other.unsqueeze(0))[0, 0] - expected) < 1e-8
    assert abs(best_rms(m_gen, m_ref) - expected) < 1e-8


def test_rmsd_symmetric_relabelling_is_zero():
    d = _conformer("OC(=O)CC(=O)O")  # malonic acid: the two carboxyl groups swap
    perms, _ = graph_automorphisms(data_to_mol(d), 50, "follow")
    heavy = d.z != 1
    p = next(p for p in perms if not torch.equal(p[heavy], torch.arange(d.num_nodes)[heavy]))
    relabelled = d.pos[p]
    assert rmsd_matrix(d, d.pos, relabelled.unsqueeze(0))[0, 0] < 1e-6
    # without symmetry handling the same relabelling is far off: the metric's symmetry matters
    diff = (relabelled - d.pos)[heavy]
    assert float(diff.pow(2).sum(-1).mean().sqrt()) > 0.5


def test_coverage_metrics_hand_made():
    d = np.array([[0.1, 0.8, 0.45], [0.9, 0.6, 0.7]])
    m = coverage_metrics(d, delta=0.5)
    assert m == pytest.approx({"cov_r": 0.5, "amr_r": (0.1 + 0.6) / 2, "cov_p": 2 / 3, "amr_p": (0.1 + 0.6 + 0.45) / 3})
    data = _conformer("CCO")
    ev = evaluate_conformers([data], [data.pos.unsqueeze(0).repeat(2, 1, 1)])
    assert ev["cov_r"] == 1.0 and ev["amr_r"] < 1e-6 and ev["num_molecules"] == 1


def test_etkdg_baseline_gives_distinct_conformers_in_atom_order():
    from orbit_pyg.integrations.molecule import etkdg_conformers

    d = _conformer("CCCCO")
    confs = etkdg_conformers(d, 3, seed=0)  # RDKit's randomSeed = 0 would repeat one conformer
    assert confs.shape == (3, d.num_nodes, 3)
    rmsd = rmsd_matrix(d, confs, confs)
    assert rmsd[0, 1] > 0.05 and rmsd[1, 2] > 0.05
    bonded = (confs[0][d.edge_index[0]] - confs[0][d.edge_index[1]]).norm(dim=-1)  # atom order = graph order
    assert float(bonded.max()) < 1.6 and float(bonded.min()) > 0.9
