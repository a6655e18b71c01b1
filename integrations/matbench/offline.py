r"""matbench without the internet: assign a task's ``df`` yourself, or build a matbench-style task locally.

**Real matbench tasks offline.** ``MatbenchBenchmark(autoload=False)`` needs no network: the task
list, metadata and the fixed 5-fold splits ship inside the matbench package. Only ``task.load()``
downloads (through matminer). When that is impossible, give each task its data frame directly::

    mb = MatbenchBenchmark(autoload=False, subset=["matbench_jdft2d"])
    task = mb.matbench_jdft2d
    assign_task_df(task, structures, targets)   # in matbench's row order, or a DataFrame indexed by mb ids
    # equivalently, by hand: task.df = df  (index: "mb-jdft2d-001", ...; columns "structure", task target)

``structures`` / ``targets`` must be the task's full dataset in matbench's order (the order of
``matminer.datasets.load_dataset(name)``). If you have matminer's own file of the dataset (e.g.
``matbench_jdft2d.json.gz`` copied from a machine with internet), put it in a folder and set the
environment variable ``MATMINER_DATA`` to it: matminer then finds it, checks its hash and
``task.load()`` works without the network. The row ids matbench uses are
``"{prefix}-{i + 1:0{width}d}"`` (:func:`matbench_ids`), exactly as ``matbench.data_ops.load`` builds
them, and :func:`assign_task_df` checks that every id of every fold is present.

**Local tasks.** :func:`local_task` turns any structure/target table into a
:class:`LocalMatbenchTask`: a real ``MatbenchTask`` subclass (``folds``,
``get_train_and_val_data``, ``get_test_data``, ``record``, ``is_recorded``, ``validate``,
``scores`` are matbench's own code) whose splits are built by matbench's rule,
``KFold(n_splits=5, shuffle=True, random_state=18012019)`` over the rows in table order (read from
the ``metadata`` of matbench's own validation file; for regression this reproduces the published
matbench v0.1 folds exactly, see the tests), ``StratifiedKFold`` with the same settings for
classification (matbench's classification folds are not plain ``KFold`` ones; that they are
exactly this stratified split cannot be checked without the labels, so local classification
folds follow the rule, not necessarily matbench's published lists). :class:`LocalMatbenchBenchmark` holds such tasks and is a ``MatbenchBenchmark``
(``validate``, ``scores``, ``as_dict`` / ``to_file``). :func:`perovskite_task` builds one from a
CDVAE CSV (default: Perov-5 with ``heat_all``)::

    task = perovskite_task("../shared/data/perov_5/val.csv", target="heat_all")
    mb = LocalMatbenchBenchmark([task])
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "matbench_ids",
    "matbench_split_settings",
    "assign_task_df",
    "local_folds",
    "local_task",
    "perovskite_task",
    "LOCAL_BENCHMARK",
]

#: ``benchmark_name`` of local tasks (matbench only knows ``"matbench_v0.1"``; local results are
#: kept apart so they can never be mistaken for, or validated against, the official splits).
LOCAL_BENCHMARK = "local"


def matbench_ids(name: str, n: int) -> list[str]:
    r"""The row ids matbench gives a dataset of ``n`` rows: ``mb-<name>-<i+1>``, zero-padded.

    Same rule as ``matbench.data_ops.load``: prefix ``name`` with ``matbench`` → ``mb`` and
    ``_`` → ``-``; width ``floor(log10 n) + 1``.

    Example:
        >>> matbench_ids("matbench_jdft2d", 636)[:2]
        ['mb-jdft2d-001', 'mb-jdft2d-002']
    """
    if int(n) < 1:
        raise ValueError(f"`n` must be a positive number of rows, got {n}")
    width = math.floor(math.log(n, 10)) + 1
    prefix = name.replace("matbench", "mb").replace("_", "-")
    return [f"{prefix}-{i + 1:0{width}d}" for i in range(n)]


def matbench_split_settings() -> dict:
    """matbench's cross-validation settings, read from its validation file (``n_splits``, ``shuffle``, ``random_state``)."""
    from matbench.metadata import mbv01_validation

    return dict(mbv01_validation.metadata)


