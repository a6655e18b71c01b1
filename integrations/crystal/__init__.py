"""Crystal integration of orbit_pyg: CIF / pymatgen / ASE data and CSP evaluation.

Installed as ``orbit_pyg.integrations.crystal``. pymatgen, smact and ase are imported lazily,
inside the functions that need them; the core ``orbit_pyg`` never imports this package.

Data layout of one crystal graph (see :mod:`.convert`): ``z`` [N] long, ``frac_coords`` [N, 3]
in [0, 1), ``cell`` [1, 3, 3] (rows = lattice vectors), ``pos`` = ``frac_coords @ cell``,
``lengths`` / ``angles`` [1, 3], ``num_atoms`` [1].
"""
from .convert import (
    CrystalConversionError,
    atoms_to_data,
    batch_to_atoms,
    batch_to_structures,
    crystal_to_data,
    data_to_atoms,
    data_to_structure,
    reduce_structure,
    structure_to_data,
)
from .data import CDVAE_URL, CDVAEDataset, Split, read_cdvae_csv, split_indices
from .metrics import (
    DIFFCSP_MATCHER,
    Validity,
    as_structure,
    composition_validity,
    crystal_validity,
    csp_metrics,
    make_matcher,
    rms_dist,
    structure_validity,
    write_csp_results,
)

__all__ = [
    # convert
    "CrystalConversionError",
    "crystal_to_data",
    "structure_to_data",
    "data_to_structure",
    "batch_to_structures",
    "atoms_to_data",
    "data_to_atoms",
    "batch_to_atoms",
    "reduce_structure",
    # data
    "CDVAEDataset",
    "CDVAE_URL",
    "read_cdvae_csv",
    "split_indices",
    "Split",
    # metrics
    "DIFFCSP_MATCHER",
    "Validity",
    "make_matcher",
    "composition_validity",
    "structure_validity",
    "crystal_validity",
    "rms_dist",
    "csp_metrics",
    "write_csp_results",
    "as_structure",
]
