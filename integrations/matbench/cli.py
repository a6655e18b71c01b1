r"""``orbit-pyg matbench run``: the orbit-pretrained estimator through matbench, with progress bars.

Real matbench tasks (matbench downloads them through matminer; offline, give each task its data
file with ``--dataset-file TASK=PATH``, a matminer-style ``.json`` / ``.json.gz`` data frame in
matbench's row order, read with ``matminer.utils.io.load_dataframe_from_json``)::

    orbit-pyg matbench run --tasks matbench_jdft2d --out submission/ --authors "Jane Doe"
    orbit-pyg matbench run --tasks matbench_jdft2d --dataset-file matbench_jdft2d=jdft2d.json.gz --out sub/ --authors "Jane Doe"

A local matbench-style task from a CDVAE CSV (5 folds by matbench's rule)::

    orbit-pyg matbench run --local-csv ../shared/data/perov_5/val.csv --target heat_all --limit 500 --out runs/perov

The output folder gets ``results.json.gz`` (matbench's ``to_file``) and, with ``--authors``, the
leaderboard's ``info.json`` and a copy of the source files that produced the run (this package's
model / runner / offline / cli modules) plus ``command.txt`` with the exact command.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Optional, Sequence

__all__ = ["add_parser", "main"]


def _estimator_kwargs(args) -> dict:
    keys = ("hidden", "layers", "n_freq", "time_dim", "pretrain_steps", "finetune_steps", "batch_size", "lr",
            "translations", "proposal", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _benchmark(args):
    from .offline import assign_task_df, perovskite_task

    if args.local_csv:
        from .offline import LocalMatbenchBenchmark

        return LocalMatbenchBenchmark([perovskite_task(args.local_csv, args.target, limit=args.limit, seed=args.seed or 0,
                                                       name=args.name)])
    from matbench.bench import MatbenchBenchmark

    mb = MatbenchBenchmark(autoload=False, subset=args.tasks)
    for item in args.dataset_file or []:
        name, sep, path = item.partition("=")
        if not sep or name not in mb.tasks_map:
            raise SystemExit(f"--dataset-file expects TASK=PATH with TASK one of {list(mb.tasks_map)}, got {item!r}")
        from matminer.utils.io import load_dataframe_from_json

        task = mb.tasks_map[name]
        df = load_dataframe_from_json(path)
        input_key, target_key = task.metadata.input_type, task.metadata.target
        if set(df.index) >= {i for f in task.validation.values() for i in f["test"]}:
            assign_task_df(task, df)
        else:
            assign_task_df(task, df[input_key], df[target_key])
    return mb


def _restore(mb, path: str) -> int:
    """Copy the recorded folds of a saved ``results.json.gz`` into ``mb``'s tasks (same task names and fold ids)."""
    import json

    from matbench.util import RecursiveDotDict

    with open(path) as fh:
        saved = json.load(fh)["tasks"]
    count = 0
    for task in mb.tasks:
        results = saved.get(task.dataset_name, {}).get("results", {})
        for key, fold in results.items():
            if key in task.validation and set(fold.get("data", {})) == set(task.validation[key].test):
                task.results[key] = RecursiveDotDict(fold)
                count += 1
    return count


