"""ASE door: generate perovskite candidates with a trained crystal model, relax them with an ASE
calculator, rank them by energy, print a table and write the structures.

1. Model: trains a small CSPNet with Orbit Diffusion on Perov-5 (``../shared/data/perov_5/val.csv``
   when present, else CDVAE's download URL) for ``--steps`` steps and saves the run folder under
   ``--out/run``, or loads a run folder given with ``--run`` (e.g. one from ``orbit-pyg crystal train``).
2. Candidates: ``orbit_pyg.integrations.ase.generate`` draws ``-n`` structures per composition
   (``ase.Atoms``, seeded).
3. Relaxation: positions and cell with ``FIRE`` on a ``FrechetCellFilter``, with the calculator given
   by ``--calculator module:Class`` (default ``ase.calculators.emt:EMT``). EMT has parameters for
   Al, Cu, Ag, Au, Ni, Pd, Pt, H, C, N, O only, so the default compositions are Perov-5 formulas made
   of these; a composition the calculator cannot handle (``SrTiO3`` with EMT) is generated and written
   but not relaxed, with a message saying so. EMT is a toy potential for fcc metals: the ranking shows
   the workflow, not the chemistry; pass a real potential for real use.
4. Output: a table ranked by energy per atom, ``candidates.extxyz`` (as generated), ``relaxed.extxyz``
   (ranked, energies in ``atoms.info``) and one CIF per relaxed structure under ``--out/cif``.

Run: ``python examples/ase_workflow.py`` (a few minutes on 2 cores: most of it is training), or
``python examples/ase_workflow.py --run RUN_DIR`` to skip training, ``--quick`` for a smoke run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time

import numpy as np
import torch

from orbit_pyg.integrations.ase import generate, load_denoiser, write_structures

DEFAULT_COMPOSITIONS = "CuAuO3,NiPdO3,AuAlO3,PtPdN3,SrTiO3"


def perov5_source() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    local = os.path.join(os.path.dirname(here), "shared", "data", "perov_5", "val.csv")
    return local if os.path.exists(local) else None  # None: CDVAE's canonical URL


def train_model(args):
    """Train a small orbit CSP model on Perov-5 and save it as a run folder; returns the denoiser."""
    from orbit_pyg.integrations.crystal import CDVAEDataset
    from orbit_pyg.integrations.crystal.csp import CSPConfig, train_csp

    ds = CDVAEDataset(os.path.join(args.out, "data"), name="perov_5", split="val", source=args.data or perov5_source(),
                      progress=False)
    data = [ds[i] for i in range(len(ds))]
    size = dict(hidden=32, layers=1) if args.quick else dict(hidden=128, layers=3)
    cfg = CSPConfig(**size, n_freq=16, steps=args.steps, batch_size=128, translations=args.translations,
                    mode="orbit", sample_steps=args.sample_steps, seed=args.seed)
    run = os.path.join(args.out, "run")
    print(f"training CSPNet {size['hidden']}x{size['layers']} (orbit, K={cfg.translations}) on {len(data)} Perov-5 "
          f"crystals for {cfg.steps} steps -> {run}")
    t0 = time.time()
    _, history = train_csp(data, cfg, out_dir=run)
    print(f"  final loss {history[-1]['loss']:.3f} ({time.time() - t0:.0f} s); reuse it with --run {run}")
    return load_denoiser(run)


def load_calculator(spec: str):
    """``module:Class`` -> the class (called once per structure to make a fresh calculator)."""
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--calculator must look like module:Class (e.g. ase.calculators.emt:EMT), got {spec!r}")
    return getattr(importlib.import_module(module), name)


def supported(make_calc, atoms) -> str | None:
    """``None`` when the calculator handles these elements, else the reason it does not."""
    from ase.calculators.emt import EMT, parameters

    if make_calc is EMT:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(parameters))
        return f"EMT has no parameters for {', '.join(missing)}" if missing else None
    try:
        probe = atoms.copy()
        probe.calc = make_calc()
        probe.get_potential_energy()
    except Exception as err:  # noqa: BLE001 - any failure means "cannot relax this one"
        return f"{type(err).__name__}: {err}"
    return None


def relax(atoms, make_calc, fmax: float, steps: int) -> dict:
    """FIRE on positions and cell (FrechetCellFilter); energies per atom before and after."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms.calc = make_calc()
    n = len(atoms)
    e0 = atoms.get_potential_energy() / n
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    converged = opt.run(fmax=fmax, steps=steps)
    return {"e_before": e0, "e_after": atoms.get_potential_energy() / n, "steps": opt.nsteps, "converged": converged}


def min_distance(atoms) -> float:
    """Shortest interatomic distance (Å, minimum image); DiffCSP counts a crystal valid above 0.5 Å."""
    d = atoms.get_all_distances(mic=True)
    return float(d[np.triu_indices(len(atoms), 1)].min()) if len(atoms) > 1 else float("inf")


