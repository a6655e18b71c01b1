"""The ``orbit-pyg`` command line.

``orbit-pyg crystal train | sample | evaluate`` — crystal structure prediction on a CDVAE-format
CSV (Perov-5, MP-20, ...), with defaults that work and every setting available as a flag or in a
YAML / JSON file (``--config``; flags override the file).

Example::

    orbit-pyg crystal train --data ../shared/data/perov_5/val.csv --out runs/perov --steps 2000
    orbit-pyg crystal sample --run runs/perov --num-steps 200
    orbit-pyg crystal evaluate --run runs/perov
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from orbit_pyg.io import atomic_save, atomic_write_json

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "orbit_pyg", "crystal")


def _load_config_file(path: Optional[str]) -> dict:
    if not path:
        return {}
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise SystemExit("reading YAML needs PyYAML (pip install pyyaml) or use a .json config") from err
        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: the configuration must be a mapping of CSP settings")
    return values


def _dataset(args):
    from .crystal import CDVAEDataset, split_indices

    ds = CDVAEDataset(args.root, name=args.name, split=args.split, source=args.data, progress=not args.quiet)
    if ds.num_skipped:
        print(f"skipped {ds.num_skipped} structures while loading ({ds.skip_reasons})", file=sys.stderr)
    split = split_indices(len(ds), n_test=args.n_test, seed=args.split_seed)
    return ds, split


DATA_DEFAULTS = {"data": None, "name": "perov_5", "split": "val", "root": DEFAULT_ROOT, "n_test": 500, "split_seed": 0}


def _add_data_args(p: argparse.ArgumentParser, inherit: bool = False) -> None:
    """Dataset flags; with ``inherit`` unset flags come from the run's ``data.json``, then the defaults."""
    d = (lambda key: None) if inherit else DATA_DEFAULTS.get
    p.add_argument("--data", default=None, help="local CSV / folder, or URL (default: CDVAE's canonical URL)")
    p.add_argument("--name", default=d("name"), help="dataset name (cache key and URL part; default perov_5)")
    p.add_argument("--split", default=d("split"), help="which CDVAE CSV (train / val / test; default val)")
    p.add_argument("--root", default=d("root"), help="processed-cache folder")
    p.add_argument("--n-test", dest="n_test", type=int, default=d("n_test"), help="held-out structures (seeded split)")
    p.add_argument("--split-seed", dest="split_seed", type=int, default=d("split_seed"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _train(args) -> int:
    from .crystal.csp import CSPConfig, train_csp

    values = _load_config_file(args.config)
    for key in ("mode", "steps", "batch_size", "lr", "hidden", "layers", "translations", "proposal", "seed",
                "lattice_orbit", "species", "sample_steps", "step_lr"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    cfg = CSPConfig.from_dict(values)
    ds, split = _dataset(args)
    train = [ds[int(i)] for i in split.train]
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "data.json"), {"data": args.data, "name": args.name, "split": args.split,
                                                      "root": args.root, "n_test": args.n_test, "split_seed": args.split_seed})
    print(f"training {cfg.mode} on {len(train)} crystals for {cfg.steps} steps -> {args.out}")
    _, history = train_csp(train, cfg, out_dir=args.out, progress=not args.quiet)
    if history:
        print(f"final loss {history[-1]['loss']:.4f}")
    return 0


def _sample(args) -> int:
    from .crystal import write_csp_results
    from .crystal.csp import generate, load_model

    model, cfg = load_model(args.run)
    _restore_data_args(args)
    ds, split = _dataset(args)
    refs = [ds[int(i)] for i in split.test[: args.limit]]
    print(f"sampling {len(refs)} crystals with {args.num_steps or cfg.sample_steps} steps")
    generated = generate(model, refs, cfg, seed=args.seed, num_steps=args.num_steps, step_lr=args.step_lr)
    out = args.out or os.path.join(args.run, "samples")
    os.makedirs(out, exist_ok=True)
    atomic_save({"generated": generated, "reference_indices": split.test[: args.limit].tolist()},
                os.path.join(out, "samples.pt"))
    write_csp_results(out, generated, None, names=[str(getattr(r, "material_id", i)) for i, r in enumerate(refs)])
    print(f"wrote {len(generated)} CIFs to {out}")
    return 0


def _evaluate(args) -> int:
    import torch

    from .crystal import write_csp_results
    from .crystal.csp import evaluate

    _restore_data_args(args)
    folder = args.samples or os.path.join(args.run, "samples")
    saved = torch.load(os.path.join(folder, "samples.pt"), weights_only=False)
    ds, _ = _dataset(args)
    refs = [ds[i] for i in saved["reference_indices"]]
    metrics = evaluate(saved["generated"], refs, workers=args.workers)
    write_csp_results(folder, saved["generated"], metrics,
                      names=[str(getattr(r, "material_id", i)) for i, r in enumerate(refs)])
    keys = ("match_rate", "rmse", "metre", "crmse", "valid_generated")
    print(json.dumps({k: metrics.get(k) for k in keys}))
    return 0


def _restore_data_args(args) -> None:
    """Fill unset dataset flags from ``RUN/data.json`` (what the model was trained on), then defaults."""
    path = os.path.join(args.run, "data.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
    for key, default in DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orbit-pyg", description="Orbit Diffusion for PyTorch Geometric")
    doors = parser.add_subparsers(dest="door", required=True)
    crystal = doors.add_parser("crystal", help="crystal structure prediction (DiffCSP-style)")
    cmds = crystal.add_subparsers(dest="command", required=True)

    train = cmds.add_parser("train", help="train a CSP model")
    _add_data_args(train)
    train.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, config.json)")
    train.add_argument("--config", help="YAML / JSON file of CSPConfig settings")
    train.add_argument("--mode", choices=["plain", "augment", "orbit"])
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--hidden", type=int)
    train.add_argument("--layers", type=int)
    train.add_argument("--translations", type=int, help="K torus candidates")
    train.add_argument("--proposal", choices=["uniform", "wrapped_normal", "guided"])
    train.add_argument("--lattice-orbit", dest="lattice_orbit", choices=["perm", "signed"])
    train.add_argument("--species", type=int, help="species-permutation candidates (0 = off)")
    train.add_argument("--sample-steps", dest="sample_steps", type=int)
    train.add_argument("--step-lr", dest="step_lr", type=float)
    train.add_argument("--seed", type=int)
    train.set_defaults(func=_train)

    sample = cmds.add_parser("sample", help="generate one structure per held-out composition")
    _add_data_args(sample, inherit=True)
    sample.add_argument("--run", required=True)
    sample.add_argument("--out", help="samples folder (default RUN/samples)")
    sample.add_argument("--num-steps", type=int, help="sampler steps (default: the run's sample_steps)")
    sample.add_argument("--step-lr", type=float)
    sample.add_argument("--limit", type=int, default=None, help="only the first LIMIT held-out structures")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample)

    ev = cmds.add_parser("evaluate", help="match rate, RMSE, validity, METRe, cRMSE of the samples")
    _add_data_args(ev, inherit=True)
    ev.add_argument("--run", required=True)
    ev.add_argument("--samples", help="samples folder (default RUN/samples)")
    ev.add_argument("--workers", type=int, default=1)
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
