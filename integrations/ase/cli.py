"""``orbit-pyg ase generate | trajectory``: candidate structures from a trained run, written with ``ase.io``.

Registered in the ``orbit-pyg`` parser by ``add_parser(doors)``::

    orbit-pyg ase generate --run runs/perov --composition SrTiO3 -n 8 --out srtio3.extxyz
    orbit-pyg ase generate --run runs/perov --template my.cif -n 4 --out new.cif
    orbit-pyg ase trajectory --run runs/perov --composition SrTiO3 --out srtio3.traj
    orbit-pyg ase generate --run runs/qm9 --smiles CCO -n 10 --out ethanol.extxyz      (a conformer run)
    orbit-pyg ase generate --run runs/props --composition SrTiO3 --props heat_all=-0.5,dir_gap=2 --guidance 2 --out c.extxyz

A conditional crystal run (``orbit-pyg crystal train --condition ...``) takes ``--text`` / ``--props`` as
``orbit-pyg crystal sample`` does, and ``--guidance s`` (1 = conditional, 0 = unconditioned, > 1 =
stronger; default the run's); with neither it samples its null condition (unconditioned).
"""
from __future__ import annotations

import argparse
import sys


def _load(args):
    from .models import load_denoiser

    model = load_denoiser(args.run)
    if model.kind == "crystal" and args.smiles is not None:
        raise SystemExit(f"{args.run} is a crystal model: give --composition or a periodic --template, not --smiles")
    if model.kind == "molecule" and args.composition is not None:
        raise SystemExit(f"{args.run} is a conformer model: give --smiles or a molecule --template, not --composition")
    if model.kind == "molecule" and (args.text is not None or args.props or args.guidance is not None):
        raise SystemExit(f"{args.run} is a conformer model: --text / --props / --guidance condition crystal runs only")
    return model


def _what(args):
    if args.template:
        import ase.io

        return ase.io.read(args.template)
    return args.smiles if args.smiles is not None else args.composition


def _generate(args) -> int:
    import numpy as np

    from .generate import generate, write_structures

    model = _load(args)
    extra = {} if model.kind == "molecule" else {"text": args.text, "props": args.props, "guidance": args.guidance}
    try:
        images = generate(model, _what(args), n=args.num, seed=args.seed, num_steps=args.num_steps,
                          step_lr=args.step_lr, formula_units=args.formula_units, max_atoms=args.max_atoms, **extra)
    except ValueError as err:
        raise SystemExit(f"{args.run}: {err}") from err
    write_structures(images, args.out)
    for atoms in images:
        if atoms.pbc.all():
            a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
            print(f"{atoms.info['sample']:4d} {atoms.get_chemical_formula():>12} V={atoms.get_volume():9.3f} "
                  f"a={a:.3f} b={b:.3f} c={c:.3f} alpha={alpha:.1f} beta={beta:.1f} gamma={gamma:.1f}")
        else:
            d = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
            print(f"{atoms.info['sample']:4d} {atoms.get_chemical_formula():>12} min distance {d.min() if d.size else 0:.3f} A")
    print(f"wrote {len(images)} structures to {args.out}")
    return 0


def _trajectory(args) -> int:
    import numpy as np
    from ase import Atoms

    from .dynamics import ReverseDiffusion
    from .generate import parse_composition

    model = _load(args)
    graph = None
    if args.template:
        atoms = _what(args)
    elif args.t_start < 1.0:
        raise SystemExit("--t-start below 1 refines a structure: give it with --template")
    elif args.smiles is not None:  # the geometry is replaced by the prior draw; only the graph matters
        graph = model.graph(args.smiles)
        atoms = Atoms(numbers=graph.z.tolist(), positions=np.zeros((graph.num_nodes, 3)))
    else:
        atoms = Atoms(numbers=parse_composition(args.composition, args.formula_units, args.max_atoms),
                      cell=np.eye(3), pbc=True)
    if model.kind == "molecule":
        extra = {"graph": graph} if graph is not None else {}
    else:
        extra = {"step_lr": args.step_lr, "text": args.text, "props": args.props, "guidance": args.guidance}
    try:
        dyn = ReverseDiffusion(atoms, model, num_steps=args.num_steps, t_start=args.t_start, **extra,
                               seed=args.seed, trajectory=args.out, logfile="-" if args.log else None,
                               loginterval=args.interval)
    except ValueError as err:
        raise SystemExit(f"{args.run}: {err}") from err
    with dyn:
        dyn.run()
    final = f"final volume {atoms.get_volume():.3f} A^3" if atoms.pbc.all() else "final conformer centred"
    print(f"wrote the reverse process of {atoms.get_chemical_formula()} ({dyn.nsteps} steps) to {args.out}; {final}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder of a trained model (config.json + last.pt)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--composition", help="chemical formula of the cell, e.g. SrTiO3")
    what.add_argument("--template", help="structure file read by ase.io: its atoms are kept, lattice and positions sampled")
    what.add_argument("--smiles", help="molecule (conformer runs): SMILES of the molecular graph")
    p.add_argument("--formula-units", dest="formula_units", type=int, default=1, help="formula units per cell")
    p.add_argument("--max-atoms", dest="max_atoms", type=int, default=64)
    p.add_argument("--num-steps", dest="num_steps", type=int, help="reverse steps (default: the run's sample_steps)")
    p.add_argument("--step-lr", dest="step_lr", type=float, help="corrector step scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="conditional crystal runs: one description for every structure")
    p.add_argument("--props", nargs="+", help="conditional crystal runs: target properties, e.g. heat_all=-0.5 dir_gap=2.0")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale s: o(null) + s (o(c) - o(null)); 1 = conditional, 0 = unconditioned, "
                        ">1 = stronger (default: the run's)")


def add_parser(doors) -> argparse.ArgumentParser:
    """Add ``ase generate`` and ``ase trajectory`` to the ``orbit-pyg`` subparsers ``doors``."""
    door = doors.add_parser("ase", help="candidate ase.Atoms from a trained model (extxyz / cif / traj)")
    cmds = door.add_subparsers(dest="command", required=True)
    gen = cmds.add_parser("generate", help="sample N structures of a composition and write them with ase.io")
    _common(gen)
    gen.add_argument("-n", "--num", type=int, default=8, help="number of structures")
    gen.add_argument("--out", required=True, help="output file; format from the extension (.extxyz, .cif, .traj)")
    gen.set_defaults(func=_generate)
    traj = cmds.add_parser("trajectory", help="one structure along the reverse process, every step in an ASE trajectory")
    _common(traj)
    traj.add_argument("--t-start", dest="t_start", type=float, default=1.0,
                      help="start noise level (<1 with --template: noise the template, then denoise it)")
    traj.add_argument("--interval", type=int, default=1, help="write every INTERVAL steps")
    traj.add_argument("--log", action="store_true", help="print a log line per step")
    traj.add_argument("--out", required=True, help="ASE trajectory file (.traj); read it with ase.io.read(path, index=':')")
    traj.set_defaults(func=_trajectory)
    return door


def main(argv=None) -> int:
    """Stand-alone entry: ``python -m orbit_pyg.integrations.ase.cli generate ...``."""
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    args = parser.parse_args(["ase", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
