"""Text- and property-guided crystal structure prediction on Perov-5: plain vs Orbit Diffusion under conditioning.

Data: ``../shared/data/perov_5/val.csv`` (3,787 structures), the fixed split of
``benchmarks/csp_perov5.py`` (``split_indices(seed=0)``: 3,287 train / 500 held-out; the first
``--n-test`` held-out structures are evaluated). Every variant trains the same CSPNet for the same
number of steps from the same seeds (equal budget); each held-out composition gets one sample from
DiffCSP's predictor-corrector sampler, conditioned on **its own** description (guidance scale ``s = 1``:
the plain conditional prediction); metrics as DiffCSP (match rate, RMSE over matches).

Variants (condition × training objective × seeds):

* ``none``: the unconditioned CSPNet;
* ``short``: the one-sentence template (formula, crystal system, space group from pymatgen's
  ``SpacegroupAnalyzer``) embedded with all-MiniLM-L6-v2 (offline);
* ``long``: Robocrystallographer's paragraph, embedded the same way (truncated to 256 word pieces).
  robocrys takes 5-13 s per structure on a busy core, about 0.6 s with the memoized mineral name
  used here (``RobocrysDescriber(memo_mineral=True)``, an approximation documented in
  :mod:`orbit_pyg.integrations.crystal.text`), so only the descriptions found in the cache are used
  for training (``--long-train`` caps them): the other training crystals train the null condition
  (classifier-free-guidance style). The held-out crystals all get their long description. The
  printed header states how many training crystals had one.

each with ``plain`` and ``orbit`` (``--proposal``, default uniform with K = ``--translations``) training.

Property conditioning: a CSPNet (orbit, first seed) conditioned on Perov-5's ``heat_all`` and
``dir_gap`` (standardized with train-split statistics) samples each held-out composition at an
asked property value: its own (``own``) or another held-out crystal's (``swapped``, a fixed
permutation). A regressor trained on the training split's true structures (scikit-learn
``HistGradientBoostingRegressor`` on composition counts, sorted lattice lengths / angles, volume
per atom and nearest-neighbour distance statistics; its held-out R² is printed) predicts the
property of every generated structure; reported: mean |predicted - asked| for the conditional
samples (guidance scale ``s = 1`` and ``s = --guidance``, default 3; classifier-free guidance
``o(null) + s (o(c) - o(null))``), the same model with the null condition, and the
unconditioned ``none/orbit`` model.

The last line is JSON: ``{"match_rate": {variant: mean}, "rmse": {...}, "property": {...}, ...}``.

Run: ``python benchmarks/text_guided_perov5.py`` (reduced scale on CPU) or ``--quick`` (smoke).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from csp_perov5 import DEFAULT_CSV, ROOT, fmt, load  # noqa: E402  (same data, split and table format)


def features(data) -> list[float]:
    """Composition counts (z < 100), sorted lattice lengths and angles, volume per atom, NN distance stats.

    A cell with more than 1e4 Å³ per atom gets fixed sentinel values; a singular cell NaN geometry.
    """
    from orbit_pyg.integrations.crystal import CrystalConversionError, data_to_structure

    counts = torch.bincount(data.z.long().clamp(max=99), minlength=100).float().tolist()
    try:
        s = data_to_structure(data)
    except CrystalConversionError:  # a singular generated cell: geometry unknown (NaN, handled by the regressor)
        return counts + [math.nan] * 10
    lat = s.lattice
    vol = abs(lat.volume) / max(len(s), 1)
    if not math.isfinite(vol) or vol > 1e4:
        return counts + [1e3] * 3 + [90.0] * 3 + [1e4, 0.0, 0.0, 0.0]
    dm = torch.as_tensor(s.distance_matrix, dtype=torch.float64)
    dm.fill_diagonal_(float("inf"))
    nn = dm.min(dim=1).values if len(s) > 1 else torch.zeros(1)
    return (counts + sorted(lat.abc) + sorted(lat.angles) + [vol, float(nn.min()), float(nn.mean()), float(nn.max())])


def main(argv=None) -> dict:
    from orbit_pyg.integrations.crystal.condition import attach_conditions
    from orbit_pyg.integrations.crystal.csp import CSPConfig, evaluate, generate, train_csp
    from orbit_pyg.integrations.crystal.text import MiniLMEncoder, RobocrysDescriber, dataset_text_embeddings
    from orbit_pyg.io import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    p.add_argument("--csv", default=DEFAULT_CSV)
    p.add_argument("--root", default=os.path.join(ROOT, "outputs", "data"))
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "text_guided"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--conditions", nargs="+", default=["none", "short", "long"], choices=["none", "short", "long"])
    p.add_argument("--modes", nargs="+", default=["plain", "orbit"], choices=["plain", "orbit"])
    p.add_argument("--proposal", default="uniform", choices=["uniform", "wrapped_normal", "guided", "exact"],
                   help="torus-translation proposal of the orbit variants")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--translations", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-train", type=int, default=None, help="use only the first N training crystals")
    p.add_argument("--long-train", type=int, default=1000, help="at most this many training crystals get a long text")
    p.add_argument("--cond-drop-prob", type=float, default=0.1)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="guidance scale s > 1 for the property experiment (s = 1 is always run)")
    p.add_argument("--no-props", action="store_true", help="skip the property-conditioning experiment")
    p.add_argument("--workers", type=int, default=1, help="processes for StructureMatcher")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.n_test, args.sample_steps = 20, [0], 16, 10
        args.translations, args.hidden, args.layers, args.n_train, args.long_train = 32, 32, 1, 64, 16
        args.batch_size = 16
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    text_dir = os.path.join(args.out, "text")  # description / embedding caches (reused across runs)

    train, test = load(args.csv, args.root, args.n_test)
    train = train[: args.n_train]
    encoder = MiniLMEncoder()

    t0 = time.time()
    emb = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of long texts is counted below instead
        if "short" in args.conditions:
            emb["short"] = tuple(dataset_text_embeddings(part, "short", text_dir, encoder, progress=not args.quick)[0]
                                 for part in (train, test))
        if "long" in args.conditions:
            long = RobocrysDescriber(memo_mineral=True)
            # training: cached descriptions only, capped; held-out: computed if missing
            have, _ = dataset_text_embeddings(train, "long", text_dir, encoder, compute=False, progress=False, describe=long) \
                if os.path.exists(os.path.join(text_dir, "descriptions_long.json")) else (None, None)
            if have is None or int(torch.isfinite(have).all(1).sum()) == 0:
                dataset_text_embeddings(train[: args.long_train], "long", text_dir, encoder, progress=not args.quick,
                                        describe=long)
                have, _ = dataset_text_embeddings(train, "long", text_dir, encoder, compute=False, progress=False, describe=long)
            rows = torch.isfinite(have).all(1).nonzero().flatten()[args.long_train:]
            have[rows] = float("nan")
            emb["long"] = (have, dataset_text_embeddings(test, "long", text_dir, encoder, progress=not args.quick,
                                                         describe=long)[0])
    n_long = int(torch.isfinite(emb["long"][0]).all(1).sum()) if "long" in emb else 0
    t_text = time.time() - t0
    print(f"Perov-5: {len(train)} train / {len(test)} held-out; CSPNet {args.hidden}x{args.layers}, {args.steps} steps "
          f"of batch {args.batch_size}, K = {args.translations}, sampler {args.sample_steps} steps, seeds {args.seeds}; "
          f"long texts for {n_long} of {len(train)} training crystals (others: null condition); "
          f"text preparation {t_text:.0f} s", flush=True)

    base = dict(hidden=args.hidden, layers=args.layers, n_freq=16, steps=args.steps, batch_size=args.batch_size,
                translations=args.translations, sample_steps=args.sample_steps, proposal=args.proposal,
                cond_drop_prob=args.cond_drop_prob)
    results: dict[str, list[dict]] = {}
    models = {}
    for cond in args.conditions:
        if cond == "none":
            tr, test_cond, extra = train, None, {}
        else:
            tr = attach_conditions(train, emb[cond][0])
            test_cond, extra = emb[cond][1], {"condition": "text", "cond_text": cond}
        for mode in args.modes:
            for seed in args.seeds:
                name = f"{cond}/{mode}"
                cfg = CSPConfig(**{**base, **extra, "mode": mode, "seed": seed})
                t0 = time.time()
                model, history = train_csp(tr, cfg, log_every=max(args.steps // 5, 1))
                t_train = time.time() - t0
                t0 = time.time()
                generated = generate(model, test, cfg, seed=seed, cond=test_cond)
                t_sample = time.time() - t0
                m = evaluate(generated, test, workers=args.workers)
                row = {"seed": seed, "match_rate": m["match_rate"], "rmse": m["rmse"], "valid": m["valid_generated"],
                       "train_s": t_train, "sample_s": t_sample, "final_loss": history[-1]["loss"] if history else None}
                results.setdefault(name, []).append(row)
                models[(name, seed)] = (model, cfg, generated)
                print(f"  {name:14s} seed {seed}: match {100 * m['match_rate']:.1f} %  RMSE "
                      f"{m['rmse'] if m['rmse'] is None else round(m['rmse'], 4)}  valid {100 * m['valid_generated']:.1f} %  "
                      f"train {t_train:.0f} s  sample {t_sample:.0f} s", flush=True)

    print(f"\n{'variant':14s} {'match %':>14s} {'RMSE':>16s} {'valid %':>12s} {'train s':>9s}")
    for name, rows in results.items():
        print(f"{name:14s} {fmt([r['match_rate'] for r in rows], 100):>14s} {fmt([r['rmse'] for r in rows], 1, 4):>16s} "
              f"{fmt([r['valid'] for r in rows], 100, 1):>12s} {fmt([r['train_s'] for r in rows], 1, 0):>9s}")
    gains = {}
    for cond in args.conditions:
        if {"plain", "orbit"} <= set(args.modes):
            a = [r["match_rate"] for r in results[f"{cond}/orbit"]]
            b = [r["match_rate"] for r in results[f"{cond}/plain"]]
            gains[cond] = statistics.mean(a) - statistics.mean(b)
    if gains:
        print("orbit - plain match rate (points): " + ", ".join(f"{c} {100 * g:+.1f}" for c, g in gains.items()))

    prop = None if args.no_props else property_experiment(args, base, train, test, models)
    summary = {
        "match_rate": {n: statistics.mean(r["match_rate"] for r in rows) for n, rows in results.items()},
        "rmse": {n: (statistics.mean(v) if (v := [r["rmse"] for r in rows if r["rmse"] is not None]) else None)
                 for n, rows in results.items()},
        "match_rate_per_seed": {n: [r["match_rate"] for r in rows] for n, rows in results.items()},
        "orbit_minus_plain": gains,
        "property": prop,
        "config": {**base, "seeds": args.seeds, "n_test": len(test), "n_train": len(train),
                   "long_text_train": n_long, "guidance": args.guidance},
    }
    atomic_write_json(os.path.join(args.out, "summary.json"), {"results": results, **summary})
    print(json.dumps(summary))
    return summary


def property_experiment(args, base, train, test, models) -> dict:
    """Generated structures' predicted heat_all / dir_gap vs the asked values (conditional vs unconditioned)."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.metrics import r2_score

    from orbit_pyg.integrations.crystal.condition import (
        PROPERTY_COLUMNS, PropertyNormalizer, attach_conditions, condition_vectors, property_values)
    from orbit_pyg.integrations.crystal.csp import CSPConfig, generate, train_csp

    names = list(PROPERTY_COLUMNS)
    y_train, y_test = property_values(train, names), property_values(test, names)
    t0 = time.time()
    x_train = np.array([features(d) for d in train])
    x_test = np.array([features(d) for d in test])
    regs, r2 = {}, {}
    for k, n in enumerate(names):
        ok = np.isfinite(y_train[:, k].numpy())
        regs[n] = HistGradientBoostingRegressor(random_state=0).fit(x_train[ok], y_train[ok, k].numpy())
        r2[n] = float(r2_score(y_test[:, k].numpy(), regs[n].predict(x_test)))
    print(f"\nproperty regressor (gradient boosting on composition + lattice + NN distances, {time.time() - t0:.0f} s): "
          f"held-out R² " + ", ".join(f"{n} {v:.3f}" for n, v in r2.items()), flush=True)

    normalizer = PropertyNormalizer(names).fit(y_train)
    seed = args.seeds[0]
    cfg = CSPConfig(**{**base, "mode": "orbit", "seed": seed, "condition": "props", "cond_props": names,
                       "cond_stats": normalizer.to_dict()})
    tr = attach_conditions(train, condition_vectors("props", len(train), props=y_train, normalizer=normalizer))
    t0 = time.time()
    model, _ = train_csp(tr, cfg, log_every=max(args.steps // 5, 1))
    print(f"props/orbit seed {seed}: trained in {time.time() - t0:.0f} s", flush=True)

    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(123))
    asks = {"own": y_test, "swapped": y_test[perm]}
    baseline = models.get(("none/orbit", seed)) or models.get(("none/plain", seed))
    out = {"regressor_r2": r2, "asked": {}}
    print(f"{'target':8s} {'samples':22s} " + " ".join(f"{'|Δ' + n + '|':>12s}" for n in names))
    for target, asked in asks.items():
        rows = {}
        cond = condition_vectors("props", len(test), props=asked, normalizer=normalizer)
        runs = {"props s=1": (model, cfg, cond, 1.0), f"props s={args.guidance:g}": (model, cfg, cond, args.guidance),
                "props null": (model, cfg, None, 1.0)}
        for label, (m, c, cc, w) in runs.items():
            gen = generate(m, test, c, seed=seed, cond=cc, guidance=w)
            rows[label] = _abs_err(gen, asked, regs, names)
        if baseline is not None:
            rows["unconditioned"] = _abs_err(baseline[2], asked, regs, names)
        for label, err in rows.items():
            print(f"{target:8s} {label:22s} " + " ".join(f"{err[n]:12.3f}" for n in names), flush=True)
        out["asked"][target] = rows
    return out


def _abs_err(generated, asked, regs, names) -> dict:
    import numpy as np

    x = np.array([features(d) for d in generated])
    err = {}
    for k, n in enumerate(names):
        target = asked[:, k].numpy()
        ok = np.isfinite(target)
        err[n] = float(np.mean(np.abs(regs[n].predict(x[ok]) - target[ok])))
    return err


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
