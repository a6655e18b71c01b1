"""Molecule integration of orbit_pyg: QM9 conformers, RDKit / ASE conversions, automorphism orbits,
reference denoisers, ODE / SDE samplers, and conformer metrics against RDKit ETKDG.

Installed as ``orbit_pyg.integrations.molecule``. RDKit and ASE are imported lazily, inside the
functions that need them; the core ``orbit_pyg`` never imports this package.

Stable API for other integrations (e.g. the ASE door)::

    from orbit_pyg.integrations.molecule import smiles_to_data, load_model, sample_conformers
    data = smiles_to_data("CCO")                      # graph: z, edge_index, edge_attr, smiles
    model = load_model("runs/qm9")                    # ConformerModel (config + EMA weights)
    pos = sample_conformers(model, data, num_samples=4, steps=50, generator=None)   # [4, N, 3] Å
    atoms = data_to_atoms(data, pos[0])               # ase.Atoms
"""
from .convert import (
    BOND_TYPES,
    MoleculeConversionError,
    atoms_to_data,
    canonical_smiles,
    data_to_atoms,
    data_to_mol,
    mol_from_xyz,
    mol_to_data,
    smiles_to_data,
    smiles_to_mol,
)
from .data import QM9Conformers, Split, qm9pack_folder, read_qm9_rows, split_indices
from .metrics import DELTA_QM9, best_rms, coverage_metrics, etkdg_conformers, evaluate_conformers, rmsd_matrix
from .models import EGNNDenoiser, MoleculeTransformer, build_model
from .objectives import ConformerConfig, ConformerModel, load_model, make_loss, train_conformer_model
from .orbits import AddAutomorphisms, graph_automorphisms, heavy_atom_automorphisms, molecule_orbit
from .sampling import (
    graph_only, posterior_mean, reverse_step, sample_conformers, sample_many, sample_positions, write_sdf, write_xyz,
)

__all__ = [
    "BOND_TYPES", "MoleculeConversionError", "atoms_to_data", "canonical_smiles", "data_to_atoms", "data_to_mol",
    "mol_from_xyz", "mol_to_data", "smiles_to_data", "smiles_to_mol",
    "QM9Conformers", "Split", "qm9pack_folder", "read_qm9_rows", "split_indices",
    "DELTA_QM9", "best_rms", "coverage_metrics", "etkdg_conformers", "evaluate_conformers", "rmsd_matrix",
    "EGNNDenoiser", "MoleculeTransformer", "build_model",
    "ConformerConfig", "ConformerModel", "load_model", "make_loss", "train_conformer_model",
    "AddAutomorphisms", "graph_automorphisms", "heavy_atom_automorphisms", "molecule_orbit",
    "graph_only", "posterior_mean", "reverse_step", "sample_conformers", "sample_many", "sample_positions",
    "write_sdf", "write_xyz",
]
