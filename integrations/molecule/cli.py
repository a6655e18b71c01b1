"""``orbit-pyg molecule train | sample | evaluate``: conformer generation on QM9.

Registered in the ``orbit-pyg`` parser by ``add_parser(doors)``. Settings come from flags or a YAML / JSON file (``--config``;
flags override the file).

Example::

    orbit-pyg molecule train --out runs/qm9 --max-molecules 2000 --mode orbit --steps 2000
    orbit-pyg molecule sample --run runs/qm9 --limit 50            # held-out QM9 molecules
    orbit-pyg molecule sample --run runs/qm9 --smiles CCO c1ccccc1O --num-samples 8
    orbit-pyg molecule evaluate --run runs/qm9 --etkdg
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "orbit_pyg", "qm9")
DATA_DEFAULTS = {"source": None, "root": DEFAULT_ROOT, "max_molecules": 5000, "n_test": 100, "split_seed": 0,
                 "automorphisms": 50, "hydrogens": "permute"}
TRAIN_KEYS = ("objective", "mode", "model", "hidden", "layers", "heads", "rotations", "reflections", "automorphisms",
              "hydrogens", "proposal", "flow_noise", "steps", "batch_size", "lr", "seed", "sample_steps", "sampler")


def _add_data_args(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    d = (lambda key: None) if inherit else DATA_DEFAULTS.get
    p.add_argument("--source", default=None, help="QM9 CSV / folder / URL (default: the qm9pack data files)")
    p.add_argument("--root", default=d("root"), help="processed-cache folder")
    p.add_argument("--max-molecules", dest="max_molecules", type=int, default=d("max_molecules"),
                   help="seeded random subset of QM9 (default 5000; 0 = all)")
    p.add_argument("--n-test", dest="n_test", type=int, default=d("n_test"), help="held-out molecules")
    p.add_argument("--split-seed", dest="split_seed", type=int, default=d("split_seed"))
    p.add_argument("--quiet", action="store_true")


def _restore(args) -> None:
    saved = {}
    path = os.path.join(args.run, "data.json")
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
    for key, default in DATA_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, saved.get(key, default))


def _dataset(args):
    from .data import QM9Conformers, split_indices

    ds = QM9Conformers(args.root, source=args.source, max_molecules=args.max_molecules or None, seed=args.split_seed,
                       automorphisms=args.automorphisms, hydrogens=args.hydrogens, progress=not args.quiet)
    if ds.num_skipped:
        print(f"skipped {ds.num_skipped} of {ds.num_rows} molecules ({ds.skip_reasons})", file=sys.stderr)
    return ds, split_indices(len(ds), n_test=args.n_test, seed=args.split_seed)


def _train(args) -> int:
    from orbit_pyg.integrations.cli import _load_config_file
    from orbit_pyg.io import atomic_write_json

    from .objectives import ConformerConfig, train_conformer_model

    values = _load_config_file(args.config)
    for key in TRAIN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    cfg = ConformerConfig.from_dict(values)
    args.automorphisms, args.hydrogens = cfg.automorphisms, cfg.hydrogens
    ds, split = _dataset(args)
    train = [ds[int(i)] for i in split.train]
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "data.json"), {k: getattr(args, k) for k in DATA_DEFAULTS})
    print(f"training {cfg.objective}/{cfg.mode} ({cfg.model}) on {len(train)} molecules for {cfg.steps} steps -> {args.out}")
    _, history = train_conformer_model(train, cfg, out_dir=args.out, progress=not args.quiet)
    if history:
        print(f"final loss {history[-1]['loss']:.4f}")
    return 0


def _sample(args) -> int:
    import torch

    from orbit_pyg.io import atomic_save

    from .convert import smiles_to_data
    from .objectives import load_model
    from .sampling import sample_many, write_sdf, write_xyz

    model = load_model(args.run)
    out = args.out or os.path.join(args.run, "samples")
    os.makedirs(out, exist_ok=True)
    if args.smiles:
        graphs, indices = [smiles_to_data(s) for s in args.smiles], None
        counts = [args.num_samples or 2] * len(graphs)
    else:
        _restore(args)
        ds, split = _dataset(args)
        indices = split.test[: args.limit].tolist()
        graphs = [ds[i] for i in indices]
        counts = [args.num_samples or 2 for _ in graphs]  # protocol: 2x the (single) DFT reference
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    confs = sample_many(model, graphs, counts, steps=args.num_steps, sampler=args.sampler, generator=gen)
    seconds = time.perf_counter() - start
    for i, (g, c) in enumerate(zip(graphs, confs)):
        write_sdf(os.path.join(out, f"mol_{i:04d}.sdf"), g, c)
        write_xyz(os.path.join(out, f"mol_{i:04d}.xyz"), g, c)
    atomic_save({"conformers": confs, "indices": indices, "smiles": [g.smiles for g in graphs],
                 "seconds_per_conformer": seconds / max(1, sum(counts))}, os.path.join(out, "samples.pt"))
    print(f"wrote {sum(counts)} conformers of {len(graphs)} molecules to {out} ({seconds / max(1, sum(counts)):.3f} s each)")
    return 0


def _evaluate(args) -> int:
    import torch

    from orbit_pyg.io import atomic_write_json

    from .metrics import etkdg_conformers, evaluate_conformers

    _restore(args)
    folder = args.samples or os.path.join(args.run, "samples")
    saved = torch.load(os.path.join(folder, "samples.pt"), weights_only=False)
    if saved["indices"] is None:
        raise SystemExit("these samples are for --smiles molecules: there is no DFT reference to evaluate against")
    ds, _ = _dataset(args)
    refs = [ds[i] for i in saved["indices"]]
    result = {"model": _summary(evaluate_conformers(refs, saved["conformers"], delta=args.delta))}
    if args.etkdg:
        confs = [etkdg_conformers(d, c.size(0), seed=args.seed, mmff=args.mmff) for d, c in zip(refs, saved["conformers"])]
        result["etkdg"] = _summary(evaluate_conformers(refs, confs, delta=args.delta))
    atomic_write_json(os.path.join(folder, "metrics.json"), result, indent=1)
    print(json.dumps(result))
    return 0


def _summary(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "per_molecule"}


def add_parser(doors) -> argparse.ArgumentParser:
    """Add ``molecule train | sample | evaluate`` to the ``orbit-pyg`` subparsers ``doors``."""
    mol = doors.add_parser("molecule", help="conformer generation on QM9 (RDKit / ASE molecules)")
    cmds = mol.add_subparsers(dest="command", required=True)

    train = cmds.add_parser("train", help="train a conformer model on QM9")
    _add_data_args(train)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--config", help="YAML / JSON file of ConformerConfig settings")
    train.add_argument("--objective", choices=["diffusion", "flow"])
    train.add_argument("--mode", choices=["plain", "augment", "orbit"])
    train.add_argument("--model", choices=["transformer", "egnn"])
    for flag, typ in (("hidden", int), ("layers", int), ("heads", int), ("rotations", int), ("automorphisms", int),
                      ("steps", int), ("batch-size", int), ("lr", float), ("seed", int), ("sample-steps", int),
                      ("flow-noise", float)):
        train.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=typ)
    train.add_argument("--reflections", action="store_true", default=None, help="O(3) instead of SO(3)")
    train.add_argument("--hydrogens", choices=["permute", "follow"])
    train.add_argument("--proposal", choices=["uniform", "guided", "exact"],
                       help="rotation proposal of the orbit target; 'exact' integrates rotations in closed form")
    train.add_argument("--sampler", choices=["ode", "sde"])
    train.set_defaults(func=_train)

    sample = cmds.add_parser("sample", help="generate conformers (held-out QM9 molecules or --smiles)")
    _add_data_args(sample, inherit=True)
    sample.add_argument("--run", required=True)
    sample.add_argument("--out", help="samples folder (default RUN/samples)")
    sample.add_argument("--smiles", nargs="+", help="molecules to sample instead of the held-out set")
    sample.add_argument("--num-samples", dest="num_samples", type=int, help="conformers per molecule (default 2)")
    sample.add_argument("--num-steps", dest="num_steps", type=int, help="sampler steps (default: the run's)")
    sample.add_argument("--sampler", choices=["ode", "sde"])
    sample.add_argument("--limit", type=int, default=None, help="only the first LIMIT held-out molecules")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample, automorphisms=None, hydrogens=None)

    ev = cmds.add_parser("evaluate", help="COV-R / AMR-R / COV-P / AMR-P against the DFT geometries")
    _add_data_args(ev, inherit=True)
    ev.add_argument("--run", required=True)
    ev.add_argument("--samples", help="samples folder (default RUN/samples)")
    ev.add_argument("--delta", type=float, default=0.5, help="coverage threshold in Å (QM9: 0.5)")
    ev.add_argument("--etkdg", action="store_true", help="also evaluate RDKit ETKDG on the same molecules")
    ev.add_argument("--mmff", action="store_true", help="MMFF-relax the ETKDG conformers")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_evaluate, automorphisms=None, hydrogens=None)
    return mol


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m orbit_pyg.integrations.molecule.cli train ...``)."""
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
