"""5-fold MAE on a matbench-style Perov-5 task: mean predictor vs the CSPNet encoder with no / plain / orbit pretraining.

The task is built offline from a CDVAE CSV (default ``../shared/data/perov_5/val.csv``, target
``heat_all``) with matbench's fold rule (``KFold(5, shuffle=True, random_state=18012019)``), and
every variant goes through the same matbench machinery (:func:`run_benchmark`: fit on
``get_train_and_val_data``, ``record`` the test predictions, matbench scores and validates):

* ``dummy``: the training-fold mean (scikit-learn's ``DummyRegressor(strategy="mean")``, matbench's
  dummy baseline);
* ``no_pretrain``: encoder + head fine-tuned from random initialization;
* ``plain``: the same after ``--pretrain-steps`` of DiffCSP denoising on the fold's training structures;
* ``orbit``: the same with the orbit (Rao-Blackwellized translation) denoising target;
* ``no_pretrain_long`` (optional control, ``--variants``): no pretraining, fine-tuned for
  ``--pretrain-steps + --finetune-steps`` steps, the pretrained variants' total step count.

Every neural variant has the same model, seed, data order and ``--finetune-steps``; the two
pretrained variants have the same ``--pretrain-steps``. Printed: a table (mean ± std over the 5
folds, from matbench's own per-fold scores) and ratios to the dummy measured in this run; the last
line is one JSON object with ``mae`` keyed by variant.

    python benchmarks/matbench_perovskites.py --quick
    python benchmarks/matbench_perovskites.py --limit 1500 --pretrain-steps 600 --finetune-steps 600
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from orbit_pyg.integrations.matbench import (
    LocalMatbenchBenchmark,
    OrbitPretrainedEstimator,
    local_task,
    perovskite_task,
    run_benchmark,
    write_results,
)

VARIANTS = ("dummy", "no_pretrain", "plain", "orbit")
#: Optional control: no pretraining, fine-tuned for pretrain + finetune steps (the same number of
#: optimizer steps as the pretrained variants in total).
CONTROLS = ("no_pretrain_long",)


class MeanPredictor:
    """matbench's dummy regressor: predicts the mean of the training targets (scikit-learn DummyRegressor)."""

    def fit(self, structures, targets):
        from sklearn.dummy import DummyRegressor

        y = np.asarray(getattr(targets, "values", targets), dtype=np.float64)
        self.model_ = DummyRegressor(strategy="mean").fit(np.zeros((len(y), 1)), y)
        return self

    def predict(self, structures):
        return self.model_.predict(np.zeros((len(structures), 1)))

    def get_params(self):
        return {"strategy": "mean"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/perov_5/val.csv")
    p.add_argument("--target", default="heat_all")
    p.add_argument("--limit", type=int, default=None, help="seeded random subset of rows (default: all)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--n-freq", type=int, default=8)
    p.add_argument("--time-dim", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--finetune-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--translations", type=int, default=256, help="K torus candidates of the orbit target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + CONTROLS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/matbench_perovskites", help="per-variant results.json.gz folder")
    p.add_argument("--quick", action="store_true", help="smoke run: 60 rows, tiny model, a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.hidden, args.layers, args.n_freq, args.time_dim = 60, 16, 1, 4, 8
        args.pretrain_steps = args.finetune_steps = 5
        args.batch_size, args.translations = 16, 16
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("matbench").setLevel(logging.WARNING)  # one INFO line per recorded fold otherwise
    t0 = time.time()
    base = perovskite_task(args.data, args.target, limit=args.limit, seed=args.seed)
    structures, targets = base.df["structure"], base.df[args.target]
    print(f"task: {base.dataset_name}, {len(base.df)} structures, target {args.target!r}, "
          f"loaded in {time.time() - t0:.1f}s", flush=True)
    common = dict(hidden=args.hidden, layers=args.layers, n_freq=args.n_freq, time_dim=args.time_dim,
                  pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                  batch_size=args.batch_size, lr=args.lr, translations=args.translations, seed=args.seed)
    results, seconds = {}, {}
    for variant in args.variants:
        task = local_task(f"perov5_{variant}", structures, targets, target_name=args.target, ids=list(base.df.index))
        mb = LocalMatbenchBenchmark([task])
        if variant == "dummy":
            factory = lambda task: MeanPredictor()  # noqa: E731
        elif variant == "no_pretrain_long":
            long = dict(common, finetune_steps=args.pretrain_steps + args.finetune_steps)
            factory = lambda task: OrbitPretrainedEstimator("regression", None, **long)  # noqa: E731
        else:
            pretrain = {"no_pretrain": None, "plain": "plain", "orbit": "orbit"}[variant]
            factory = lambda task, pretrain=pretrain: OrbitPretrainedEstimator("regression", pretrain, **common)  # noqa: E731
        start = time.time()
        run_benchmark(mb, factory, progress=False)
        seconds[variant] = time.time() - start
        folds = [float(task.results[k].scores.mae) for k in task.folds_keys]
        results[variant] = {"mean": float(np.mean(folds)), "std": float(np.std(folds)), "folds": folds}
        write_results(mb, os.path.join(args.out, variant, "results.json.gz"))
        print(f"{variant:12s} MAE {results[variant]['mean']:.4f} ± {results[variant]['std']:.4f} "
              f"(folds {', '.join(f'{x:.4f}' for x in folds)}) [{seconds[variant]:.0f}s]", flush=True)
    print("\n| variant | 5-fold MAE (mean ± std) | / dummy | seconds |\n|---|---|---|---|")
    for v, r in results.items():
        ratio = r["mean"] / results["dummy"]["mean"] if "dummy" in results else float("nan")
        print(f"| {v} | {r['mean']:.4f} ± {r['std']:.4f} | {ratio:.3f} | {seconds[v]:.0f} |")
    out = {"benchmark": "matbench_perovskites", "n_structures": len(base.df), "target": args.target,
           "config": {**common, "limit": args.limit, "quick": args.quick},
           "mae": {v: r["mean"] for v, r in results.items()},
           "mae_std": {v: r["std"] for v, r in results.items()},
           "mae_folds": {v: r["folds"] for v, r in results.items()},
           "ratio_to_dummy": ({v: r["mean"] / results["dummy"]["mean"] for v, r in results.items()}
                              if "dummy" in results else {}),
           "seconds": seconds}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
