"""QM9 conformer benchmark (reduced scale, CPU): convergence, quality against RDKit ETKDG, overhead.

A seeded random subset of QM9 (DFT geometries from the qm9pack data files), split once into train /
validation / held-out test molecules.

1. **Convergence** (the paper's "faster convergence" claim): the non-equivariant
   ``MoleculeTransformer`` trained with ``augment``, ``orbit`` (sampled rotations, ``--rotations``
   Haar candidates × automorphisms) and ``orbit_exact`` (rotations integrated in closed form, matrix
   Fisher posterior, × automorphisms) targets (same data order, same seeds; ``--variants`` picks
   them), validation error every ``--val-every`` steps on a fixed validation set with fixed noise,
   times and random poses. The error is the MSE against the Rao-Blackwell target with sampled
   rotations (``val_orbit``: the expected loss minus a model-independent constant, lower variance),
   against the exact Rao-Blackwell target (``val_exact``, no rotation sampling noise) and, for
   reference, against the augmentation target. ``steps_to_target``: the target is the worst of the
   variants' final errors (mean of the last three evaluations, seed-averaged curves); each variant's
   steps = first evaluation at or below it. Wall time: the training seconds (validation excluded)
   at each evaluation are recorded, giving ``seconds_to_target`` and the validation error of each
   variant at the training time of the fastest-finishing one (``val_at_equal_wall``).
2. **Quality** (``--skip-quality`` leaves it out): ETKDG (and ETKDG + MMFF) vs the transformer
   trained ``plain`` and with each variant of part 1 (seed 0, same steps): 2 conformers per held-out molecule (2× its single DFT
   reference), heavy-atom symmetry-aware RMSD to the DFT geometry, COV-R / AMR-R / COV-P / AMR-P at
   δ = 0.5 Å, and wall time per conformer. The models see only the graph (no stereo); ETKDG is
   given the same graph.
3. **Overhead**: training-step time with ``rotations × automorphisms`` = 200 × 50 orbit candidates
   (``ratio_orbit_vs_augment``) and with exact rotations × 50 automorphisms
   (``ratio_exact_vs_augment``, as ``ratio_exact_molecule`` in ``benchmarks/overhead.py``) relative
   to augmentation, interleaved on the same batches, in the same process.

The last stdout line is one JSON object. ``--quick`` is a smoke run (seconds to a minute).

Example::

    python benchmarks/conformers_qm9.py --quick
    python benchmarks/conformers_qm9.py --max-molecules 3000 --steps 2000 | tee outputs/conformers_qm9.log
    python benchmarks/conformers_qm9.py --objective flow --skip-quality | tee outputs/conformers_qm9_exact.log
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch_geometric.data import Batch

from orbit_pyg.integrations.molecule import (
    ConformerConfig, QM9Conformers, etkdg_conformers, evaluate_conformers, sample_many, split_indices,
    train_conformer_model,
)
from orbit_pyg.integrations.molecule.objectives import ConformerModel, make_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run")
    p.add_argument("--root", default="outputs/qm9_cache", help="processed-cache folder")
    p.add_argument("--source", default=None, help="QM9 CSV / folder / URL (default: qm9pack's data files)")
    p.add_argument("--max-molecules", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--objective", choices=["diffusion", "flow"], default="diffusion")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rotations", type=int, default=200)
    p.add_argument("--automorphisms", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sampler", choices=["ode", "sde"], default="sde")
    p.add_argument("--overhead-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="training targets compared in the convergence part")
    p.add_argument("--skip-quality", action="store_true", help="leave out part 2 (sampling + ETKDG)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_molecules, args.n_test, args.n_val = 120, 6, 16
        args.steps, args.val_every, args.hidden, args.layers = 30, 10, 32, 2
        args.rotations, args.sample_steps, args.overhead_steps = 200, 10, 3
    return args


VARIANTS = {  # variant -> (loss mode, rotation proposal)
    "augment": ("augment", "uniform"),
    "orbit": ("orbit", "uniform"),
    "orbit_exact": ("orbit", "exact"),
}


def variant_config(base: dict, variant: str, **extra) -> ConformerConfig:
    """The :class:`ConformerConfig` of a benchmark variant (``plain`` or a key of :data:`VARIANTS`)."""
    mode, proposal = VARIANTS.get(variant, (variant, "uniform"))
    return ConformerConfig(**{**base, "mode": mode, "proposal": proposal, **extra})


def log(msg: str) -> None:
    print(msg, flush=True)


def make_val_fn(val_data, cfg: ConformerConfig, batch_size: int = 64):
    """Fixed-noise validation: MSE against the orbit (RB) target with sampled and with exact rotations, and
    against the augmentation target. The three losses draw the same times, poses and noise from the same seed."""
    batches = [Batch.from_data_list(val_data[i:i + batch_size]) for i in range(0, len(val_data), batch_size)]
    losses = {name: make_loss(variant_config(cfg.__dict__, variant))
              for name, variant in (("orbit", "orbit"), ("exact", "orbit_exact"), ("augment", "augment"))}

    @torch.no_grad()
    def val(model) -> dict:
        out = {}
        for mode, loss in losses.items():
            g = torch.Generator().manual_seed(12345)  # the same noise, times and poses at every evaluation
            total, nodes = 0.0, 0
            for b in batches:
                noisy = loss.corrupt(b, g)
                err = ((model(noisy.xt, noisy.t, b) - noisy.target) ** 2).sum(-1)
                total, nodes = total + float(err.sum()), nodes + err.numel()
            out[f"val_{mode}"] = total / nodes
        return out

    return val


def train_run(train, val_fn, cfg: ConformerConfig, val_every: int):
    """Train; every ``val_every`` steps record the validation errors and the training seconds so far
    (validation time excluded)."""
    curve = []
    clock = {"start": time.perf_counter(), "val": 0.0}

    def record(trainer):
        t0 = time.perf_counter()
        model = trainer.model
        was = model.training
        model.eval()
        with trainer.ema.average_parameters(model):
            metrics = val_fn(model)
        model.train(was)
        curve.append({"step": trainer.step, "seconds": t0 - clock["start"] - clock["val"], **metrics})
        clock["val"] += time.perf_counter() - t0

    model, history = train_conformer_model(train, cfg, progress=False, log_every=max(1, cfg.steps // 10),
                                           callbacks=[(record, val_every)])
    return model, curve, time.perf_counter() - clock["start"] - clock["val"]


def steps_to_target(curves: dict[str, list[list[dict]]], key: str = "val_orbit") -> tuple[float, dict, dict]:
    """Seed-averaged curves; target = max over variants of their final (last-3 mean) error."""
    mean_curves = {}
    for variant, runs in curves.items():
        steps = [r["step"] for r in runs[0]]
        mean_curves[variant] = [(s, statistics.mean(run[i][key] for run in runs)) for i, s in enumerate(steps)]
    finals = {v: statistics.mean(e for _, e in c[-3:]) for v, c in mean_curves.items()}
    target = max(finals.values())
    reached = {v: next((s for s, e in c if e <= target), None) for v, c in mean_curves.items()}
    return target, reached, mean_curves


def wall_time_comparison(curves: dict[str, list[list[dict]]], reached: dict, key: str = "val_orbit") -> tuple[dict, dict, float]:
    """Seed-mean training seconds to reach the step target, and each variant's error (seed-mean curve)
    at the last evaluation within the budget ``T`` = the smallest seed-mean total training time."""
    secs = {v: [statistics.mean(run[i]["seconds"] for run in runs) for i in range(len(runs[0]))]
            for v, runs in curves.items()}
    errs = {v: [statistics.mean(run[i][key] for run in runs) for i in range(len(runs[0]))] for v, runs in curves.items()}
    steps = {v: [r["step"] for r in runs[0]] for v, runs in curves.items()}
    to_target = {v: (None if reached[v] is None else secs[v][steps[v].index(reached[v])]) for v in curves}
    budget = min(s[-1] for s in secs.values())
    at_budget = {}
    for v in curves:
        inside = [i for i, t in enumerate(secs[v]) if t <= budget * 1.0001]
        at_budget[v] = {"step": steps[v][inside[-1]], "error": errs[v][inside[-1]]} if inside else None
    return to_target, at_budget, budget


def quality_row(name, data, confs, seconds):
    ev = evaluate_conformers(data, confs)
    n = sum(c.size(0) for c in confs)
    keys = ("rmsd_mean", "cov_r", "amr_r", "cov_p", "amr_p", "cov_r_median", "amr_r_median")
    return {"method": name, **{k: ev[k] for k in keys}, "sec_per_conformer": seconds / max(n, 1),
            "num_conformers": n}


def overhead(train, cfg: ConformerConfig, steps: int, batch_size: int):
    """Median training-step time of orbit (rotations × automorphisms candidates) and of orbit_exact (exact
    rotations × automorphisms) relative to augment, interleaved on the same batches."""
    torch.manual_seed(0)
    model = ConformerModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = {m: make_loss(variant_config(cfg.__dict__, m)) for m in ("plain", "augment", "orbit", "orbit_exact")}
    times = {m: [] for m in losses}
    ess = {"orbit": [], "orbit_exact": []}
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 1):
        b = Batch.from_data_list(train[(i * batch_size) % len(train):][:batch_size])
        for mode, loss in losses.items():
            t0 = time.perf_counter()
            noisy = loss.corrupt(b, g)
            value = loss.criterion(model(noisy.xt, noisy.t, b), noisy)
            opt.zero_grad()
            value.backward()
            opt.step()
            if i > 0:  # the first round warms up
                times[mode].append(time.perf_counter() - t0)
            if mode in ess:
                ess[mode].append(float(noisy.ess.mean()))
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"step_seconds": med, "ratio_orbit_vs_augment": med["orbit"] / med["augment"],
            "ratio_exact_vs_augment": med["orbit_exact"] / med["augment"],
            "ratio_exact_vs_orbit": med["orbit_exact"] / med["orbit"],
            "ratio_augment_vs_plain": med["augment"] / med["plain"], "mean_ess": statistics.mean(ess["orbit"]),
            "mean_ess_exact": statistics.mean(ess["orbit_exact"]),
            "candidates": cfg.rotations * cfg.automorphisms, "batch_size": batch_size}


def quality(args, base: dict, train, val_fn, test, models: dict) -> list[dict]:
    """Part 2: a ``plain`` model (seed 0) plus the part-1 models and ETKDG (+ MMFF) on the held-out molecules."""
    cfg_plain = variant_config(base, "plain", seed=args.seeds[0])
    models["plain"], _, secs = train_run(train, val_fn, cfg_plain, args.steps)
    log(f"[quality] plain trained in {secs:.0f} s")
    rows = []
    counts = [2] * len(test)  # 2x the single DFT reference
    for name in ["plain"] + list(args.variants):
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        confs = sample_many(models[name], test, counts, steps=args.sample_steps, sampler=args.sampler, generator=g)
        rows.append(quality_row(f"transformer-{name}", test, confs, time.perf_counter() - t0))
    for mmff in (False, True):
        t0 = time.perf_counter()
        confs = [etkdg_conformers(d, c, seed=0, mmff=mmff) for d, c in zip(test, counts)]
        rows.append(quality_row("etkdg+mmff" if mmff else "etkdg", test, confs, time.perf_counter() - t0))
    log(f"[quality] {len(test)} held-out molecules, 2 conformers each, {args.sampler} sampler {args.sample_steps} steps, "
        "heavy-atom RMSD to the DFT geometry, delta = 0.5 A")
    log("| method | RMSD mean (A) | COV-R % | AMR-R (A) | COV-P % | AMR-P (A) | AMR-R median | s / conformer |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['method']} | {r['rmsd_mean']:.3f} | {100 * r['cov_r']:.1f} | {r['amr_r']:.3f} | "
            f"{100 * r['cov_p']:.1f} | {r['amr_p']:.3f} | {r['amr_r_median']:.3f} | {r['sec_per_conformer']:.4f} |")
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    log(f"command: {' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}")
    t0 = time.perf_counter()
    ds = QM9Conformers(args.root, source=args.source, max_molecules=args.max_molecules, seed=0,
                       automorphisms=args.automorphisms, progress=False)
    split = split_indices(len(ds), n_test=args.n_test, n_val=args.n_val, seed=0)
    train = [ds[int(i)] for i in split.train]
    val = [ds[int(i)] for i in split.val]
    test = [ds[int(i)] for i in split.test]
    log(f"QM9 subset: {ds.num_rows} rows, {len(ds)} molecules, skipped {ds.num_skipped} {ds.skip_reasons}; "
        f"train {len(train)} / val {len(val)} / test {len(test)}; load {time.perf_counter() - t0:.1f} s")
    exact = sum(1 for d in ds if 0 < int(d.aut_order) <= args.automorphisms)
    log(f"automorphism groups: {exact}/{len(ds)} enumerated exactly (|G| <= {args.automorphisms}), the rest sampled; "
        f"median |G| = {statistics.median(int(d.aut_order) for d in ds)}")

    base = dict(objective=args.objective, model="transformer", hidden=args.hidden, layers=args.layers, heads=4,
                rotations=args.rotations, automorphisms=args.automorphisms, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, sample_steps=args.sample_steps, sampler=args.sampler)
    val_fn = make_val_fn(val, ConformerConfig(**base))

    # 1. convergence
    curves, models, train_seconds = {v: [] for v in args.variants}, {}, {}
    for variant in args.variants:
        for seed in args.seeds:
            cfg = variant_config(base, variant, seed=seed)
            model, curve, secs = train_run(train, val_fn, cfg, args.val_every)
            curves[variant].append(curve)
            train_seconds.setdefault(variant, []).append(secs)
            if seed == args.seeds[0]:
                models[variant] = model
            log(f"[convergence] {variant} seed {seed}: {secs:.0f} s; val_orbit "
                + " ".join(f"{r['step']}:{r['val_orbit']:.4f}" for r in curve))
            log(f"[convergence] {variant} seed {seed}: val_exact "
                + " ".join(f"{r['step']}:{r['val_exact']:.4f}" for r in curve))
            log(f"[convergence] {variant} seed {seed}: val_augment "
                + " ".join(f"{r['step']}:{r['val_augment']:.4f}" for r in curve))
            log(f"[convergence] {variant} seed {seed}: train seconds "
                + " ".join(f"{r['step']}:{r['seconds']:.1f}" for r in curve))
    target, reached, mean_curves = steps_to_target(curves, "val_orbit")
    target_e, reached_e, mean_curves_e = steps_to_target(curves, "val_exact")
    target_a, reached_a, _ = steps_to_target(curves, "val_augment")
    log(f"[convergence] target val_orbit error {target:.4f}: steps_to_target {reached}")
    log(f"[convergence] (exact-target metric) target {target_e:.4f}: steps_to_target {reached_e}")
    log(f"[convergence] (augment-target metric) target {target_a:.4f}: steps_to_target {reached_a}")
    sec_to_target, at_budget, budget = wall_time_comparison(curves, reached, "val_orbit")
    _, at_budget_e, _ = wall_time_comparison(curves, reached_e, "val_exact")
    log("[wall time] seconds_to_target (val_orbit target, seed-mean training seconds): "
        + ", ".join(f"{v}: {'-' if s is None else f'{s:.0f}'}" for v, s in sec_to_target.items()))
    log(f"[wall time] at the equal training budget {budget:.0f} s: val_orbit "
        + ", ".join(f"{v}: {r['error']:.4f} (step {r['step']})" for v, r in at_budget.items() if r)
        + "; val_exact " + ", ".join(f"{v}: {r['error']:.4f}" for v, r in at_budget_e.items() if r))
    per_seed = {}
    for v, runs in curves.items():
        per_seed[v] = [next((r["step"] for r in run if r["val_orbit"] <= target), None) for run in runs]
    log(f"[convergence] per-seed steps to the same target: {per_seed}")
    log("| step | " + " | ".join(f"{v} val_orbit / val_exact (mean of {len(args.seeds)} seeds)" for v in mean_curves) + " |")
    for i, (s, _) in enumerate(next(iter(mean_curves.values()))):
        log(f"| {s} | " + " | ".join(f"{mean_curves[v][i][1]:.4f} / {mean_curves_e[v][i][1]:.4f}" for v in mean_curves) + " |")

    # 2. quality
    rows = []
    if not args.skip_quality:
        rows = quality(args, base, train, val_fn, test, models)

    # 3. overhead
    # 3. overhead
    oh = overhead(train, ConformerConfig(**{**base, "rotations": 200, "automorphisms": args.automorphisms}),
                  args.overhead_steps, args.batch_size)
    log(f"[overhead] {oh['candidates']} candidates (200 rotations x {args.automorphisms} automorphisms), batch "
        f"{oh['batch_size']}: step seconds {({k: round(v, 4) for k, v in oh['step_seconds'].items()})}, "
        f"orbit/augment = {oh['ratio_orbit_vs_augment']:.2f}, orbit_exact/augment = {oh['ratio_exact_vs_augment']:.2f}, "
        f"orbit_exact/orbit = {oh['ratio_exact_vs_orbit']:.2f}, augment/plain = {oh['ratio_augment_vs_plain']:.2f}, "
        f"mean ESS {oh['mean_ess']:.1f} (exact: {oh['mean_ess_exact']:.1f} automorphism candidates)")

    result = {
        "benchmark": "conformers_qm9", "quick": args.quick, "objective": args.objective,
        "num_train": len(train), "num_val": len(val), "num_test": len(test), "steps": args.steps,
        "seeds": args.seeds, "skipped": ds.num_skipped, "skip_reasons": ds.skip_reasons,
        "target_val_error": target, "steps_to_target": reached, "steps_to_target_per_seed": per_seed,
        "steps_to_target_augment_metric": reached_a,
        "target_val_exact_error": target_e, "steps_to_target_exact_metric": reached_e,
        "seconds_to_target": sec_to_target, "equal_wall_budget_seconds": budget,
        "val_orbit_at_equal_wall": {v: (r["error"] if r else None) for v, r in at_budget.items()},
        "val_exact_at_equal_wall": {v: (r["error"] if r else None) for v, r in at_budget_e.items()},
        "final_val_orbit": {v: mean_curves[v][-1][1] for v in mean_curves},
        "final_val_exact": {v: mean_curves_e[v][-1][1] for v in mean_curves_e},
        "cov_r": {r["method"]: r["cov_r"] for r in rows}, "amr_r": {r["method"]: r["amr_r"] for r in rows},
        "cov_p": {r["method"]: r["cov_p"] for r in rows}, "amr_p": {r["method"]: r["amr_p"] for r in rows},
        "rmsd_mean": {r["method"]: r["rmsd_mean"] for r in rows},
        "sec_per_conformer": {r["method"]: r["sec_per_conformer"] for r in rows},
        "overhead_ratio_orbit_vs_augment": oh["ratio_orbit_vs_augment"], "overhead_mean_ess": oh["mean_ess"],
        "overhead_ratio_exact_vs_augment": oh["ratio_exact_vs_augment"],
        "overhead_ratio_exact_vs_orbit": oh["ratio_exact_vs_orbit"], "overhead_mean_ess_exact": oh["mean_ess_exact"],
        "overhead_step_seconds": oh["step_seconds"],
        "train_seconds": {k: statistics.mean(v) for k, v in train_seconds.items()},
        "wall_seconds": time.perf_counter() - t_all,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
