r"""Conversions between crystals and PyG ``Data``: pymatgen ``Structure`` and ``ase.Atoms``.

A crystal is stored as one PyG graph with these keys (the project's conventions, DESIGN.md):

================  ================  ==========================================================
key               shape / dtype     meaning
================  ================  ==========================================================
``z``             ``[N]`` long      atomic numbers (1..118)
``frac_coords``   ``[N, 3]`` float  fractional coordinates, wrapped into ``[0, 1)``
``cell``          ``[1, 3, 3]``     lattice matrix ``L``, **rows = lattice vectors** (Å); the
                                    leading 1 makes batching concatenate to ``[B, 3, 3]``
``pos``           ``[N, 3]`` float  Cartesian positions ``frac_coords @ cell`` (Å), a
                                    convenience snapshot; transforms that move
                                    ``frac_coords`` do not update it
``lengths``       ``[1, 3]``        ``|a|, |b|, |c|`` (Å)
``angles``        ``[1, 3]``        ``alpha, beta, gamma`` (degrees)
``num_atoms``     ``[1]`` long      ``N``
================  ================  ==========================================================

Cartesian positions are ``x = f L`` (row vectors), so ``L`` is exactly ``Structure.lattice.matrix``
and ``Atoms.cell.array``. Wrapping ``f -> f - floor(f)`` moves an atom by a lattice vector only,
so the crystal is unchanged; round trips are exact up to that translation and the float dtype.

Every failure is a :class:`CrystalConversionError` (a ``ValueError``) whose ``reason`` is one of
``"disordered"``, ``"too_many_atoms"``, ``"bad_lattice"``, ``"bad_coords"``, ``"bad_species"``,
``"non_periodic"``, ``"empty"`` or ``"missing_key"``, and whose message names the field.

pymatgen and ase are imported lazily: importing this module needs neither.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms
    from pymatgen.core import Structure

__all__ = [
    "CrystalConversionError",
    "crystal_to_data",
    "structure_to_data",
    "data_to_structure",
    "batch_to_structures",
    "atoms_to_data",
    "data_to_atoms",
    "batch_to_atoms",
    "reduce_structure",
]

#: Relative threshold on ``|det L| / (|a| |b| |c|)`` below which a lattice counts as singular
#: (the sine-volume of the three cell vectors; 1e-8 is a cell flatter than any real crystal).
SINGULAR_TOL = 1e-8


class CrystalConversionError(ValueError):
    """A crystal that cannot be converted; ``reason`` names the category (see module docstring)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _require_pymatgen():
    try:
        import pymatgen.core  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "orbit_pyg.integrations.crystal needs pymatgen for this function: "
            "pip install 'orbit-pyg[crystal]'"
        ) from err


def _require_ase():
    try:
        import ase  # noqa: F401
    except ImportError as err:  # pragma: no cover
        raise ImportError("this function needs ase: pip install 'orbit-pyg[ase]'") from err


def _check_cell(cell: np.ndarray, name: str = "cell") -> np.ndarray:
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (1, 3, 3):
        cell = cell[0]
    if cell.shape != (3, 3):
        raise CrystalConversionError(
            f"`{name}` must be a 3x3 lattice matrix (rows = lattice vectors) or [1, 3, 3], got shape {tuple(cell.shape)}",
            "bad_lattice",
        )
    if not np.isfinite(cell).all():
        raise CrystalConversionError(f"`{name}` has non-finite entries: {cell.tolist()}", "bad_lattice")
    norms = np.linalg.norm(cell, axis=1)
    det = float(np.linalg.det(cell))
    if norms.min() <= 0.0 or abs(det) <= SINGULAR_TOL * float(np.prod(norms)):
        raise CrystalConversionError(
            f"`{name}` is singular (det = {det:.3e}, row lengths = {norms.tolist()}): "
            "the three lattice vectors must be linearly independent",
            "bad_lattice",
        )
    return cell


def _wrap(frac: np.ndarray) -> np.ndarray:
    """``f - floor(f)`` with the rounding case ``-1e-17 -> 1.0`` folded back to 0."""
    out = frac - np.floor(frac)
    out[out >= 1.0] = 0.0
    return out


