r"""Conversions between RDKit molecules, ``ase.Atoms`` and PyG ``Data`` molecular graphs.

Layout of one molecular graph (every function of this package reads and writes it):

* ``z`` ``[N]`` long: atomic numbers, hydrogens included (explicit);
* ``pos`` ``[N, 3]`` float: Cartesian coordinates in Å (absent for a bare graph from a SMILES);
* ``edge_index`` ``[2, 2E]`` long: every bond in both directions (PyG offsets it when batching);
* ``edge_attr`` ``[2E]`` long: bond type code (:data:`BOND_TYPES`: 0 single, 1 double, 2 triple,
  3 aromatic);
* ``charge`` ``[N]`` long: formal charges (QM9 has a few zwitterions);
* ``smiles``: canonical SMILES without hydrogens or stereo (a string; batched into a list).

Atom order is the order of the coordinates: a molecule read from an XYZ geometry keeps the XYZ
order (:func:`mol_from_xyz`), so that positions, graph and RDKit ``Mol`` always agree.

Bad input raises :class:`MoleculeConversionError` (a ``ValueError``) whose ``reason`` is one of
``"smiles_parse"``, ``"bond_determination"``, ``"smiles_mismatch"``, ``"disconnected"``,
``"empty"``, ``"shape"``; datasets count skips by these reasons.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Data

__all__ = [
    "BOND_TYPES",
    "MoleculeConversionError",
    "smiles_to_mol",
    "canonical_smiles",
    "mol_from_xyz",
    "mol_to_data",
    "data_to_mol",
    "smiles_to_data",
    "atoms_to_data",
    "data_to_atoms",
]


class MoleculeConversionError(ValueError):
    """A molecule that cannot be turned into a graph; ``reason`` names the failure kind."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _bond_types():
    from rdkit import Chem

    bt = Chem.BondType
    return [bt.SINGLE, bt.DOUBLE, bt.TRIPLE, bt.AROMATIC]


#: names of the bond type codes stored in ``edge_attr``.
BOND_TYPES = ("single", "double", "triple", "aromatic")


@contextlib.contextmanager
def _quiet_rdkit():
    """Silence RDKit's logger (template-matching warnings) for the duration of the block."""
    from rdkit import rdBase

    block = rdBase.BlockLogs()
    try:
        yield
    finally:
        del block


@contextlib.contextmanager
def _quiet_stdout(active: bool = True):
    """Silence file descriptors 1 and 2 (RDKit's Hueckel code prints distance warnings from C++)."""
    if not active:
        yield
        return
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def smiles_to_mol(smiles: str, add_hs: bool = True):
    """Parse a SMILES into a sanitized RDKit ``Mol`` (explicit hydrogens by default).

    Raises:
        MoleculeConversionError: (``reason="smiles_parse"``) when RDKit cannot parse it.

    Example:
        >>> smiles_to_mol("O").GetNumAtoms()
        3
    """
    from rdkit import Chem

    if not isinstance(smiles, str) or not smiles.strip():
        raise MoleculeConversionError(f"`smiles` must be a non-empty string, got {smiles!r}", "smiles_parse")
    with _quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise MoleculeConversionError(f"RDKit cannot parse the SMILES {smiles!r}", "smiles_parse")
    return Chem.AddHs(mol) if add_hs else mol


def canonical_smiles(mol_or_smiles) -> str:
    """Canonical SMILES without hydrogens and without stereo: the key used to compare graphs.

    Example:
        >>> canonical_smiles("C(O)C") == canonical_smiles("CCO")
        True
    """
    from rdkit import Chem

    mol = smiles_to_mol(mol_or_smiles, add_hs=False) if isinstance(mol_or_smiles, str) else mol_or_smiles
    with _quiet_rdkit():
        return Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False)


