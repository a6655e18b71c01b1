"""ASE door of orbit_pyg: a trained model as an ASE calculator, an ASE dynamics and a structure generator.

Installed as ``orbit_pyg.integrations.ase`` (inside it, ``import ase`` is the real ASE).

* :class:`DenoiserCalculator`: ``forces = kT ∇ log p_t`` (and the matching stress) of a trained
  denoiser at noise level ``t``; extra outputs in ``atoms.info`` / ``atoms.arrays``.
* :class:`ReverseDiffusion`: the reverse process as an ASE dynamics (``trajectory=``, ``logfile=``,
  ``attach``, ``run(steps=...)``), moving positions and cell.
* :func:`generate`: ``list[ase.Atoms]`` from a composition string or a template ``Atoms`` (crystal
  models), or from a SMILES, an RDKit ``Mol`` or a molecule ``Atoms`` (conformer models);
  :func:`write_structures` writes them (CIF, extxyz, traj) through ``ase.io``. A conditional crystal
  run takes ``text=`` / ``props=`` / ``guidance=`` as ``orbit-pyg crystal sample`` does.
* :func:`load_denoiser` / :func:`as_denoiser`: a run folder, ``(model, cfg)`` or a ``ConformerModel`` as a
  :class:`CrystalDenoiser` / :class:`MoleculeDenoiser`.

Example:
    >>> from orbit_pyg.integrations.ase import generate, write_structures   # doctest: +SKIP
    >>> images = generate("runs/perov", "SrTiO3", n=8, seed=0)              # doctest: +SKIP
    >>> write_structures(images, "srtio3.extxyz")                           # doctest: +SKIP
"""
from .calculator import DenoiserCalculator
from .dynamics import ReverseDiffusion
from .generate import DEFAULT_MAX_ATOMS, generate, parse_composition, write_structures
from .models import (
    CrystalDenoiser,
    MoleculeDenoiser,
    as_denoiser,
    check_graph_matches,
    check_molecule,
    check_periodic,
    load_denoiser,
    right_handed,
)

__all__ = [
    "DenoiserCalculator",
    "ReverseDiffusion",
    "generate",
    "parse_composition",
    "write_structures",
    "DEFAULT_MAX_ATOMS",
    "CrystalDenoiser",
    "MoleculeDenoiser",
    "check_molecule",
    "check_graph_matches",
    "as_denoiser",
    "load_denoiser",
    "check_periodic",
    "right_handed",
]