def local_folds(ids: Sequence[str], task_type: str = "regression", labels: Optional[Sequence[Any]] = None) -> dict:
    r"""matbench-style folds ``{"fold_k": {"train": [...], "test": [...]}}`` over ``ids`` (in order).

    ``KFold(**matbench_split_settings())`` for regression — on matbench's own id lists this
    reproduces the official v0.1 splits — and ``StratifiedKFold`` with the same settings on
    ``labels`` for classification.

    Example:
        >>> folds = local_folds([f"x-{i}" for i in range(10)])
        >>> sorted(folds), len(folds["fold_0"]["test"])
        (['fold_0', 'fold_1', 'fold_2', 'fold_3', 'fold_4'], 2)
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    ids = list(ids)
    settings = matbench_split_settings()
    if len(ids) < settings["n_splits"]:
        raise ValueError(f"a {settings['n_splits']}-fold task needs at least {settings['n_splits']} rows, got {len(ids)}")
    if task_type == "classification":
        if labels is None:
            raise ValueError("classification folds are stratified: pass `labels`")
        splits = StratifiedKFold(**settings).split(ids, np.asarray(labels))
    elif task_type == "regression":
        splits = KFold(**settings).split(ids)
    else:
        raise ValueError(f"`task_type` must be 'regression' or 'classification', got {task_type!r}")
    return {f"fold_{k}": {"train": [ids[i] for i in tr], "test": [ids[i] for i in te]}
            for k, (tr, te) in enumerate(splits)}


def _frame(structures: Any, targets: Any, ids: Sequence[str], input_key: str, target_key: str):
    import pandas as pd

    structures = list(getattr(structures, "values", structures))
    targets = list(getattr(targets, "values", targets))
    if len(structures) != len(targets):
        raise ValueError(f"`structures` ({len(structures)}) and `targets` ({len(targets)}) differ in length")
    if len(structures) != len(ids):
        raise ValueError(f"expected {len(ids)} rows (the task's size), got {len(structures)}")
    return pd.DataFrame({input_key: structures, target_key: targets}, index=pd.Index(list(ids), name="mbid"))


def assign_task_df(task: Any, structures: Any, targets: Any = None) -> Any:
    r"""Give a ``MatbenchTask`` its data without downloading: ``task.df = <input, target frame>``.

    Args:
        task: a task of ``MatbenchBenchmark(autoload=False)`` (or a :class:`LocalMatbenchTask`).
        structures: either a ``pandas.DataFrame`` indexed by matbench ids holding the task's input
            and target columns, or the inputs of the task's full dataset in matbench's row order.
        targets: the targets in the same order (when ``structures`` is not a DataFrame).

    Returns the task. Raises ``ValueError`` when a fold id is missing or the columns are wrong.
    """
    import pandas as pd

    md = task.metadata
    input_key, target_key = md["input_type"], md["target"]
    all_ids = sorted({i for fold in task.validation.values() for part in ("train", "test") for i in fold[part]})
    if isinstance(structures, pd.DataFrame):
        df = structures
        missing_cols = [c for c in (input_key, target_key) if c not in df.columns]
        if missing_cols:
            raise ValueError(f"the DataFrame for {task.dataset_name} needs columns {[input_key, target_key]}; "
                             f"missing {missing_cols} (has {list(df.columns)})")
        df = df[[input_key, target_key]]
    else:
        if targets is None:
            raise ValueError("pass `targets` with a list of structures (or a DataFrame with both columns)")
        df = _frame(structures, targets, matbench_ids(task.dataset_name, len(all_ids)), input_key, target_key)
    missing = sorted(set(all_ids) - set(df.index))
    if missing:
        raise ValueError(f"{len(missing)} ids of {task.dataset_name}'s folds are not in the data "
                         f"(first: {missing[:3]}); the task has {len(all_ids)} rows, the data {len(df)}")
    task.df = df
    return task


def _make_local_task_class():
    from matbench.task import MatbenchTask
    from matbench.util import RecursiveDotDict

    class LocalMatbenchTask(MatbenchTask):
        r"""A ``MatbenchTask`` over a local table, with matbench-rule folds (see :func:`local_task`).

        Everything but construction is matbench's own code: ``get_train_and_val_data``,
        ``get_test_data``, ``record`` (scored with matbench's metrics), ``is_recorded``,
        ``validate``, ``scores``, ``as_dict``.
        """

        def __init__(self, name: str, df: Any, target: str, task_type: str = "regression",
                     input_type: str = "structure", unit: Optional[str] = None, info: str = ""):
            if task_type not in ("regression", "classification"):
                raise ValueError(f"`task_type` must be 'regression' or 'classification', got {task_type!r}")
            self.dataset_name = name
            self.df = df
            self.info = info or f"local task {name}: {len(df)} rows, target {target!r}"
            self.benchmark_name = LOCAL_BENCHMARK
            y = df[target].to_numpy()
            labels = y if task_type == "classification" else None
            mad = float(np.mean(np.abs(y - y.mean()))) if task_type == "regression" else None
            self.metadata = RecursiveDotDict({"input_type": input_type, "target": target, "task_type": task_type,
                                              "n_samples": len(df), "mad": mad, "unit": unit})
            self.validation = RecursiveDotDict(local_folds(list(df.index), task_type, labels))
            self.folds_keys = list(self.validation.keys())
            self.folds_nums = list(range(len(self.folds_keys)))
            self.folds_map = dict(zip(self.folds_nums, self.folds_keys))
            self.folds = self.folds_nums
            self.results = RecursiveDotDict({})

        def load(self):
            """A local task always holds its data (nothing to download)."""

    return LocalMatbenchTask


def _make_local_benchmark_class():
    from matbench.bench import MatbenchBenchmark
    from matbench.util import RecursiveDotDict

    class LocalMatbenchBenchmark(MatbenchBenchmark):
        r"""A ``MatbenchBenchmark`` holding :class:`LocalMatbenchTask` objects (``validate``, ``scores``, ``to_file``).

        Example:
            >>> mb = LocalMatbenchBenchmark([task])  # doctest: +SKIP
            >>> mb.validate()  # after recording every fold  # doctest: +SKIP
            {}
        """

        def __init__(self, tasks: Sequence[Any]):
            # ``metadata`` first: MatbenchBenchmark.__getattr__ reads it.
            self.metadata = RecursiveDotDict({t.dataset_name: dict(t.metadata) for t in tasks})
            self.benchmark_name = LOCAL_BENCHMARK
            self.user_metadata = {}
            self.tasks_map = RecursiveDotDict()
            for t in tasks:
                if t.dataset_name in self.tasks_map:
                    raise ValueError(f"two tasks are named {t.dataset_name!r}")
                self.tasks_map[t.dataset_name] = t

    return LocalMatbenchBenchmark


def __getattr__(name: str):
    # ``LocalMatbenchTask`` / ``LocalMatbenchBenchmark`` subclass matbench's classes; they are built
    # on first access so that importing this package does not import matbench (and matminer).
    if name == "LocalMatbenchTask":
        cls = _make_local_task_class()
    elif name == "LocalMatbenchBenchmark":
        cls = _make_local_benchmark_class()
    else:
        raise AttributeError(name)
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


def local_task(name: str, structures: Any, targets: Any, *, task_type: str = "regression",
               target_name: str = "target", ids: Optional[Sequence[str]] = None, unit: Optional[str] = None) -> Any:
    r"""A matbench-style 5-fold :class:`LocalMatbenchTask` from any structure/target table.

    Args:
        name: task name (also the id prefix: ``matbench_ids(name, n)`` unless ``ids`` is given).
        structures: pymatgen structures (list or pandas Series), one per row.
        targets: numbers (regression) or booleans (classification), one per row.
        task_type: ``"regression"`` or ``"classification"``.
        target_name: the target column's name (as in matbench's metadata ``target``).
        ids: row ids (default :func:`matbench_ids`); the folds split the rows in this order.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> xs = [Structure(Lattice.cubic(3 + 0.1 * i), ["Cs"], [[0, 0, 0]]) for i in range(10)]
        >>> task = local_task("toy", xs, [float(i) for i in range(10)])
        >>> train_x, train_y = task.get_train_and_val_data(0)
        >>> len(train_x), len(task.get_test_data(0))
        (8, 2)
    """
    structures = list(getattr(structures, "values", structures))
    ids = list(ids) if ids is not None else matbench_ids(name, len(structures))
    if len(set(ids)) != len(ids):
        raise ValueError("`ids` must be unique")
    if task_type == "classification":
        targets = [bool(t) for t in getattr(targets, "values", targets)]
    else:
        targets = [float(t) for t in getattr(targets, "values", targets)]
    df = _frame(structures, targets, ids, "structure", target_name)
    return __getattr__("LocalMatbenchTask")(name, df, target_name, task_type, unit=unit)


def perovskite_task(path: str = "../shared/data/perov_5/val.csv", target: str = "heat_all", *,
                    limit: Optional[int] = None, seed: int = 0, name: str = "local_perov5") -> Any:
    r"""Perov-5 (or any CDVAE CSV) as a local matbench regression task on ``target``.

    Rows are read with :func:`orbit_pyg.integrations.crystal.read_cdvae_csv`, CIFs parsed by
    pymatgen; ``limit`` keeps a seeded random subset of that many rows (in file order). The row id
    is the CSV's ``material_id``.
    """
    from pymatgen.core import Structure

    from ..crystal.data import read_cdvae_csv

    rows, _ = read_cdvae_csv(path, [target])
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=int(limit), replace=False))
        rows = [rows[i] for i in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about CIF rounding
        structures = [Structure.from_str(r["cif"], fmt="cif") for r in rows]
    values = [float(r[target]) for r in rows]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} rows have no {target!r} value (first row {bad[0]})")
    ids = [f"{name}-{r['material_id']}" for r in rows]
    return local_task(name, structures, values, target_name=target, ids=ids)