def _bare_mol(elements: Sequence, coords):
    """An RDKit molecule with atoms and one conformer, no bonds (atom order = input order)."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    coords = torch.as_tensor(coords, dtype=torch.float64)
    if coords.dim() != 2 or coords.size(1) != 3 or coords.size(0) != len(elements):
        raise MoleculeConversionError(
            f"coordinates must have shape [{len(elements)}, 3] (one row per element), got {list(coords.shape)}", "shape")
    if len(elements) == 0:
        raise MoleculeConversionError("a molecule needs at least one atom", "empty")
    rw = Chem.RWMol()
    for e in elements:
        atom = Chem.Atom(int(e)) if not isinstance(e, str) else Chem.Atom(e)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    conf = Chem.Conformer(len(elements))
    for i, (x, y, z) in enumerate(coords.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()


def mol_from_xyz(elements: Sequence, coords, smiles: Optional[str] = None, charge: int = 0):
    r"""An RDKit molecule from an XYZ geometry, atoms in the XYZ order, bonds determined by RDKit.

    With ``smiles``: connectivity from the geometry (:func:`rdkit.Chem.rdDetermineBonds.DetermineConnectivity`,
    covalent radii, then extended-Hückel bond orders when that fails, e.g. for strained cages whose
    cross-ring distances look bonded), bond orders from the SMILES as a template
    (:func:`rdkit.Chem.AllChem.AssignBondOrdersFromTemplate`); when that fails, full bond
    determination (``DetermineBonds``, xyz2mol) is tried. The result must have the SMILES's canonical
    graph (``canonical_smiles`` equal, stereo ignored), otherwise ``reason="smiles_mismatch"``.
    Without ``smiles``: ``DetermineBonds(mol, charge=charge)``.

    Args:
        elements: element symbols or atomic numbers ``[N]``; coords: ``[N, 3]`` in Å.

    Raises:
        MoleculeConversionError: ``"bond_determination"`` (RDKit cannot assign bonds),
            ``"smiles_mismatch"`` (the geometry's graph is not the SMILES's), ``"shape"``, ``"empty"``.

    Example:
        >>> m = mol_from_xyz(["O", "H", "H"], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], smiles="O")
        >>> [a.GetSymbol() for a in m.GetAtoms()], m.GetNumBonds()
        (['O', 'H', 'H'], 2)
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem, rdDetermineBonds

    bare = _bare_mol(elements, coords)
    mol, err = None, None
    with _quiet_rdkit():
        if smiles is not None:
            template = smiles_to_mol(smiles, add_hs=True)
            for hueckel in (False, True):  # covalent radii first; extended Hueckel rescues strained cages
                try:
                    conn = Chem.Mol(bare)
                    with _quiet_stdout(hueckel):
                        rdDetermineBonds.DetermineConnectivity(conn, useHueckel=hueckel)
                    mol = AllChem.AssignBondOrdersFromTemplate(template, conn)
                    Chem.SanitizeMol(mol)
                    break
                except Exception as e:  # noqa: BLE001 - any RDKit failure means: try the next method
                    mol, err = None, e
        if mol is None:
            try:
                mol = Chem.Mol(bare)
                rdDetermineBonds.DetermineBonds(mol, charge=int(charge))
                Chem.SanitizeMol(mol)
            except Exception as e:  # noqa: BLE001
                raise MoleculeConversionError(f"RDKit could not determine the bonds: {e or err}", "bond_determination") from e
    if smiles is not None and canonical_smiles(mol) != canonical_smiles(smiles):
        raise MoleculeConversionError(
            f"the geometry's bonds give {canonical_smiles(mol)!r}, not the SMILES {canonical_smiles(smiles)!r}",
            "smiles_mismatch")
    return mol


