"""Crystal structure prediction on Perov-5: plain vs Orbit Diffusion, side by side (reduced scale, CPU).

Data: ``../shared/data/perov_5/val.csv`` (3,787 structures), fixed seeded split 3,287 train / 500
held-out (``split_indices(seed=0)``). Every variant trains the same CSPNet for the same number of
steps from the same seeds; each held-out composition gets one sample from DiffCSP's
predictor-corrector sampler; metrics follow DiffCSP (StructureMatcher stol 0.5 / angle_tol 10 /
ltol 0.3, validity gate, RMSE over matches) plus METRe / cRMSE.

Reports:

1. match rate, RMSE, validity, METRe, train and sampling wall time per variant (mean ± std over seeds);
2. the training-step time ratio orbit / plain (same batch, interleaved rounds, one process);
3. gradient variance of the augment vs orbit targets at several noise levels on a trained model;
4. what fewer sampler steps cost in match rate (the best variant at 1000 / 200 / 50 steps).

The last line is JSON: ``{"match_rate": {variant: mean}, "rmse": {...}, ...}``.

Run: ``python benchmarks/csp_perov5.py`` (full, about an hour on 2 cores) or ``--quick`` (smoke).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch_geometric.data import Batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(os.path.dirname(ROOT), "shared", "data", "perov_5", "val.csv")

VARIANTS = {
    "plain": dict(mode="plain"),
    "orbit_U": dict(mode="orbit", proposal="uniform"),
    "orbit_WN": dict(mode="orbit", proposal="wrapped_normal"),
    "orbit_guided": dict(mode="orbit", proposal="guided"),
    "orbit_U+lattice": dict(mode="orbit", proposal="uniform", lattice_orbit="perm"),
    "orbit_guided+lattice": dict(mode="orbit", proposal="guided", lattice_orbit="perm"),
    "orbit_exact": dict(mode="orbit", proposal="exact"),
    "orbit_exact+lattice": dict(mode="orbit", proposal="exact", lattice_orbit="perm"),
}


def load(csv: str, root: str, n_test: int):
    from orbit_pyg.integrations.crystal import CDVAEDataset, split_indices

    ds = CDVAEDataset(root, name="perov_5", split="val", source=csv, progress=False)
    split = split_indices(len(ds), n_test=500, seed=0)
    train = [ds[int(i)] for i in split.train]
    test = [ds[int(i)] for i in split.test[:n_test]]
    return train, test


def step_time_ratio(cfg_kwargs: dict, train, rounds: int, batch_size: int) -> dict:
    """Median wall time of a full training step (forward, backward, Adam) orbit / plain, interleaved."""
    from orbit_pyg.integrations.crystal.csp import CSPConfig, make_loss, make_model

    batch = Batch.from_data_list(train[:batch_size])
    times = {"plain": [], "orbit": []}
    setups = {}
    for mode in times:
        cfg = CSPConfig(**{**cfg_kwargs, "mode": mode})
        torch.manual_seed(0)
        model = make_model(cfg)
        setups[mode] = (model, make_loss(cfg), torch.optim.Adam(model.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(0)
    for r in range(rounds + 1):
        for mode, (model, loss_fn, opt) in setups.items():
            t0 = time.perf_counter()
            loss, _ = loss_fn(model, batch, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r > 0:  # round 0 warms up
                times[mode].append(time.perf_counter() - t0)
    plain, orbit = statistics.median(times["plain"]), statistics.median(times["orbit"])
    return {"ms_plain": 1e3 * plain, "ms_orbit": 1e3 * orbit, "ratio": orbit / plain}


def gradient_variance_vs_sigma(model, train, cfg_kwargs: dict, steps_k: list[int], draws: int) -> dict:
    """Total gradient variance of augment vs orbit targets at fixed diffusion steps ``k``."""
    from orbit_pyg.diagnostics import gradient_variance
    from orbit_pyg.integrations.crystal.csp import CSPConfig, make_loss

    batch = Batch.from_data_list(train[:32])
    out = {"k": steps_k, "sigma": [], "augment": [], "orbit": [], "ratio": []}
    for k in steps_k:
        row = {}
        for mode in ("augment", "orbit"):
            loss_fn = make_loss(CSPConfig(**{**cfg_kwargs, "mode": mode}))
            step = torch.full((batch.num_graphs,), k, dtype=torch.long)

            def fn(m, d, g, loss_fn=loss_fn, step=step):
                noisy = loss_fn.corrupt(d, g, step=step)
                lat, coord = m(d.z, noisy.frac_t, noisy.cell_t, noisy.t, noisy.batch, noisy.num_graphs)
                return loss_fn.criterion(lat, coord, noisy)[0]

            row[mode] = gradient_variance(fn, model, batch, num_draws=draws, seed=k)["total_variance"]
        out["sigma"].append(float(loss_fn.diffusion.sigmas[k - 1]))
        out["augment"].append(row["augment"])
        out["orbit"].append(row["orbit"])
        out["ratio"].append(row["orbit"] / row["augment"])
    return out


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def main(argv=None) -> dict:
    from orbit_pyg.integrations.crystal.csp import CSPConfig, evaluate, generate, train_csp
    from orbit_pyg.io import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (a minute or two)")
    p.add_argument("--csv", default=DEFAULT_CSV)
    p.add_argument("--root", default=os.path.join(ROOT, "outputs", "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "csp_perov5"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--translations", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--workers", type=int, default=2, help="processes for StructureMatcher")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.n_test, args.sample_steps = 30, [0], 40, 20
        args.variants, args.translations, args.hidden, args.layers = ["plain", "orbit_U"], 64, 32, 1
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    train, test = load(args.csv, args.root, args.n_test)
    print(f"Perov-5: {len(train)} train / {len(test)} held-out; CSPNet {args.hidden}x{args.layers}, "
          f"{args.steps} steps of batch {args.batch_size}, K = {args.translations}, sampler {args.sample_steps} steps")
    base = dict(hidden=args.hidden, layers=args.layers, n_freq=16, steps=args.steps, batch_size=args.batch_size,
                translations=args.translations, sample_steps=args.sample_steps)

    results: dict[str, list[dict]] = {}
    models = {}
    for name in args.variants:
        for seed in args.seeds:
            cfg = CSPConfig(**{**base, **VARIANTS[name], "seed": seed})
            t0 = time.time()
            model, history = train_csp(train, cfg, log_every=max(args.steps // 10, 1))
            t_train = time.time() - t0
            t0 = time.time()
            generated = generate(model, test, cfg, seed=seed)
            t_sample = time.time() - t0
            m = evaluate(generated, test, workers=args.workers)
            row = {"seed": seed, "match_rate": m["match_rate"], "rmse": m["rmse"], "valid": m["valid_generated"],
                   "metre": m["metre"], "crmse": m["crmse"], "train_s": t_train, "sample_s": t_sample,
                   "final_loss": history[-1]["loss"] if history else None}
            results.setdefault(name, []).append(row)
            models[(name, seed)] = (model, cfg)
            print(f"  {name:22s} seed {seed}: match {100 * m['match_rate']:.1f} %  RMSE "
                  f"{m['rmse'] if m['rmse'] is None else round(m['rmse'], 4)}  valid {100 * m['valid_generated']:.1f} %  "
                  f"train {t_train:.0f} s  sample {t_sample:.0f} s", flush=True)

    print(f"\n{'variant':22s} {'match %':>14s} {'RMSE':>16s} {'valid %':>12s} {'METRe %':>14s} {'train s':>9s} {'sample s':>9s}")
    for name, rows in results.items():
        print(f"{name:22s} {fmt([r['match_rate'] for r in rows], 100):>14s} {fmt([r['rmse'] for r in rows], 1, 4):>16s} "
              f"{fmt([r['valid'] for r in rows], 100, 1):>12s} {fmt([r['metre'] for r in rows], 100):>14s} "
              f"{fmt([r['train_s'] for r in rows], 1, 0):>9s} {fmt([r['sample_s'] for r in rows], 1, 0):>9s}")

    overhead = step_time_ratio({**base, "proposal": "uniform"}, train, rounds=3 if args.quick else 10,
                               batch_size=args.batch_size)
    print(f"\ntraining-step time, orbit (K = {args.translations}) / plain: {overhead['ratio']:.3f} "
          f"({overhead['ms_orbit']:.0f} ms vs {overhead['ms_plain']:.0f} ms)")

    ref_name = "plain" if "plain" in args.variants else args.variants[0]
    ref_model, _ = models[(ref_name, args.seeds[0])]
    ks = [1, 250, 500, 750, 1000] if not args.quick else [1, 500, 1000]
    gv = gradient_variance_vs_sigma(ref_model, train, {**base, "proposal": "uniform"}, ks, 4 if args.quick else 16)
    print(f"\ngradient variance on the trained {ref_name} model (32 crystals):")
    print(f"{'k':>6s} {'sigma':>8s} {'augment':>12s} {'orbit':>12s} {'orbit/aug':>10s}")
    for i, k in enumerate(gv["k"]):
        print(f"{k:6d} {gv['sigma'][i]:8.4f} {gv['augment'][i]:12.4g} {gv['orbit'][i]:12.4g} {gv['ratio'][i]:10.3f}")

    best = max(results, key=lambda n: statistics.mean(r["match_rate"] for r in results[n]))
    best_model, best_cfg = models[(best, args.seeds[0])]
    fewer = {}
    for n_steps in ([args.sample_steps, 10] if args.quick else [1000, 200, 50]):
        t0 = time.time()
        gen = generate(best_model, test, best_cfg, seed=0, num_steps=n_steps)
        dt = time.time() - t0
        m = evaluate(gen, test, workers=args.workers)
        fewer[str(n_steps)] = {"match_rate": m["match_rate"], "rmse": m["rmse"], "sample_s": dt}
        print(f"sampler steps {n_steps:5d} ({best}, seed {args.seeds[0]}): match {100 * m['match_rate']:.1f} %  "
              f"RMSE {m['rmse']}  {dt:.0f} s")

    summary = {
        "match_rate": {n: statistics.mean(r["match_rate"] for r in rows) for n, rows in results.items()},
        "rmse": {n: (statistics.mean(v) if (v := [r["rmse"] for r in rows if r["rmse"] is not None]) else None)
                 for n, rows in results.items()},
        "match_rate_per_seed": {n: [r["match_rate"] for r in rows] for n, rows in results.items()},
        "step_time_ratio": overhead["ratio"],
        "grad_var_ratio": gv["ratio"],
        "grad_var_sigmas": gv["sigma"],
        "fewer_sampler_steps": fewer,
        "config": {**base, "seeds": args.seeds, "n_test": len(test)},
    }
    atomic_write_json(os.path.join(args.out, "summary.json"), {"results": results, **summary})
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
