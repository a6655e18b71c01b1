"""Molecule door in one page: train a conformer model on a QM9 subset with Orbit Diffusion
(rotations × graph automorphisms), sample conformers of held-out molecules and of a new SMILES,
write SDF / XYZ, and compare with RDKit ETKDG.

    python examples/qm9_conformers.py            # ~1-2 minutes on one CPU core
    python examples/qm9_conformers.py --steps 3000 --max-molecules 3000
"""
from __future__ import annotations

import argparse
import os

import torch

from orbit_pyg.integrations.molecule import (
    ConformerConfig, QM9Conformers, etkdg_conformers, evaluate_conformers, load_model, sample_conformers,
    sample_many, smiles_to_data, split_indices, train_conformer_model, write_sdf, write_xyz,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-molecules", type=int, default=600)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--objective", choices=["diffusion", "flow"], default="flow")
    p.add_argument("--mode", choices=["plain", "augment", "orbit"], default="orbit")
    p.add_argument("--out", default="outputs/example_qm9")
    args = p.parse_args()
    torch.set_num_threads(1)

    # QM9 from qm9pack's data files: graphs with DFT positions and 50 automorphisms each
    ds = QM9Conformers(os.path.join(args.out, "data"), max_molecules=args.max_molecules, automorphisms=50)
    print(ds, "skipped:", ds.skip_reasons)
    split = split_indices(len(ds), n_test=20, seed=0)
    train, test = [ds[int(i)] for i in split.train], [ds[int(i)] for i in split.test]

    # the only line that changes between plain / augment / orbit training is `mode`
    cfg = ConformerConfig(objective=args.objective, mode=args.mode, model="transformer", steps=args.steps,
                          rotations=200, automorphisms=50, hidden=64, layers=3, sample_steps=50)
    run = os.path.join(args.out, "run")
    train_conformer_model(train, cfg, out_dir=run, progress=True)

    model = load_model(run)  # config + EMA weights
    confs = sample_many(model, test, [2] * len(test), generator=torch.Generator().manual_seed(0))
    ours = evaluate_conformers(test, confs)
    base = evaluate_conformers(test, [etkdg_conformers(d, 2) for d in test])
    for name, ev in (("model", ours), ("ETKDG", base)):
        print(f"{name:6s} COV-R {100 * ev['cov_r']:5.1f} %  AMR-R {ev['amr_r']:.3f} A  "
              f"COV-P {100 * ev['cov_p']:5.1f} %  AMR-P {ev['amr_p']:.3f} A")

    # any new molecule: SMILES -> graph -> conformers -> SDF / XYZ
    graph = smiles_to_data("CC(=O)Nc1ccc(O)cc1")
    pos = sample_conformers(model, graph, num_samples=4, generator=torch.Generator().manual_seed(0))
    write_sdf(os.path.join(args.out, "paracetamol.sdf"), graph, pos)
    write_xyz(os.path.join(args.out, "paracetamol.xyz"), graph, pos)
    print("wrote", os.path.join(args.out, "paracetamol.sdf"))


if __name__ == "__main__":
    main()
