r"""Generate candidate structures as ``ase.Atoms`` from a trained model, and write them with ``ase.io``.

``generate(model, "SrTiO3", n=8)`` draws 8 crystals of that composition (one formula unit per cell
unless ``formula_units`` says otherwise) with the model's reverse process
(:class:`~orbit_pyg.integrations.crystal.sampling.PredictorCorrector`, all samples in one batch);
``generate(model, template_atoms, n=8)`` keeps only the template's atoms (numbers), and samples
lattice and positions anew. A seed fixes the result (same seed, model, settings and ``batch_size``
give the same structures).

Every returned crystal is ``Atoms(numbers, cell, scaled_positions, pbc=True)`` with a right-handed
cell (``det L > 0``; a left-handed sample is re-expressed on ``-L``, nothing moves) and
``atoms.info`` holding ``composition``, ``seed``, ``sample`` and ``num_steps``.

Conditional crystal runs (``orbit-pyg crystal train --condition text|props|text+props``) take the
same condition as ``orbit-pyg crystal sample``: ``text="..."`` (one description for all samples)
and / or ``props="heat_all=-0.5,dir_gap=2"`` (or a ``{name: value}`` mapping, physical units),
built by :func:`~orbit_pyg.integrations.crystal.condition.sample_condition`, and the classifier-free
guidance scale ``guidance`` (``s``; default the run's, 1 = conditional, 0 = unconditioned, > 1 =
stronger). Giving neither samples a conditional run with its null condition (unconditioned); a
condition for an unconditional run, or only one part of a ``text+props`` run's condition, is a
``ValueError``. Conditioned samples also carry ``atoms.info["text"]`` / ``["props"]`` (a
``name=value,...`` string) and ``["guidance"]``.

With a conformer model (:mod:`orbit_pyg.integrations.molecule`), ``what`` is a SMILES, an RDKit
``Mol``, a molecular graph ``Data`` or a non-periodic ``Atoms`` (bonds perceived from its geometry);
the conformers come from :func:`~orbit_pyg.integrations.molecule.sampling.sample_conformers` and are
returned as non-periodic ``Atoms`` (centred, Å) with ``atoms.info["smiles"]``, ``seed``, ``sample``
and ``num_steps``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from .models import CrystalDenoiser, MoleculeDenoiser, as_denoiser, check_periodic, right_handed

__all__ = ["parse_composition", "generate", "write_structures", "DEFAULT_MAX_ATOMS"]

#: Largest cell :func:`generate` builds unless told otherwise (the crystal network is fully
#: connected within a cell: cost grows as the number of atoms squared).
DEFAULT_MAX_ATOMS = 64


def parse_composition(composition: str, formula_units: int = 1, max_atoms: Optional[int] = DEFAULT_MAX_ATOMS) -> list[int]:
    r"""Atomic numbers of a composition string, in formula order, repeated ``formula_units`` times.

    Raises:
        ValueError: an empty or unparsable composition, an unknown element symbol, or more than
            ``max_atoms`` atoms in the cell.

    Example:
        >>> parse_composition("SrTiO3")
        [38, 22, 8, 8, 8]
        >>> parse_composition("Xx2O")
        Traceback (most recent call last):
        ...
        ValueError: composition 'Xx2O': unknown element 'Xx'
    """
    from ase.data import atomic_numbers
    from ase.formula import Formula

    if not isinstance(composition, str):
        raise TypeError(f"the composition must be a string such as 'SrTiO3', got {type(composition).__name__}")
    text = composition.strip()
    if not text:
        raise ValueError("empty composition: give a formula such as 'SrTiO3'")
    try:
        counts = Formula(text).count()
    except Exception as err:  # noqa: BLE001 - ASE raises bare ValueErrors with no message
        raise ValueError(f"composition {composition!r} does not parse as a chemical formula (e.g. 'SrTiO3')") from err
    if not counts or sum(counts.values()) == 0:
        raise ValueError(f"empty composition {composition!r}: it holds no atoms")
    for symbol in counts:
        if atomic_numbers.get(symbol, 0) < 1:
            raise ValueError(f"composition {composition!r}: unknown element {symbol!r}")
    if int(formula_units) < 1:
        raise ValueError(f"`formula_units` must be a positive integer, got {formula_units}")
    numbers = [atomic_numbers[s] for s, c in counts.items() for _ in range(c)] * int(formula_units)
    if max_atoms is not None and len(numbers) > max_atoms:
        raise ValueError(f"composition {composition!r} x {formula_units} has {len(numbers)} atoms per cell, more than "
                         f"max_atoms={max_atoms}; raise max_atoms if the model can take it")
    return numbers


def _numbers_of(what: Any, formula_units: int, max_atoms: Optional[int]) -> tuple[list[int], str]:
    from ase import Atoms

    if isinstance(what, Atoms):
        check_periodic(what, "template")
        numbers = what.numbers.tolist() * int(formula_units)
        if max_atoms is not None and len(numbers) > max_atoms:
            raise ValueError(f"the template x {formula_units} has {len(numbers)} atoms, more than max_atoms={max_atoms}")
        if min(numbers) < 1:
            raise ValueError("the template holds atoms with atomic number 0 (unknown element 'X')")
        return numbers, Atoms(numbers=numbers).get_chemical_formula()
    if isinstance(what, str):
        numbers = parse_composition(what, formula_units, max_atoms)
        return numbers, Atoms(numbers=numbers).get_chemical_formula()
    raise TypeError(f"a crystal model generates from a composition string or a periodic template Atoms, "
                    f"got {type(what).__name__}")


@torch.no_grad()
def generate(
    model: Any,
    what: Any,
    n: int = 1,
    *,
    cfg: Any = None,
    seed: int = 0,
    num_steps: Optional[int] = None,
    step_lr: Optional[float] = None,
    formula_units: int = 1,
    max_atoms: Optional[int] = DEFAULT_MAX_ATOMS,
    batch_size: int = 256,
    text: Optional[str] = None,
    props: Any = None,
    guidance: Optional[float] = None,
) -> list:
    r"""``n`` candidate structures for ``what`` as a list of ``ase.Atoms``.

    Args:
        model: a :class:`~.models.CrystalDenoiser`, a run folder, or ``(net, cfg)`` (:func:`~.models.as_denoiser`).
        what: crystals: a composition string (``"SrTiO3"``) or a periodic template ``Atoms`` (its numbers
            are kept, lattice and positions are sampled); molecules: a SMILES, an RDKit ``Mol``, a graph
            ``Data`` or a non-periodic ``Atoms``.
        n: number of samples.
        cfg: the ``CSPConfig`` when ``model`` is a bare network.
        seed: seed of the sampler's ``torch.Generator``.
        num_steps, step_lr: sampler settings (default: the model's).
        formula_units: repeat the composition this many times per cell.
        max_atoms: refuse larger cells (``None``: no limit).
        batch_size: samples per network batch (the result depends on it through the noise order).
        text, props: the condition of a conditional crystal run (module docstring); neither: the null condition.
        guidance: classifier-free guidance scale ``s`` (default: the run's; acts only with a condition).

    Raises:
        ValueError: empty / unparsable composition, unknown element, too many atoms, a non-periodic template,
            a condition the model was not trained on (or any condition for a conformer model).

    Example:
        >>> from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion
        >>> toy = lambda z, f, l, t, b, n: (0.1 * l, torch.zeros_like(f))
        >>> model = CrystalDenoiser(toy, CrystalDiffusion(50), num_steps=10, lattice_clip=5.0)
        >>> out = generate(model, "SrTiO3", n=2, seed=0)
        >>> [a.get_chemical_formula() for a in out], bool(out[0].cell.volume > 0), out[1].info["sample"]
        (['O3SrTi', 'O3SrTi'], True, 1)
    """
    den = as_denoiser(model, cfg)
    if int(n) < 1:
        raise ValueError(f"`n` must be a positive number of samples, got {n}")
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if isinstance(den, MoleculeDenoiser):
        if text is not None or props or guidance is not None:
            raise ValueError("a conformer model takes no text / props / guidance: those condition crystal runs")
        return _generate_molecules(den, what, int(n), seed, num_steps, max_atoms)
    numbers, formula = _numbers_of(what, formula_units, max_atoms)
    from ase import Atoms

    cond1, asked = den.condition(1, text=text, props=props)
    sampler = den.sampler(num_steps=num_steps, step_lr=step_lr, guidance=guidance)
    info = {} if asked is None else _condition_info(asked, sampler.guidance)
    dev, dtype = den.device, den.dtype
    generator = torch.Generator(device=dev).manual_seed(int(seed))
    z1 = torch.tensor(numbers, dtype=torch.long)
    out: list = []
    for start in range(0, int(n), int(batch_size)):
        b = min(int(batch_size), int(n) - start)
        chunk = Batch.from_data_list([Data(z=z1, num_nodes=len(numbers)) for _ in range(b)])
        cond = None if cond1 is None else cond1.expand(b, -1)
        frac, cell = sampler.sample(chunk.z.to(dev), chunk.batch.to(dev), b, generator=generator, dtype=dtype, cond=cond)
        frac, cell = frac.detach().cpu().double().numpy(), cell.detach().cpu().double().numpy()
        if not (np.isfinite(frac).all() and np.isfinite(cell).all()):
            raise FloatingPointError("the sampler produced non-finite coordinates or cells")
        for i in range(b):
            f, c = right_handed(frac[i * len(numbers):(i + 1) * len(numbers)], cell[i])
            atoms = Atoms(numbers=numbers, cell=c, scaled_positions=f, pbc=True)
            atoms.info.update({"composition": formula, "seed": int(seed), "sample": start + i,
                               "num_steps": sampler.num_steps, **info})
            out.append(atoms)
    return out


def _condition_info(asked: dict, guidance: float) -> dict:
    """``atoms.info`` entries of a condition (plain strings / floats, so extxyz and traj keep them)."""
    info: dict = {"guidance": float(guidance)}
    if "text" in asked:
        info["text"] = str(asked["text"])
    if "props" in asked:
        info["props"] = ",".join(f"{k}={v:g}" for k, v in asked["props"].items())
    return info


def _generate_molecules(den: MoleculeDenoiser, what: Any, n: int, seed: int, num_steps: Optional[int],
                        max_atoms: Optional[int]) -> list:
    from orbit_pyg.integrations.molecule import data_to_atoms
    from orbit_pyg.integrations.molecule.sampling import sample_conformers

    graph = den.graph(what)
    if max_atoms is not None and graph.num_nodes > max_atoms:
        raise ValueError(f"the molecule has {graph.num_nodes} atoms (hydrogens included), more than max_atoms={max_atoms}")
    steps = int(num_steps or den.num_steps)
    generator = torch.Generator(device=next(den.model.parameters()).device).manual_seed(int(seed))
    pos = sample_conformers(den.model, graph, n, steps=steps, generator=generator, sampler=den.sampler_kind)
    if not torch.isfinite(pos).all():
        raise FloatingPointError("the sampler produced non-finite positions")
    out = []
    for i in range(n):
        atoms = data_to_atoms(graph, pos[i])
        atoms.info.update({"seed": int(seed), "sample": i, "num_steps": steps})
        out.append(atoms)
    return out


def write_structures(images: Sequence[Any], path: str, format: Optional[str] = None, **kwargs: Any) -> str:
    r"""Write structures with ``ase.io.write`` (format from ``format`` or the file name: ``.cif``,
    ``.extxyz``, ``.traj``, ...), atomically (a crash never leaves half a file). Returns ``path``.

    Example:
        >>> from ase.build import bulk
        >>> import ase.io
        >>> _ = write_structures([bulk("Cu"), bulk("Al")], "two.extxyz")
        >>> [a.get_chemical_formula() for a in ase.io.read("two.extxyz", index=":")]
        ['Cu', 'Al']
    """
    from ase.io import write
    from ase.io.formats import filetype, ioformats

    from orbit_pyg.io import atomic_open

    images = list(images)
    if not images:
        raise ValueError("nothing to write: the list of structures is empty")
    fmt = format or filetype(path, read=False)
    if fmt not in ioformats:
        raise ValueError(f"unknown ASE format {fmt!r} for {path!r}")
    io = ioformats[fmt]
    if len(images) > 1 and io.single:
        raise ValueError(f"format {fmt!r} holds one structure per file; write {len(images)} files or use extxyz / cif / traj")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb" if io.isbinary else "w") as fh:
        write(fh, images, format=fmt, **kwargs)
    return path