def _lengths_angles(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.linalg.norm(cell, axis=1)
    a, b, c = cell
    cos = np.array([b @ c / (lengths[1] * lengths[2]), a @ c / (lengths[0] * lengths[2]), a @ b / (lengths[0] * lengths[1])])
    angles = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return lengths, angles


def crystal_to_data(
    z: Sequence[int] | np.ndarray | torch.Tensor,
    frac_coords: np.ndarray | torch.Tensor,
    cell: np.ndarray | torch.Tensor,
    *,
    max_atoms: int | None = None,
    dtype: torch.dtype | None = None,
    wrap: bool = True,
) -> Data:
    r"""Build a crystal ``Data`` from arrays, validating every field.

    Args:
        z: ``[N]`` atomic numbers in ``1..118``.
        frac_coords: ``[N, 3]`` fractional coordinates (any real values; wrapped into ``[0, 1)``
            when ``wrap``: ``f -> f - floor(f)``, a lattice translation of each atom).
        cell: ``[3, 3]`` or ``[1, 3, 3]`` lattice matrix, rows = lattice vectors, finite and
            non-singular (``|det L| > 1e-8 |a||b||c|``).
        max_atoms: raise when ``N > max_atoms``.
        dtype: float dtype of ``frac_coords``, ``cell``, ``pos``, ``lengths``, ``angles``
            (default ``torch.get_default_dtype()``). Wrapping is done in float64 and re-applied
            after the cast, so ``frac_coords < 1`` holds in float32 too.
        wrap: wrap coordinates into ``[0, 1)`` (default). ``pos`` is always ``frac_coords @ cell``.

    Returns:
        ``Data(z, frac_coords, cell [1,3,3], pos, lengths [1,3], angles [1,3], num_atoms [1])``.

    Raises:
        CrystalConversionError: a ``ValueError`` naming the bad field.

    Example:
        >>> d = crystal_to_data([8], [[0.5, 0.5, 1.25]], 4.0 * np.eye(3))
        >>> d.frac_coords.tolist(), d.pos.tolist(), tuple(d.cell.shape)
        ([[0.5, 0.5, 0.25]], [[2.0, 2.0, 1.0]], (1, 3, 3))
    """
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}")
    z_np = np.asarray(z.detach().cpu() if isinstance(z, torch.Tensor) else z).reshape(-1)
    n = int(z_np.shape[0])
    if n == 0:
        raise CrystalConversionError("the crystal has no atoms (`z` is empty)", "empty")
    if max_atoms is not None and n > max_atoms:
        raise CrystalConversionError(f"the crystal has {n} atoms, more than max_atoms={max_atoms}", "too_many_atoms")
    if not np.issubdtype(z_np.dtype, np.integer):
        if not np.all(np.isfinite(z_np)) or not np.all(np.asarray(z_np) == np.round(z_np)):
            raise CrystalConversionError(f"`z` must hold integer atomic numbers, got {z_np.tolist()}", "bad_species")
        z_np = np.round(z_np)
    z_np = z_np.astype(np.int64)
    if z_np.min() < 1 or z_np.max() > 118:
        raise CrystalConversionError(f"`z` must hold atomic numbers in 1..118, got {z_np.tolist()}", "bad_species")
    frac = np.asarray(frac_coords.detach().cpu() if isinstance(frac_coords, torch.Tensor) else frac_coords, dtype=np.float64)
    if frac.shape != (n, 3):
        raise CrystalConversionError(f"`frac_coords` must have shape [{n}, 3] (one row per atom), got {tuple(frac.shape)}", "bad_coords")
    if not np.isfinite(frac).all():
        raise CrystalConversionError("`frac_coords` has non-finite entries", "bad_coords")
    cell_np = np.array(_check_cell(cell.detach().cpu().numpy() if isinstance(cell, torch.Tensor) else cell))
    if wrap:
        frac = _wrap(frac)
    pos = frac @ cell_np
    lengths, angles = _lengths_angles(cell_np)
    frac_t = torch.from_numpy(frac).to(dtype)
    if wrap:  # float32 rounds 0.99999999 up to 1.0
        frac_t = torch.where(frac_t >= 1.0, frac_t - 1.0, frac_t)
    return Data(
        z=torch.from_numpy(z_np),
        frac_coords=frac_t,
        cell=torch.from_numpy(cell_np).to(dtype).unsqueeze(0),
        pos=torch.from_numpy(pos).to(dtype),
        lengths=torch.from_numpy(lengths).to(dtype).unsqueeze(0),
        angles=torch.from_numpy(angles).to(dtype).unsqueeze(0),
        num_atoms=torch.tensor([n], dtype=torch.long),
        num_nodes=n,
    )


