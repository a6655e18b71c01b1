"""matbench door: an orbit-pretrained CSPNet as a matbench v0.1 baseline, submission folder included.

1. Benchmark: ``MatbenchBenchmark(autoload=False, subset=[...])`` (structure tasks only). matbench
   downloads each task's data through matminer on first use; on a machine without the internet,
   pass ``--dataset-file TASK=PATH`` (a matminer ``.json`` / ``.json.gz`` data frame of the task in
   matbench's row order) and the script assigns ``task.df`` itself (``assign_task_df``).
   ``--local-csv`` instead builds a matbench-style 5-fold task from a CDVAE CSV (default target
   ``heat_all`` of Perov-5), with matbench's own fold rule.
2. Model: for each fold a fresh ``OrbitPretrainedEstimator``: the CSPNet encoder is pretrained on the
   fold's training structures with the orbit denoising objective (``--pretrain plain`` / ``off``
   for the ablations), then fine-tuned with an MLP head on the targets.
3. Output: ``run_benchmark`` records every fold with ``task.record`` and checks ``mb.validate()``;
   ``write_submission`` writes ``results.json.gz`` (matbench's ``to_file``), ``info.json`` (every
   field of matbench's submission guide) and a copy of this script into ``--out``.

Run: ``python examples/matbench_baseline.py --local-csv ../shared/data/perov_5/val.csv --limit 400``
(a couple of minutes on 2 cores), ``--quick`` for a smoke run, or
``python examples/matbench_baseline.py --tasks matbench_jdft2d --authors "Your Name"`` with the internet.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from orbit_pyg.integrations.matbench import (
    LocalMatbenchBenchmark,
    OrbitPretrainedEstimator,
    assign_task_df,
    default_info,
    perovskite_task,
    run_benchmark,
    write_submission,
)


def benchmark(args):
    if args.local_csv:
        return LocalMatbenchBenchmark([perovskite_task(args.local_csv, args.target, limit=args.limit)])
    from matbench.bench import MatbenchBenchmark
    from matminer.utils.io import load_dataframe_from_json

    mb = MatbenchBenchmark(autoload=False, subset=args.tasks)
    for item in args.dataset_file:
        name, _, path = item.partition("=")
        task = mb.tasks_map[name]
        df = load_dataframe_from_json(path)
        assign_task_df(task, df[task.metadata.input_type], df[task.metadata.target])
    return mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["matbench_jdft2d"])
    p.add_argument("--dataset-file", action="append", default=[], metavar="TASK=PATH")
    p.add_argument("--local-csv", default=None)
    p.add_argument("--target", default="heat_all")
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--pretrain", default="orbit", choices=["off", "plain", "orbit"])
    p.add_argument("--steps", type=int, default=300, help="pretraining and fine-tuning steps (each)")
    p.add_argument("--authors", default="orbit_pyg example")
    p.add_argument("--out", default="outputs/matbench_baseline")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.local_csv = args.local_csv or "../shared/data/perov_5/val.csv"
        args.limit, args.steps = 60, 5
    torch.set_num_threads(1)
    logging.getLogger("matbench").setLevel(logging.WARNING)

    mb = benchmark(args)
    settings = dict(hidden=64, layers=3, n_freq=8, time_dim=32, pretrain_steps=args.steps,
                    finetune_steps=args.steps, batch_size=64, translations=256)
    run_benchmark(mb, lambda task: OrbitPretrainedEstimator(task.metadata.task_type, args.pretrain, **settings))
    params = OrbitPretrainedEstimator("regression", args.pretrain, **settings).get_params()
    paths = write_submission(mb, args.out, info=default_info(params, authors=args.authors),
                             script=os.path.abspath(__file__))
    for task in mb.tasks:
        metric = "mae" if task.metadata.task_type == "regression" else "rocauc"
        s = task.scores[metric]
        print(f"{task.dataset_name}: {metric} {s['mean']:.4f} ± {s['std']:.4f} over {len(task.folds)} folds")
    print(f"submission folder: {os.path.dirname(paths['results'])} ({', '.join(sorted(os.listdir(args.out)))})")


if __name__ == "__main__":
    main()
