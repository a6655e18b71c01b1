"""Small real molecules for the examples: ASE's G2 set (experimental geometries) as PyG ``Data``."""
from __future__ import annotations

import torch
from torch_geometric.data import Data


def load_g2(min_atoms: int = 4) -> list[Data]:
    """G2 molecules with at least ``min_atoms`` atoms (``z``, ``pos`` in Å, ``name``), sorted by name."""
    from ase.collections import g2

    out = []
    for name in sorted(g2.names):
        atoms = g2[name]
        if len(atoms) < min_atoms:
            continue
        out.append(Data(z=torch.tensor(atoms.numbers, dtype=torch.long),
                        pos=torch.tensor(atoms.positions, dtype=torch.float32), name=name))
    return out


def split(data: list, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Fixed seeded train / validation split."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(data) * val_fraction))
    return [data[i] for i in perm[n_val:]], [data[i] for i in perm[:n_val]]
