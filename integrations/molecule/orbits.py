r"""Symmetry orbits of a molecule: rotations (+ reflections) of the centred geometry and graph automorphisms.

**Graph automorphisms.** A permutation ``π`` of the atoms with ``z_{π(i)} = z_i`` and
``bond(π(i), π(j)) = bond(i, j)`` (element and bond type kept) maps a conformer to an equally valid
labelling of it; ``(π ∘ x)_i = x_{π(i)}``. They come from RDKit substructure self-matching
(``mol.GetSubstructMatches(mol, uniquify=False, useChirality=False)``).

**Hydrogens, deliberately.** Every hydrogen of a neutral organic molecule hangs on one heavy atom,
so the full automorphism group factorizes: an automorphism ``σ`` of the *heavy-atom* graph, then any
bijection from the hydrogens of heavy atom ``a`` to those of ``σ(a)``. Its order is
``|G| = |G_heavy| · prod_a n_H(a)!`` (a methyl group alone contributes ``3! = 6``), which explodes
quickly, while RDKit's capped enumeration (``maxMatches``) would return a biased prefix of it.
So the heavy-atom group is enumerated by RDKit on the hydrogen-free graph, and hydrogens are
handled by ``hydrogens=``:

* ``"permute"`` (default): the full group; the hydrogen bijections are part of each element
  (methyl / amine hydrogen relabellings are orbit elements). Use it when the denoiser predicts
  hydrogen positions and should not care which hydrogen of a methyl sits where.
* ``"follow"``: only ``G_heavy``; hydrogens follow their heavy atom in index order, so no element
  moves hydrogens among themselves alone (hydrogen-only permutations excluded).

**Exact when few, sampled when many.** When ``|G| <= max_automorphisms`` every element is listed
(identity first). Otherwise the identity plus ``max_automorphisms - 1`` elements drawn uniformly
from ``G`` (a uniform heavy automorphism composed with uniform hydrogen bijections: exactly uniform
on ``G`` when ``G_heavy`` was enumerated completely), seeded per molecule, fixed at preprocessing.
The list is stored per node as ``orbit_perm`` ``[N, K]`` (columns padded with ``-1``), the layout of
:class:`orbit_pyg.orbits.ExplicitPermutations`, so batching needs no Python loop.

A molecule with a hydrogen bonded to anything other than one heavy atom (``H2``, bridging H) falls
back to direct self-matching of the whole graph, capped at ``max_matches`` (identity plus uniform
draws from the matches when there are more than ``max_automorphisms``).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from orbit_pyg.orbits import O3, SO3, ExplicitPermutations, ProductOrbit

__all__ = ["heavy_atom_automorphisms", "graph_automorphisms", "AddAutomorphisms", "molecule_orbit", "HYDROGEN_MODES",
           "ROTATION_PROPOSALS"]

HYDROGEN_MODES = ("permute", "follow")
ROTATION_PROPOSALS = ("uniform", "guided", "exact")


def heavy_atom_automorphisms(mol, max_matches: int = 100000) -> tuple[list[tuple[int, ...]], list[int], bool]:
    """Automorphisms of the heavy-atom graph of ``mol`` (elements and bond types kept).

    Returns ``(perms, heavy, complete)``: permutations of ``range(len(heavy))`` (identity first),
    the heavy atoms' indices in ``mol``, and whether the enumeration was complete (not capped).

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_mol
        >>> perms, heavy, complete = heavy_atom_automorphisms(smiles_to_mol("CC(C)O"))
        >>> len(perms), complete   # the two methyl carbons swap
        (2, True)
    """
    from rdkit import Chem

    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() != 1]
    hmol = Chem.RemoveHs(mol, sanitize=False) if len(heavy) < mol.GetNumAtoms() else Chem.Mol(mol)
    if hmol.GetNumAtoms() != len(heavy):  # RemoveHs keeps some H (e.g. H2): use the full graph
        raise ValueError("heavy-atom graph and heavy-atom list disagree")
    perms, complete = _self_matches(hmol, max_matches)
    return perms, heavy, complete


def _self_matches(mol, max_matches: int) -> tuple[list[tuple[int, ...]], bool]:
    """Distinct self-matches of ``mol``'s graph (identity first) and whether RDKit's enumeration was complete."""
    matches = mol.GetSubstructMatches(mol, uniquify=False, useChirality=False, maxMatches=max_matches)
    ident = tuple(range(mol.GetNumAtoms()))
    return [ident] + sorted({tuple(m) for m in matches} - {ident}), len(matches) < max_matches


def _hydrogen_groups(mol, heavy: list[int]) -> Optional[list[list[int]]]:
    """Hydrogen indices attached to each heavy atom (in index order), or ``None`` if some H is not terminal on a heavy atom."""
    pos_of = {a: k for k, a in enumerate(heavy)}
    groups: list[list[int]] = [[] for _ in heavy]
    for atom in mol.GetAtoms():
        if atom.GetAtomicNum() != 1:
            continue
        nbrs = [n.GetIdx() for n in atom.GetNeighbors()]
        if len(nbrs) != 1 or nbrs[0] not in pos_of:
            return None
        groups[pos_of[nbrs[0]]].append(atom.GetIdx())
    return groups


def graph_automorphisms(
    mol,
    max_automorphisms: int = 50,
    hydrogens: str = "permute",
    generator: Optional[torch.Generator] = None,
    max_matches: int = 100000,
) -> tuple[Tensor, int]:
    r"""Automorphisms of a molecular graph as a ``[K, N]`` tensor (row ``k`` = ``π_k``, row 0 the identity).

    See the module docstring for the group, the ``hydrogens`` modes and the sampling rule.

    Returns:
        ``(perms, order)``: ``perms [K, N]`` long with ``K <= max_automorphisms`` (all of ``G`` when
        ``|G| <= max_automorphisms``, else identity + uniform draws, duplicates possible), and
        ``order`` = ``|G|`` (``-1`` when unknown because an enumeration was capped).

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_mol
        >>> perms, order = graph_automorphisms(smiles_to_mol("C"), max_automorphisms=50)
        >>> order, perms.shape   # 4! relabellings of methane's hydrogens
        (24, torch.Size([24, 5]))
        >>> graph_automorphisms(smiles_to_mol("C"), hydrogens="follow")[1]
        1
    """
    if hydrogens not in HYDROGEN_MODES:
        raise ValueError(f"unknown hydrogens mode {hydrogens!r}: use one of {HYDROGEN_MODES}")
    if int(max_automorphisms) < 1:
        raise ValueError(f"`max_automorphisms` must be >= 1, got {max_automorphisms}")
    n = mol.GetNumAtoms()
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() != 1]
    groups = _hydrogen_groups(mol, heavy) if heavy else None
    if groups is None:  # unusual hydrogens: self-match the whole graph
        perms, complete = _self_matches(mol, max_matches)
        order = len(perms) if complete else -1
        if len(perms) > max_automorphisms:  # identity + uniform draws, as below (not a sorted prefix)
            pick = torch.randint(0, len(perms), (int(max_automorphisms) - 1,), generator=generator).tolist()
            perms = [perms[0]] + [perms[i] for i in pick]
        return torch.tensor(perms, dtype=torch.long), order
    hperms, heavy, complete = heavy_atom_automorphisms(mol, max_matches)
    sizes = [len(g) for g in groups]
    # keep heavy automorphisms that also preserve hydrogen counts and formal charges (a query
    # built from a molecule does not compare them, e.g. for charged atoms)
    label = [(sizes[a], mol.GetAtomWithIdx(i).GetFormalCharge()) for a, i in enumerate(heavy)]
    hperms = [s for s in hperms if all(label[a] == label[b] for a, b in enumerate(s))]
    h_order = math.prod(math.factorial(s) for s in sizes) if hydrogens == "permute" else 1
    order = len(hperms) * h_order if complete else -1
    if order != -1 and order <= max_automorphisms:
        out = []
        for s in range(len(hperms)):
            if hydrogens == "follow":
                out.append(_assemble(n, heavy, groups, hperms[s], None))
            else:
                for hp in _all_hydrogen_bijections(sizes):
                    out.append(_assemble(n, heavy, groups, hperms[s], hp))
        return torch.tensor(out, dtype=torch.long), order
    k = int(max_automorphisms)
    out = [list(range(n))]
    pick = torch.randint(0, len(hperms), (k - 1,), generator=generator).tolist()
    for s in pick:
        hp = None
        if hydrogens == "permute":
            hp = [torch.randperm(m, generator=generator).tolist() for m in sizes]
        out.append(_assemble(n, heavy, groups, hperms[s], hp))
    return torch.tensor(out, dtype=torch.long), order


def _all_hydrogen_bijections(sizes: list[int]):
    """Every combination of per-group permutations (product of symmetric groups), identity first."""
    import itertools

    per_group = [list(itertools.permutations(range(m))) for m in sizes]
    for combo in itertools.product(*per_group):
        yield [list(c) for c in combo]


def _assemble(n: int, heavy: list[int], groups: list[list[int]], sigma, hperm) -> list[int]:
    """Full permutation ``π`` (``π[i]`` = source atom of atom ``i``) from a heavy automorphism and H bijections.

    Heavy atom ``heavy[a]`` takes ``heavy[sigma[a]]``; the ``r``-th hydrogen of group ``a`` takes
    hydrogen ``hperm[a][r]`` (index order when ``None``) of group ``sigma[a]``.
    """
    perm = list(range(n))
    for a, src in enumerate(sigma):
        perm[heavy[a]] = heavy[src]
        dst_h, src_h = groups[a], groups[src]
        if len(dst_h) != len(src_h):
            raise ValueError("a heavy-atom automorphism maps atoms with different hydrogen counts")
        order = hperm[a] if hperm is not None else range(len(dst_h))
        for r, q in enumerate(order):
            perm[dst_h[r]] = src_h[q]
    return perm


class AddAutomorphisms(BaseTransform):
    r"""Attach graph automorphisms as ``data.orbit_perm`` ``[N, K]`` (``-1``-padded columns) and ``data.aut_order``.

    The RDKit molecule is rebuilt from the graph (``z``, ``edge_index``, ``edge_attr``); the
    sampling generator is seeded per molecule from ``seed`` and the canonical SMILES, so the same
    molecule always gets the same list. ``K = max_automorphisms`` for every graph so that PyG can
    concatenate the lists of a batch along the node dimension.

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> d = AddAutomorphisms(max_automorphisms=8)(smiles_to_data("O"))
        >>> d.orbit_perm.t().tolist()[:2], int(d.aut_order)
        ([[0, 1, 2], [0, 2, 1]], 2)
    """

    def __init__(self, max_automorphisms: int = 50, hydrogens: str = "permute", seed: int = 0):
        if hydrogens not in HYDROGEN_MODES:
            raise ValueError(f"unknown hydrogens mode {hydrogens!r}: use one of {HYDROGEN_MODES}")
        self.max_automorphisms, self.hydrogens, self.seed = int(max_automorphisms), hydrogens, int(seed)

    def forward(self, data: Data) -> Data:
        from orbit_pyg.training import derive_seed

        from .convert import data_to_mol

        mol = data_to_mol(data, pos=None, sanitize=True)
        smiles = str(getattr(data, "smiles", ""))
        key = int.from_bytes(hashlib.blake2b(smiles.encode(), digest_size=7).digest(), "little")
        g = torch.Generator().manual_seed(derive_seed(self.seed, key, mol.GetNumAtoms()))
        perms, order = graph_automorphisms(mol, self.max_automorphisms, self.hydrogens, generator=g)
        table = torch.full((mol.GetNumAtoms(), self.max_automorphisms), -1, dtype=torch.long)
        table[:, : perms.size(0)] = perms.t()
        data.orbit_perm = table
        data.aut_order = torch.tensor([order], dtype=torch.long)
        return data

    def __repr__(self) -> str:
        return f"AddAutomorphisms(max_automorphisms={self.max_automorphisms}, hydrogens={self.hydrogens!r}, seed={self.seed})"


def molecule_orbit(rotations: int = 200, reflections: bool = False, automorphisms: bool = True,
                   proposal: str = "uniform", key: str = "orbit_perm"):
    r"""The orbit of a conformer: ``SO(3)`` (or ``O(3)`` with ``reflections``) × graph automorphisms.

    Joint candidates ``R_l · x_{π_p(i)}`` for ``l < rotations`` and the ``K`` automorphisms of each
    graph (``data.orbit_perm``, see :class:`AddAutomorphisms`): one softmax per graph over
    ``rotations · K`` candidates, scored in factored form by the core estimator.
    Positions are centred by the loss (the rotation orbit needs it).

    ``proposal`` (one of :data:`ROTATION_PROPOSALS`) picks how the rotation factor is handled:
    ``"uniform"`` (Haar samples, the paper), ``"guided"`` (Kabsch-centred mixture) or ``"exact"``:
    no rotation samples; for each automorphism ``π_p`` the rotation is integrated in closed form
    (matrix Fisher posterior with ``F = (alpha / sigma^2) x_tᵀ π_p x0``), the automorphisms are
    weighted by ``log c(F_p)`` and the target is ``sum_p w_p E_p[R] π_p x0``
    (``rotations`` is then ignored; with ``reflections`` the ``−I`` component enters the same softmax).

    Example:
        >>> molecule_orbit(200, automorphisms=True)
        ProductOrbit(ExplicitPermutations(key='orbit_perm'), SO3(num_candidates=200, proposal='uniform'))
        >>> molecule_orbit(proposal="exact", reflections=True)
        ProductOrbit(ExplicitPermutations(key='orbit_perm'), O3(proposal='exact'))
    """
    if proposal not in ROTATION_PROPOSALS:
        raise ValueError(f"unknown rotation proposal {proposal!r}: use one of {ROTATION_PROPOSALS}")
    rot = (O3 if reflections else SO3)(num_candidates=rotations, proposal=proposal)
    if not automorphisms:
        return rot
    return ProductOrbit([ExplicitPermutations(key), rot])