def reduce_structure(structure: "Structure", niggli: bool = True, canonical: bool = True) -> "Structure":
    r"""DiffCSP / CDVAE cell preprocessing.

    ``niggli``: ``structure.get_reduced_structure("niggli")`` (same crystal, Niggli-reduced cell).
    ``canonical``: rebuild the lattice from its parameters, ``Lattice.from_parameters(a, b, c,
    alpha, beta, gamma)`` with the same fractional coordinates: a rigid rotation to pymatgen's
    standard orientation, as CDVAE's ``build_crystal`` does, so that ``L`` is a function of
    ``(lengths, angles)`` alone.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice([[0, 3, 0], [3, 0, 0], [1, 1, 3]]), ["Na"], [[0, 0, 0]])
        >>> r = reduce_structure(s)
        >>> round(r.volume, 6) == round(s.volume, 6), bool(abs(r.lattice.matrix[0, 1]) < 1e-12)
        (True, True)
    """
    _require_pymatgen()
    from pymatgen.core import Lattice, Structure

    if niggli:
        structure = structure.get_reduced_structure("niggli")
    if canonical:
        structure = Structure(
            Lattice.from_parameters(*structure.lattice.parameters),
            structure.species,
            structure.frac_coords,
            coords_are_cartesian=False,
        )
    return structure


def structure_to_data(
    structure: "Structure",
    *,
    max_atoms: int | None = None,
    niggli: bool = False,
    canonical: bool = False,
    dtype: torch.dtype | None = None,
) -> Data:
    r"""pymatgen ``Structure`` → crystal ``Data`` (keys in the module docstring).

    Args:
        structure: an **ordered** structure (every site one element at occupancy 1).
        max_atoms: raise when the (reduced) structure has more sites.
        niggli, canonical: DiffCSP preprocessing, see :func:`reduce_structure` (off by default
            so that the round trip ``data_to_structure(structure_to_data(s))`` returns ``s``).
        dtype: float dtype (default ``torch.get_default_dtype()``).

    Raises:
        CrystalConversionError: disordered / partially occupied / vacancy sites (the message
            names the site), dummy species, too many atoms, a singular or non-finite lattice.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        >>> d = structure_to_data(s, dtype=torch.float64)
        >>> d.z.tolist(), d.cell.shape, data_to_structure(d) == s
        ([55, 17], torch.Size([1, 3, 3]), True)
    """
    _require_pymatgen()
    from pymatgen.core import DummySpecies, Element, Species

    if not structure.is_ordered:
        for i, site in enumerate(structure):
            if not site.is_ordered:
                raise CrystalConversionError(
                    f"site {i} is disordered or partially occupied ({site.species.formula!r}, "
                    f"total occupancy {site.species.num_atoms:g}); only ordered structures convert",
                    "disordered",
                )
    if max_atoms is not None and len(structure) > max_atoms:
        raise CrystalConversionError(
            f"the structure has {len(structure)} atoms, more than max_atoms={max_atoms}", "too_many_atoms"
        )
    _check_cell(structure.lattice.matrix, "structure.lattice")
    if niggli or canonical:
        structure = reduce_structure(structure, niggli=niggli, canonical=canonical)
    z = []
    for i, site in enumerate(structure):
        sp = site.specie
        if isinstance(sp, DummySpecies) or not isinstance(sp, (Element, Species)):
            raise CrystalConversionError(f"site {i} has a dummy species {sp!s}; `z` needs real elements", "bad_species")
        z.append(sp.Z)
    return crystal_to_data(z, structure.frac_coords, structure.lattice.matrix, max_atoms=max_atoms, dtype=dtype)