def _run(args) -> int:
    from .model import OrbitPretrainedEstimator
    from .runner import default_info, run_benchmark, write_results, write_submission

    if not args.local_csv and not args.tasks:
        raise SystemExit("give --tasks (matbench task names) or --local-csv (a CDVAE CSV)")
    if args.quiet:
        logging.getLogger("matbench").setLevel(logging.WARNING)
    mb = _benchmark(args)
    results_path = os.path.join(args.out, "results.json.gz")
    if args.resume and os.path.exists(results_path):
        print(f"resuming: {_restore(mb, results_path)} folds already recorded in {results_path}", file=sys.stderr)
    kwargs = _estimator_kwargs(args)

    def factory(task):
        return OrbitPretrainedEstimator(task.metadata.task_type, args.pretrain, **kwargs)

    def checkpoint(task, fold):
        write_results(mb, results_path)

    run_benchmark(mb, factory, progress=not args.quiet, on_fold=checkpoint)
    os.makedirs(args.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join(here, f) for f in ("model.py", "runner.py", "offline.py", "cli.py")]
    from orbit_pyg.io import atomic_write_text

    atomic_write_text(os.path.join(args.out, "command.txt"),
                      "orbit-pyg " + " ".join(shlex.quote(a) for a in (args.argv if args.argv is not None else sys.argv[1:])) + "\n")
    if args.authors:
        params = OrbitPretrainedEstimator("regression", args.pretrain, **kwargs).get_params()
        params.pop("task_type", None)
        overrides = {"authors": args.authors}
        if args.algorithm:
            overrides["algorithm"] = args.algorithm
        write_submission(mb, args.out, info=default_info(params, **overrides), script=sources)
    else:
        write_results(mb, results_path)
        print("no --authors: wrote results.json.gz only (info.json needs authors)", file=sys.stderr)
    for task in mb.tasks:
        scores = task.scores
        metric = "mae" if task.metadata.task_type == "regression" else "rocauc"
        print(f"{task.dataset_name}: {metric} {scores[metric]['mean']:.4f} ± {scores[metric]['std']:.4f} "
              f"over {len(task.folds)} folds -> {args.out}")
    return 0


def add_parser(doors) -> argparse.ArgumentParser:
    """Add ``matbench run`` to the ``orbit-pyg`` subparsers ``doors``; returns the ``matbench`` parser."""
    door = doors.add_parser("matbench", help="run the orbit-pretrained encoder through matbench")
    cmds = door.add_subparsers(dest="command", required=True)
    run = cmds.add_parser("run", help="fit / predict / record every fold; write the leaderboard folder")
    src = run.add_argument_group("tasks")
    src.add_argument("--tasks", nargs="+", help="matbench v0.1 structure task names, e.g. matbench_jdft2d")
    src.add_argument("--dataset-file", action="append", metavar="TASK=PATH",
                     help="offline data for TASK: a matminer json(.gz) data frame in matbench's row order")
    src.add_argument("--local-csv", help="a CDVAE CSV turned into a local 5-fold task instead")
    src.add_argument("--target", default="heat_all", help="property column of --local-csv")
    src.add_argument("--limit", type=int, help="seeded random subset of --local-csv rows")
    src.add_argument("--name", default="local_perov5", help="name of the --local-csv task")
    run.add_argument("--out", required=True, help="output folder (results.json.gz, info.json, sources)")
    run.add_argument("--authors", help="info.json authors (required for info.json)")
    run.add_argument("--algorithm", help="info.json short algorithm name (5-15 characters)")
    model = run.add_argument_group("model")
    model.add_argument("--pretrain", default="orbit", choices=["off", "plain", "augment", "orbit"])
    model.add_argument("--hidden", type=int)
    model.add_argument("--layers", type=int)
    model.add_argument("--n-freq", dest="n_freq", type=int)
    model.add_argument("--time-dim", dest="time_dim", type=int)
    model.add_argument("--pretrain-steps", dest="pretrain_steps", type=int)
    model.add_argument("--finetune-steps", dest="finetune_steps", type=int)
    model.add_argument("--batch-size", dest="batch_size", type=int)
    model.add_argument("--lr", type=float)
    model.add_argument("--translations", type=int, help="K torus candidates of the orbit target")
    model.add_argument("--proposal", choices=["uniform", "wrapped_normal"])
    model.add_argument("--seed", type=int)
    run.add_argument("--resume", action="store_true", help="keep the folds already recorded in OUT/results.json.gz")
    run.add_argument("--quiet", action="store_true", help="no progress bars or matbench INFO logs")
    run.set_defaults(func=_run, argv=None)
    return door


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``orbit-pyg``-style entry point with only the matbench door (the project CLI wires :func:`add_parser`)."""
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
