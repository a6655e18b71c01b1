"""Molecule orbits: graph automorphisms are automorphisms (elements and bonds kept), exact
enumeration agrees with brute force, sampling stays inside the group, and every orbit candidate
(rotation × automorphism) preserves pairwise distances up to the relabelling."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

pytest.importorskip("rdkit")

from torch_geometric.data import Batch  # noqa: E402

from orbit_pyg import OrbitDiffusionLoss, VPSchedule  # noqa: E402
from orbit_pyg.orbits import OrbitContext  # noqa: E402
from orbit_pyg.integrations.molecule import (  # noqa: E402
    AddAutomorphisms, graph_automorphisms, molecule_orbit, smiles_to_data, smiles_to_mol,
)


def _bond_set(data):
    ei, ea = data.edge_index, data.edge_attr
    return {(int(i), int(j), int(t)) for i, j, t in zip(ei[0], ei[1], ea)}


def _is_automorphism(data, perm) -> bool:
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(data.num_nodes)):
        return False
    if not torch.equal(data.z[perm], data.z):
        return False
    bonds = _bond_set(data)
    return {(perm[i], perm[j], t) for i, j, t in bonds} == bonds


def _brute_force_order(data) -> int:
    return sum(_is_automorphism(data, p) for p in itertools.permutations(range(data.num_nodes)))


@pytest.mark.parametrize("smiles,order", [("C", 24), ("O", 2), ("C=C", 8), ("CO", 6), ("C#N", 1)])
def test_exact_enumeration_matches_brute_force(smiles, order):
    data = smiles_to_data(smiles)
    assert _brute_force_order(data) == order
    perms, got = graph_automorphisms(smiles_to_mol(smiles), max_automorphisms=100)
    assert got == order
    assert perms.size(0) == order  # every element listed once
    assert len({tuple(p.tolist()) for p in perms}) == order
    assert perms[0].tolist() == list(range(data.num_nodes))
    assert all(_is_automorphism(data, p) for p in perms)


@pytest.mark.parametrize("smiles", ["CC(C)(C)C", "c1ccccc1", "OC(=O)CC(=O)O", "CC(C)C(N)=O", "C1CC2CC1C2"])
@pytest.mark.parametrize("hydrogens", ["permute", "follow"])
def test_automorphisms_preserve_elements_and_bonds(smiles, hydrogens):
    data = smiles_to_data(smiles)
    perms, order = graph_automorphisms(smiles_to_mol(smiles), 50, hydrogens, generator=torch.Generator().manual_seed(0))
    assert perms[0].tolist() == list(range(data.num_nodes))
    assert all(_is_automorphism(data, p) for p in perms)
    heavy = data.z != 1
    if hydrogens == "follow":  # no element moves hydrogens among themselves alone
        for p in perms[1:]:
            assert not torch.equal(p[heavy], torch.arange(data.num_nodes)[heavy])


def test_group_order_and_sampling_when_many():
    # neopentane: 4! methyl permutations × (3!)^4 hydrogen relabellings
    mol = smiles_to_mol("CC(C)(C)C")
    perms, order = graph_automorphisms(mol, 50, "permute", generator=torch.Generator().manual_seed(1))
    assert order == math.factorial(4) * 6**4
    assert perms.size(0) == 50
    assert len({tuple(p.tolist()) for p in perms}) > 40  # uniform draws from 31104 elements rarely collide
    perms_f, order_f = graph_automorphisms(mol, 50, "follow")
    assert order_f == 24 and perms_f.size(0) == 24


def test_bridging_hydrogens_fall_back_to_whole_graph_matching_and_are_sampled_when_many():
    from rdkit import Chem

    from torch_geometric.data import Data

    mol = Chem.AddHs(Chem.MolFromSmiles("[BH2]1[H][BH2][H]1", sanitize=False))  # diborane: bridging H
    pairs = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]  # all single bonds
    data = Data(z=torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()]), num_nodes=mol.GetNumAtoms(),
                edge_index=torch.tensor(pairs + [(j, i) for i, j in pairs]).t(), edge_attr=torch.zeros(2 * len(pairs)))
    full, order = graph_automorphisms(mol, 100)
    assert order == full.size(0) == _brute_force_order(data) == 16
    drawn, order_k = graph_automorphisms(mol, 5, generator=torch.Generator().manual_seed(0))
    assert order_k == order and drawn.size(0) == 5 and drawn[0].tolist() == list(range(data.num_nodes))
    assert all(_is_automorphism(data, p) for p in drawn)
    assert drawn[1:].tolist() != full[1:5].tolist()  # drawn from the group, not its sorted prefix


def test_add_automorphisms_layout_and_determinism():
    t = AddAutomorphisms(max_automorphisms=6, seed=3)
    a, b = t(smiles_to_data("CC")), t(smiles_to_data("CC"))
    assert a.orbit_perm.shape == (8, 6) and torch.equal(a.orbit_perm, b.orbit_perm)
    assert int(a.aut_order) == 72
    small = t(smiles_to_data("O"))
    assert (small.orbit_perm[:, 2:] == -1).all() and (small.orbit_perm[:, :2] >= 0).all()


def test_orbit_candidates_preserve_pairwise_distances():
    g = torch.Generator().manual_seed(0)
    datas = []
    for smi in ["CC(C)O", "O", "c1ccoc1"]:
        d = AddAutomorphisms(max_automorphisms=12)(smiles_to_data(smi, embed=True))
        d.pos = d.pos.double()
        datas.append(d)
    batch = Batch.from_data_list(datas)
    x0 = batch.pos - torch.zeros(3, dtype=torch.float64)
    from orbit_pyg._utils import center
    x0 = center(x0, batch.batch, 3)
    ctx = OrbitContext(x0=x0, xt=x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64),
                       batch=batch.batch, num_graphs=3, alpha=torch.ones(3, dtype=torch.float64),
                       sigma=torch.full((3,), 0.5, dtype=torch.float64), data=batch)
    orbit = molecule_orbit(rotations=5, reflections=True)
    cands = orbit.candidates(ctx, g)
    _, mask = cands.joint_log_nu_and_mask(x0.device)
    flat = torch.arange(cands.num_candidates)
    pos = cands.materialize(x0, batch.batch, flat)  # [K, N, 3]
    checked = 0
    for gi in range(3):
        sel = (batch.batch == gi).nonzero().flatten()
        d0 = torch.cdist(x0[sel], x0[sel])
        perm_local = cands.perm[:, sel] - sel[0]  # [Kp, n]
        kl = cands.sizes[1]
        for k in flat[mask[gi].flatten()].tolist():
            p = perm_local[k // kl]
            dk = torch.cdist(pos[k][sel], pos[k][sel])
            assert torch.allclose(dk, d0[p][:, p], atol=1e-9)
            checked += 1
    assert checked == (12 + 2 + 2) * 5  # isopropanol: 12 drawn of 2·3!·3! = 72; water 2; furan 2


def test_orbit_loss_runs_with_automorphisms_and_reports_ess():
    datas = [AddAutomorphisms(8)(smiles_to_data(s, embed=True)) for s in ["CC", "CO", "C=O"]]
    batch = Batch.from_data_list(datas)
    loss = OrbitDiffusionLoss(VPSchedule(), orbit=molecule_orbit(16), mode="orbit")
    noisy = loss.corrupt(batch, generator=torch.Generator().manual_seed(0))
    k = 16 * 8
    assert torch.isfinite(noisy.target).all()
    assert ((noisy.ess >= 1 - 1e-9) & (noisy.ess <= k + 1e-9)).all()
    # the orbit target is a convex combination of automorphism-relabelled rotated copies: the
    # weights of each graph sum to one over its valid candidates
    assert torch.allclose(noisy.weights.sum(1), torch.ones(3, dtype=noisy.weights.dtype), atol=1e-9)
    # candidates are (automorphism p, rotation r) at column p * 16 + r; the -1-padded automorphism
    # columns (CO: 3! = 6 of 8 listed, C=O: 2 of 8) must carry exactly zero weight
    listed = [min(int(d.aut_order), 8) for d in datas]
    assert listed == [8, 6, 2]
    for g, m in enumerate(listed):
        assert (noisy.weights[g, m * 16:] == 0).all() and noisy.weights[g, : m * 16].sum() > 1 - 1e-9