def _graph_arrays(data: Data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = getattr(data, "z", None)
    if z is None:
        z = getattr(data, "atom_types", None)
    if z is None:
        raise CrystalConversionError("the Data has no `z` (atomic numbers, long [N])", "missing_key")
    for key in ("frac_coords", "cell"):
        if getattr(data, key, None) is None:
            shape = "[N, 3]" if key == "frac_coords" else "[1, 3, 3]"
            raise CrystalConversionError(f"the Data has no `{key}` ({shape})", "missing_key")
    z = z.detach().cpu().numpy().reshape(-1)
    frac = data.frac_coords.detach().cpu().double().numpy()
    cell = data.cell.detach().cpu().double().numpy()
    if cell.ndim == 3 and cell.shape[0] != 1:
        raise CrystalConversionError(
            f"`cell` has shape {tuple(cell.shape)}: this is a batch; use batch_to_structures / batch_to_atoms", "bad_lattice"
        )
    if frac.shape != (z.shape[0], 3):
        raise CrystalConversionError(f"`frac_coords` must have shape [{z.shape[0]}, 3], got {tuple(frac.shape)}", "bad_coords")
    if not np.isfinite(frac).all():
        raise CrystalConversionError("`frac_coords` has non-finite entries", "bad_coords")
    if z.shape[0] == 0:
        raise CrystalConversionError("the crystal has no atoms (`z` is empty)", "empty")
    if z.min() < 1 or z.max() > 118:
        raise CrystalConversionError(f"`z` must hold atomic numbers in 1..118, got {z.tolist()}", "bad_species")
    return z.astype(np.int64), frac, _check_cell(cell)


def data_to_structure(data: Data) -> "Structure":
    r"""One crystal ``Data`` → pymatgen ``Structure`` (float64; ``Lattice(cell)``, species from ``z``).

    Reads ``z`` (or ``atom_types``), ``frac_coords`` and ``cell`` (``[1, 3, 3]`` or ``[3, 3]``).
    Fractional coordinates are used as given (a generated sample need not be wrapped).

    Raises:
        CrystalConversionError: a missing key, a non-finite or singular ``cell``, non-finite
            coordinates, atomic numbers outside 1..118.

    Example:
        >>> d = crystal_to_data([11, 17], [[0, 0, 0], [0.5, 0.5, 0.5]], 5.6 * np.eye(3))
        >>> data_to_structure(d).composition.reduced_formula
        'NaCl'
    """
    _require_pymatgen()
    from pymatgen.core import Lattice, Structure

    z, frac, cell = _graph_arrays(data)
    return Structure(Lattice(cell), z.tolist(), frac, coords_are_cartesian=False)


def _split_batch(batch: Batch) -> list[Data]:
    if isinstance(batch, Data) and not isinstance(batch, Batch):
        return [batch]
    return batch.to_data_list()


def _convert_each(batch: Batch | Sequence[Data], convert: Callable[[Data], Any], errors: str) -> list[Any]:
    """``convert`` every graph of a batch; with ``errors="none"`` a failure becomes ``None``."""
    if errors not in ("raise", "none"):
        raise ValueError(f"`errors` must be 'raise' or 'none', got {errors!r}")
    graphs = _split_batch(batch) if isinstance(batch, Data) else list(batch)
    out: list[Any] = []
    for g in graphs:
        try:
            out.append(convert(g))
        except CrystalConversionError:
            if errors == "raise":
                raise
            out.append(None)
    return out


def batch_to_structures(batch: Batch | Sequence[Data], *, errors: str = "raise") -> list["Structure | None"]:
    r"""A PyG ``Batch`` (or list of ``Data``) → one ``Structure`` per graph.

    A Python loop over graphs: meant for evaluation and I/O, not training steps.

    Args:
        errors: ``"raise"`` (default) or ``"none"``, which puts ``None`` for a graph that does not
            convert (for example a generated sample with a singular lattice), so the list stays
            aligned with the batch.

    Example:
        >>> d = crystal_to_data([11, 17], [[0, 0, 0], [0.5, 0.5, 0.5]], 5.6 * np.eye(3))
        >>> [s.formula for s in batch_to_structures(Batch.from_data_list([d, d]))]
        ['Na1 Cl1', 'Na1 Cl1']
    """
    return _convert_each(batch, data_to_structure, errors)


def atoms_to_data(
    atoms: "Atoms",
    *,
    max_atoms: int | None = None,
    niggli: bool = False,
    canonical: bool = False,
    dtype: torch.dtype | None = None,
) -> Data:
    r"""``ase.Atoms`` (periodic in all three directions) → crystal ``Data``.

    ``cell`` is ``atoms.cell.array`` (ASE also stores lattice vectors as rows), ``frac_coords``
    ``atoms.get_scaled_positions(wrap=False)`` wrapped into ``[0, 1)``, ``z`` ``atoms.numbers``.
    ``niggli`` / ``canonical`` go through pymatgen (:func:`reduce_structure`).

    Raises:
        CrystalConversionError: ``atoms.pbc`` not all True ("non_periodic"), a singular or
            non-finite cell, too many atoms, an empty Atoms.

    Example:
        >>> from ase.build import bulk
        >>> d = atoms_to_data(bulk("NaCl", "rocksalt", a=5.64), dtype=torch.float64)
        >>> d.z.tolist(), round(float(torch.linalg.det(d.cell[0]).abs()), 2)
        ([11, 17], 44.85)
    """
    _require_ase()
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.all():
        raise CrystalConversionError(
            f"the Atoms are not periodic in all three directions (pbc={pbc.tolist()}); a crystal needs pbc=True",
            "non_periodic",
        )
    if len(atoms) == 0:
        raise CrystalConversionError("the Atoms object has no atoms", "empty")
    cell = _check_cell(atoms.cell.array, "atoms.cell")
    positions = np.asarray(atoms.positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        raise CrystalConversionError("`atoms.positions` has non-finite entries", "bad_coords")
    frac = np.linalg.solve(cell.T, positions.T).T
    if niggli or canonical:
        _require_pymatgen()
        from pymatgen.core import Lattice, Structure

        if max_atoms is not None and len(atoms) > max_atoms:
            raise CrystalConversionError(f"the Atoms have {len(atoms)} atoms, more than max_atoms={max_atoms}", "too_many_atoms")
        s = reduce_structure(Structure(Lattice(cell), atoms.numbers.tolist(), frac), niggli=niggli, canonical=canonical)
        return crystal_to_data([sp.Z for sp in s.species], s.frac_coords, s.lattice.matrix, max_atoms=max_atoms, dtype=dtype)
    return crystal_to_data(atoms.numbers, frac, cell, max_atoms=max_atoms, dtype=dtype)


def data_to_atoms(data: Data) -> "Atoms":
    r"""One crystal ``Data`` → ``ase.Atoms(numbers=z, cell=cell, scaled_positions=frac_coords, pbc=True)``.

    A string ``material_id`` on the Data is copied to ``atoms.info["material_id"]``.

    Example:
        >>> d = crystal_to_data([11, 17], [[0, 0, 0], [0.5, 0.5, 0.5]], 5.6 * np.eye(3))
        >>> a = data_to_atoms(d); a.get_chemical_formula(), bool(a.pbc.all())
        ('ClNa', True)
    """
    _require_ase()
    from ase import Atoms

    z, frac, cell = _graph_arrays(data)
    atoms = Atoms(numbers=z, cell=cell, scaled_positions=frac, pbc=True)
    mid = getattr(data, "material_id", None)
    if isinstance(mid, str):
        atoms.info["material_id"] = mid
    return atoms


def batch_to_atoms(batch: Batch | Sequence[Data], *, errors: str = "raise") -> list["Atoms | None"]:
    r"""A PyG ``Batch`` (or list of ``Data``) → one ``ase.Atoms`` per graph (see :func:`batch_to_structures`).

    Example:
        >>> d = crystal_to_data([11, 17], [[0, 0, 0], [0.5, 0.5, 0.5]], 5.6 * np.eye(3))
        >>> len(batch_to_atoms(Batch.from_data_list([d, d, d])))
        3
    """
    return _convert_each(batch, data_to_atoms, errors)