def mol_to_data(mol, conf_id: int = -1, allow_disconnected: bool = False, dtype: torch.dtype = torch.float32) -> Data:
    """A molecular graph ``Data`` (see module docstring) from an RDKit ``Mol``, atom order kept.

    Hydrogens are those of the ``Mol``: call ``Chem.AddHs`` first for explicit hydrogens. ``pos`` is
    set when the molecule has a conformer (``conf_id``, default the first).

    Raises:
        MoleculeConversionError: ``"disconnected"`` for several fragments (unless
            ``allow_disconnected``), ``"empty"`` for no atoms.

    Example:
        >>> d = mol_to_data(smiles_to_mol("C=O"))
        >>> d.z.tolist(), d.edge_attr.tolist()
        ([6, 8, 1, 1], [1, 1, 0, 0, 0, 0])
    """
    from rdkit import Chem

    n = mol.GetNumAtoms()
    if n == 0:
        raise MoleculeConversionError("the molecule has no atoms", "empty")
    frags = Chem.GetMolFrags(mol)
    if len(frags) > 1 and not allow_disconnected:
        raise MoleculeConversionError(
            f"the molecule has {len(frags)} disconnected fragments; conformer generation needs one connected graph "
            "(pass allow_disconnected=True to keep it)", "disconnected")
    codes = {t: i for i, t in enumerate(_bond_types())}
    src, dst, attr = [], [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        code = codes.get(b.GetBondType())
        if code is None:
            raise MoleculeConversionError(f"bond {i}-{j} has unsupported type {b.GetBondType()}", "bond_determination")
        src += [i, j]
        dst += [j, i]
        attr += [code, code]
    data = Data(
        z=torch.tensor([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=torch.long),
        edge_index=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        edge_attr=torch.tensor(attr, dtype=torch.long),
        charge=torch.tensor([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=torch.long),
        num_nodes=n,
    )
    if mol.GetNumConformers() > 0:
        data.pos = torch.tensor(mol.GetConformer(conf_id).GetPositions(), dtype=dtype)
    data.smiles = canonical_smiles(mol)
    return data


def data_to_mol(data: Data, pos: Optional[Tensor] = None, sanitize: bool = True):
    """An RDKit ``Mol`` from a molecular graph; conformers from ``pos`` ``[N, 3]`` or ``[S, N, 3]``.

    Without ``pos`` the graph's own ``data.pos`` (if any) becomes the conformer. Atom ``i`` of the
    ``Mol`` is node ``i``.

    Example:
        >>> d = smiles_to_data("CO")
        >>> m = data_to_mol(d, pos=torch.randn(2, d.num_nodes, 3))
        >>> m.GetNumConformers(), canonical_smiles(m)
        (2, 'CO')
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    z = getattr(data, "z", None)
    if z is None or z.dim() != 1:
        raise ValueError("`data.z` must hold one atomic number per node ([N] long)")
    types = _bond_types()
    charges = getattr(data, "charge", None)
    charges = [0] * z.numel() if charges is None else charges.tolist()
    rw = Chem.RWMol()
    for a, q in zip(z.tolist(), charges):
        atom = Chem.Atom(int(a))
        atom.SetNoImplicit(True)
        atom.SetFormalCharge(int(q))
        rw.AddAtom(atom)
    ei, ea = data.edge_index, data.edge_attr
    for k in range(ei.size(1)):
        i, j = int(ei[0, k]), int(ei[1, k])
        if i < j:
            rw.AddBond(i, j, types[int(ea[k])])
    if pos is None:
        pos = getattr(data, "pos", None)
    if pos is not None:
        pos = torch.as_tensor(pos, dtype=torch.float64)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0)
        if pos.dim() != 3 or pos.shape[1:] != (z.numel(), 3):
            raise ValueError(f"`pos` must have shape [N, 3] or [S, N, 3] with N = {z.numel()}, got {list(pos.shape)}")
        for s in range(pos.size(0)):
            conf = Chem.Conformer(z.numel())
            for i, (x, y, w) in enumerate(pos[s].tolist()):
                conf.SetAtomPosition(i, Point3D(x, y, w))
            rw.AddConformer(conf, assignId=True)
    mol = rw.GetMol()
    if sanitize:
        with _quiet_rdkit():
            Chem.SanitizeMol(mol)
    return mol


def smiles_to_data(smiles: str, embed: bool = False, seed: int = 0, allow_disconnected: bool = False) -> Data:
    """The molecular graph of a SMILES (explicit hydrogens); ``embed=True`` adds an ETKDG ``pos``.

    This is the entry point for sampling conformers of a new molecule
    (:func:`~orbit_pyg.integrations.molecule.sampling.sample_conformers`).

    Raises:
        MoleculeConversionError: unparsable SMILES, disconnected fragments, failed embedding.

    Example:
        >>> d = smiles_to_data("CCO")
        >>> d.num_nodes, d.smiles, "pos" in d
        (9, 'CCO', False)
    """
    mol = smiles_to_mol(smiles, add_hs=True)
    if embed:
        from rdkit.Chem import AllChem

        params = AllChem.ETKDGv3()
        params.randomSeed = int(seed)
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise MoleculeConversionError(f"ETKDG could not embed {smiles!r}", "embedding")
    return mol_to_data(mol, allow_disconnected=allow_disconnected)


def atoms_to_data(atoms, smiles: Optional[str] = None, charge: int = 0, allow_disconnected: bool = False) -> Data:
    """A molecular graph from an ``ase.Atoms`` (bonds from the geometry, see :func:`mol_from_xyz`).

    Example:
        >>> from ase.build import molecule
        >>> d = atoms_to_data(molecule("CH4"))
        >>> d.z.tolist(), d.edge_index.size(1)
        ([6, 1, 1, 1, 1], 8)
    """
    mol = mol_from_xyz(atoms.get_atomic_numbers().tolist(), atoms.get_positions(), smiles=smiles, charge=charge)
    return mol_to_data(mol, allow_disconnected=allow_disconnected)


def data_to_atoms(data: Data, pos: Optional[Tensor] = None):
    """``ase.Atoms`` (no cell, no periodicity) from a molecular graph and positions ``[N, 3]`` in Å.

    The graph's SMILES goes to ``atoms.info["smiles"]``.

    Example:
        >>> a = data_to_atoms(smiles_to_data("O", embed=True))
        >>> a.get_chemical_formula()
        'H2O'
    """
    from ase import Atoms

    pos = getattr(data, "pos", None) if pos is None else pos
    if pos is None:
        raise ValueError("data_to_atoms needs positions: `data.pos` or the `pos` argument ([N, 3] in Å)")
    pos = torch.as_tensor(pos, dtype=torch.float64)
    if pos.shape != (data.z.numel(), 3):
        raise ValueError(f"`pos` must have shape [{data.z.numel()}, 3], got {list(pos.shape)}")
    atoms = Atoms(numbers=data.z.tolist(), positions=pos.numpy())
    if getattr(data, "smiles", None) is not None:
        atoms.info["smiles"] = data.smiles
    return atoms
