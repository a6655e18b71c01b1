"""The ``orbit-pyg`` command line.

``orbit-pyg crystal train | sample | evaluate`` — crystal structure prediction on a CDVAE-format
CSV (Perov-5, MP-20, ...), with defaults that work and every setting available as a flag or in a
YAML / JSON file (``--config``; flags override the file). The other doors register themselves from
their own packages: ``orbit-pyg molecule ...`` (QM9 conformers), ``orbit-pyg ase ...`` (candidate
``ase.Atoms``), ``orbit-pyg matbench ...`` (leaderboard submissions); ``orbit-pyg DOOR --help``.

Example::

    orbit-pyg crystal train --data ../shared/data/perov_5/val.csv --out runs/perov --steps 2000
    orbit-pyg crystal sample --run runs/perov --num-steps 200
    orbit-pyg crystal evaluate --run runs/perov

Conditional generation (text and / or Perov-5 properties, classifier-free guidance)::

    orbit-pyg crystal train --data ../shared/data/perov_5/val.csv --out runs/props --condition props
    orbit-pyg crystal sample --run runs/props --props heat_all=-0.5,dir_gap=2.0 --guidance 2
    orbit-pyg crystal sample --run runs/text --text "SrTiO3 crystallizes in the cubic Pm-3m space group (No. 221)."
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
                "lattice_orbit", "species", "sample_steps", "step_lr", "condition", "cond_text", "cond_props",
                "cond_drop_prob", "guidance"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    cfg = CSPConfig.from_dict(values)
    ds, split = _dataset(args)
    train = _train_conditions(cfg, [ds[int(i)] for i in split.train], args)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "data.json"), {"data": args.data, "name": args.name, "split": args.split,
                                                      "root": args.root, "n_test": args.n_test, "split_seed": args.split_seed})
    cond = "" if cfg.condition == "none" else f" conditioned on {cfg.condition}"
    print(f"training {cfg.mode}{cond} on {len(train)} crystals for {cfg.steps} steps -> {args.out}")
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
    cond, asked = _sample_conditions(cfg, refs, args)
    print(f"sampling {len(refs)} crystals with {args.num_steps or cfg.sample_steps} steps"
          + (f", condition: {asked}" if asked else ""))
    generated = generate(model, refs, cfg, seed=args.seed, num_steps=args.num_steps, step_lr=args.step_lr,
                         cond=cond, guidance=args.guidance)
    out = args.out or os.path.join(args.run, "samples")
    os.makedirs(out, exist_ok=True)
    atomic_save({"generated": generated, "reference_indices": split.test[: args.limit].tolist(), "condition": asked},
                os.path.join(out, "samples.pt"))
    write_csp_results(out, generated, None, names=[str(getattr(r, "material_id", i)) for i, r in enumerate(refs)])
    print(f"wrote {len(generated)} CIFs to {out}")
    return 0


def _text_cache(args) -> str:
    return os.path.join(args.root, "text", args.name)


def _train_conditions(cfg, train: list, args) -> list:
    """Attach ``cond`` to the training crystals (properties normalized with train-split statistics, kept in cfg)."""
    if cfg.condition == "none":
        return train
    from .crystal.condition import PropertyNormalizer, attach_conditions, condition_vectors, property_values

    text = props = normalizer = None
    if "props" in cfg.condition:
        props = property_values(train, cfg.cond_props)
        normalizer = PropertyNormalizer(cfg.cond_props).fit(props)
        cfg.cond_stats = normalizer.to_dict()
    if "text" in cfg.condition:
        from .crystal.text import dataset_text_embeddings

        text, _ = dataset_text_embeddings(train, cfg.cond_text, cache_dir=_text_cache(args), progress=not args.quiet)
    return attach_conditions(train, condition_vectors(cfg.condition, len(train), text=text, props=props,
                                                      normalizer=normalizer))


def _sample_conditions(cfg, refs: list, args):
    """``(cond [n, d] or None, description)``: ``--text`` / ``--props`` for every composition, else each reference's own
    (:func:`~.crystal.condition.sample_condition`)."""
    from .crystal.condition import sample_condition

    if args.unconditional:
        if args.text is not None or args.props:
            raise SystemExit("--unconditional samples with the null condition: drop --text / --props")
        return None, (None if cfg.condition == "none" else "null (unconditional)")
    try:
        return sample_condition(cfg, len(refs), text=args.text, props=args.props, references=refs,
                                cache_dir=_text_cache(args), progress=not args.quiet)
    except ValueError as err:
        raise SystemExit(f"{args.run}: {err}") from err


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
    train.add_argument("--proposal", choices=["uniform", "wrapped_normal", "guided", "exact"],
                       help="torus-translation proposal; exact = closed-form per-axis marginal (no K)")
    train.add_argument("--lattice-orbit", dest="lattice_orbit", choices=["perm", "signed"])
    train.add_argument("--species", type=int, help="species-permutation candidates (0 = off)")
    train.add_argument("--sample-steps", dest="sample_steps", type=int)
    train.add_argument("--step-lr", dest="step_lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--condition", choices=["none", "text", "props", "text+props"],
                       help="per-crystal condition (FiLM in every layer, classifier-free guidance)")
    train.add_argument("--text-kind", dest="cond_text", choices=["short", "long"],
                       help="short template or robocrys (slow, cached) descriptions")
    train.add_argument("--properties", dest="cond_props", nargs="+", help="property columns (default heat_all dir_gap)")
    train.add_argument("--cond-drop-prob", dest="cond_drop_prob", type=float, help="condition dropout (default 0.1)")
    train.add_argument("--guidance", type=float,
                       help="default guidance scale s stored in the run (default 1 = conditional; 0 = unconditioned)")
    train.set_defaults(func=_train)

    sample = cmds.add_parser("sample", help="generate one structure per held-out composition")
    _add_data_args(sample, inherit=True)
    sample.add_argument("--run", required=True)
    sample.add_argument("--out", help="samples folder (default RUN/samples)")
    sample.add_argument("--num-steps", type=int, help="sampler steps (default: the run's sample_steps)")
    sample.add_argument("--step-lr", type=float)
    sample.add_argument("--limit", type=int, default=None, help="only the first LIMIT held-out structures")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--text", help="one description for every composition (text-conditioned runs)")
    sample.add_argument("--props", nargs="+", help="target properties, e.g. heat_all=-0.5 dir_gap=2.0 (props runs)")
    sample.add_argument("--guidance", type=float, default=None,
                        help="guidance scale s: o(null) + s (o(c) - o(null)); 1 = conditional, 0 = unconditioned, "
                             ">1 = stronger (default: the run's, 1)")
    sample.add_argument("--unconditional", action="store_true", help="sample a conditional run with the null condition")
    sample.set_defaults(func=_sample)

    ev = cmds.add_parser("evaluate", help="match rate, RMSE, validity, METRe, cRMSE of the samples")
    _add_data_args(ev, inherit=True)
    ev.add_argument("--run", required=True)
    ev.add_argument("--samples", help="samples folder (default RUN/samples)")
    ev.add_argument("--workers", type=int, default=1)
    ev.set_defaults(func=_evaluate)

    for door in ("molecule", "ase", "matbench"):
        _add_door(doors, door)
    return parser


def _add_door(doors, door: str) -> None:
    """Register ``orbit-pyg DOOR ...`` from ``orbit_pyg.integrations.DOOR.cli``; a missing extra (named as
    the door, ``orbit-pyg[DOOR]``) becomes a clear message."""
    import importlib

    try:
        module = importlib.import_module(f"{__package__}.{door}.cli")
    except ImportError as err:
        missing = doors.add_parser(door, help=f"(needs: pip install 'orbit-pyg[{door}]')")
        missing.set_defaults(func=lambda args, err=err: _missing_extra(door, err))
        return
    module.add_parser(doors)


def _missing_extra(door: str, err: ImportError) -> int:
    raise SystemExit(f"orbit-pyg {door} needs the '{door}' extra: pip install 'orbit-pyg[{door}]' ({err})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