def spacegroup(atoms) -> str:
    try:
        from pymatgen.io.ase import AseAtomsAdaptor
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        return SpacegroupAnalyzer(AseAtomsAdaptor.get_structure(atoms), symprec=0.1).get_space_group_symbol()
    except Exception:  # noqa: BLE001 - a degenerate candidate has no symmetry analysis
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run folder of a trained crystal model (skips training)")
    p.add_argument("--data", help="Perov-5 CSV (default ../shared/data/perov_5/val.csv, else CDVAE's URL)")
    p.add_argument("--out", default=os.path.join("outputs", "ase_workflow"))
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--translations", type=int, default=256, help="K torus translations of the orbit target")
    p.add_argument("--compositions", default=DEFAULT_COMPOSITIONS, help="comma-separated formulas")
    p.add_argument("-n", "--num", type=int, default=4, help="candidates per composition")
    p.add_argument("--sample-steps", type=int, default=100, help="reverse-process steps")
    p.add_argument("--calculator", default="ase.calculators.emt:EMT", help="module:Class of an ASE calculator")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--relax-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    args = p.parse_args()
    if args.quick:
        args.steps, args.sample_steps, args.num, args.relax_steps = 20, 10, 2, 30
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.out, exist_ok=True)

    model = load_denoiser(args.run, num_steps=args.sample_steps) if args.run else train_model(args)
    make_calc = load_calculator(args.calculator)
    rows, candidates, relaxed = [], [], []
    t0 = time.time()
    for comp in [c.strip() for c in args.compositions.split(",") if c.strip()]:
        images = generate(model, comp, n=args.num, seed=args.seed)
        candidates += [a.copy() for a in images]
        reason = supported(make_calc, images[0])
        if reason:
            print(f"{comp}: not relaxed ({reason}); its {len(images)} candidates are written unrelaxed. "
                  "Pass --calculator module:Class for a calculator that covers these elements.")
            continue
        for atoms in images:
            v0, d0 = atoms.get_volume() / len(atoms), min_distance(atoms)
            try:
                r = relax(atoms, make_calc, args.fmax, args.relax_steps)
            except Exception as err:  # noqa: BLE001 - a pathological candidate must not stop the ranking
                print(f"{comp} #{atoms.info['sample']}: relaxation failed ({type(err).__name__}: {err})")
                continue
            if not np.isfinite(r["e_after"]):
                continue
            atoms.info.update({"energy_per_atom": r["e_after"], "energy_per_atom_unrelaxed": r["e_before"],
                               "relax_steps": r["steps"], "relax_converged": bool(r["converged"])})
            atoms.calc = None
            relaxed.append(atoms)
            rows.append({"composition": comp, "sample": atoms.info["sample"], **r, "v_before": v0, "d_before": d0,
                         "v_after": atoms.get_volume() / len(atoms), "d_after": min_distance(atoms),
                         "spacegroup": spacegroup(atoms)})
    print(f"generated {len(candidates)} candidates and relaxed {len(relaxed)} in {time.time() - t0:.0f} s "
          f"({args.calculator}, fmax {args.fmax} eV/A, at most {args.relax_steps} FIRE steps)")

    order = np.argsort([r["e_after"] for r in rows], kind="stable")
    print("\nenergies in eV/atom, volumes in A^3/atom, dmin = shortest interatomic distance in A; "
          "'gen.' = as generated, before relaxation")
    print(f"{'rank':>4} {'composition':>11} {'#':>2} {'E relaxed':>10} {'E gen.':>10} {'V':>6} {'V gen.':>6} "
          f"{'dmin':>5} {'dmin gen.':>9} {'steps':>5} {'conv':>4}  spacegroup")
    for rank, i in enumerate(order, 1):
        r = rows[i]
        print(f"{rank:4d} {r['composition']:>11} {r['sample']:2d} {r['e_after']:10.4f} {r['e_before']:10.3f} "
              f"{r['v_after']:6.2f} {r['v_before']:6.2f} {r['d_after']:5.2f} {r['d_before']:9.2f} {r['steps']:5d} "
              f"{'yes' if r['converged'] else 'no':>4}  {r['spacegroup']}")

    write_structures(candidates, os.path.join(args.out, "candidates.extxyz"))
    ranked = [relaxed[i] for i in order]
    if ranked:
        write_structures(ranked, os.path.join(args.out, "relaxed.extxyz"))
        for rank, atoms in enumerate(ranked, 1):
            name = f"{rank:03d}_{atoms.info['composition']}_{atoms.info['sample']}.cif"
            write_structures([atoms], os.path.join(args.out, "cif", name))
    print(f"\nwrote {os.path.join(args.out, 'candidates.extxyz')}"
          + (f", {os.path.join(args.out, 'relaxed.extxyz')} and {len(ranked)} CIFs in {os.path.join(args.out, 'cif')}"
             if ranked else ""))


if __name__ == "__main__":
    main()
