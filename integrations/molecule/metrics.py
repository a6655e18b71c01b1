r"""Conformer metrics (ET-Flow / GEOM protocol) and the RDKit ETKDG baseline.

**RMSD.** Heavy atoms only, symmetry-aware and alignment-optimal:
``RMSD(C, C') = min_{π ∈ Aut, R, t} sqrt(mean_i |C_i - (R C'_{π(i)} + t)|²)``, computed by
:func:`rdkit.Chem.rdMolAlign.GetBestRMS` on the hydrogen-free molecules.

**Coverage.** For one molecule with references ``{C_r}`` (here: its DFT geometry) and generated
conformers ``{Ĉ_g}`` (``2×`` as many as references by the protocol), with ``D_rg = RMSD(C_r, Ĉ_g)``:

* recall: ``COV-R = mean_r 1[min_g D_rg < δ]``, ``AMR-R = mean_r min_g D_rg``;
* precision: ``COV-P = mean_g 1[min_r D_rg < δ]``, ``AMR-P = mean_g min_r D_rg``;

``δ = 0.5 Å`` for QM9. Dataset values are the mean (and median) over molecules. With a single
reference per molecule, COV-P is the fraction of generated conformers within ``δ`` of the DFT
geometry and AMR-P their mean RMSD to it.
"""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from .convert import data_to_mol

__all__ = ["best_rms", "rmsd_matrix", "coverage_metrics", "evaluate_conformers", "etkdg_conformers",
           "summarize", "DELTA_QM9"]

#: the coverage threshold for QM9 (Å)
DELTA_QM9 = 0.5


def _heavy(mol):
    from rdkit import Chem

    return Chem.RemoveHs(mol, sanitize=False)


def best_rms(probe, reference, probe_id: int = -1, ref_id: int = -1, heavy_only: bool = True) -> float:
    """Symmetry-aware optimal-alignment RMSD (Å) between two conformers of the same molecule.

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_mol
        >>> from rdkit.Chem import AllChem
        >>> m = smiles_to_mol("CCO"); _ = AllChem.EmbedMolecule(m, randomSeed=0)
        >>> round(best_rms(m, m), 6)
        0.0
    """
    from rdkit.Chem import rdMolAlign

    from rdkit import Chem

    prb = _heavy(probe) if heavy_only else Chem.Mol(probe)
    ref = _heavy(reference) if heavy_only else Chem.Mol(reference)
    return float(rdMolAlign.GetBestRMS(prb, ref, prbId=probe_id, refId=ref_id))


def rmsd_matrix(data: Data, references: Tensor, generated: Tensor, heavy_only: bool = True) -> np.ndarray:
    """``D [R, G]``: RMSD between every reference ``[R, N, 3]`` and generated ``[G, N, 3]`` conformer of ``data``."""
    from rdkit.Chem import rdMolAlign

    references, generated = torch.as_tensor(references), torch.as_tensor(generated)
    if references.dim() == 2:
        references = references.unsqueeze(0)
    ref_mol = data_to_mol(data, pos=references)
    gen_mol = data_to_mol(data, pos=generated)
    if heavy_only:
        ref_mol, gen_mol = _heavy(ref_mol), _heavy(gen_mol)
    out = np.zeros((references.size(0), generated.size(0)))
    for r in range(references.size(0)):
        for g in range(generated.size(0)):
            out[r, g] = rdMolAlign.GetBestRMS(gen_mol, ref_mol, prbId=g, refId=r)
    return out


def coverage_metrics(rmsd: np.ndarray, delta: float = DELTA_QM9) -> dict[str, float]:
    """COV-R, AMR-R, COV-P, AMR-P of one molecule from its ``[R, G]`` RMSD matrix (see module docstring).

    Example:
        >>> d = np.array([[0.2, 0.9], [0.7, 0.6]])
        >>> {k: round(v, 3) for k, v in coverage_metrics(d).items()}
        {'cov_r': 0.5, 'amr_r': 0.4, 'cov_p': 0.5, 'amr_p': 0.4}
    """
    rmsd = np.asarray(rmsd, dtype=float)
    if rmsd.ndim != 2 or 0 in rmsd.shape:
        raise ValueError(f"`rmsd` must be a non-empty [R, G] matrix, got shape {rmsd.shape}")
    min_r, min_g = rmsd.min(axis=1), rmsd.min(axis=0)
    return {"cov_r": float((min_r < delta).mean()), "amr_r": float(min_r.mean()),
            "cov_p": float((min_g < delta).mean()), "amr_p": float(min_g.mean())}


def summarize(per_molecule: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean and median over molecules of every metric (``cov_r``, ``cov_r_median``, ...)."""
    if not per_molecule:
        return {}
    out = {}
    for key in per_molecule[0]:
        values = [m[key] for m in per_molecule]
        out[key] = float(np.mean(values))
        out[key + "_median"] = float(statistics.median(values))
    return out


def evaluate_conformers(data_list: Sequence[Data], generated: Sequence[Tensor], references: Optional[Sequence[Tensor]] = None,
                        delta: float = DELTA_QM9) -> dict:
    """Coverage metrics over a set of molecules.

    Args:
        data_list: the molecular graphs; references default to each graph's ``pos`` (one DFT geometry).
        generated: per molecule ``[G_i, N_i, 3]``.

    Returns:
        ``{"per_molecule": [...], **summarize(...), "rmsd_mean": mean RMSD of every generated
        conformer to its closest reference, "num_molecules": M}``.
    """
    if len(generated) != len(data_list):
        raise ValueError(f"{len(data_list)} molecules but {len(generated)} generated sets")
    per_mol, all_rmsd = [], []
    for i, (data, gen) in enumerate(zip(data_list, generated)):
        ref = data.pos if references is None else references[i]
        d = rmsd_matrix(data, ref, gen)
        per_mol.append(coverage_metrics(d, delta))
        all_rmsd.extend(d.min(axis=0).tolist())
    out = summarize(per_mol)
    out.update({"rmsd_mean": float(np.mean(all_rmsd)), "num_molecules": len(per_mol), "per_molecule": per_mol})
    return out


def etkdg_conformers(data: Data, num_confs: int, seed: int = 0, mmff: bool = False) -> Tensor:
    """RDKit ETKDG (v3) conformers ``[S, N, 3]`` of a molecular graph (atom order kept), optionally MMFF-relaxed.

    The molecule is rebuilt from the graph alone (no stereo tags, as for the learned models).
    Failed embeddings are dropped, so ``S <= num_confs``. ``seed`` must be ``>= 0``.

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> etkdg_conformers(smiles_to_data("CCO"), 3).shape
        torch.Size([3, 9, 3])
    """
    from rdkit.Chem import AllChem

    mol = data_to_mol(data, pos=None)
    mol.RemoveAllConformers()
    params = AllChem.ETKDGv3()
    # RDKit returns identical conformers for randomSeed = 0 (it means "seeded with 0" for every
    # conformer in this RDKit version), so the seed is shifted to be >= 1.
    params.randomSeed = int(seed) + 1
    params.numThreads = 1
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=int(num_confs), params=params))
    if mmff and ids:
        AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1)
    if not ids:
        return torch.empty(0, data.num_nodes, 3)
    return torch.tensor(np.stack([mol.GetConformer(i).GetPositions() for i in ids]), dtype=torch.float32)
