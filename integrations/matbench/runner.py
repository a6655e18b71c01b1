r"""Run an estimator through a matbench benchmark and write the leaderboard submission folder.

:func:`run_benchmark` drives matbench's own API: for each task of a ``MatbenchBenchmark``
(``autoload=False``; data from ``task.load()`` or assigned offline, see :mod:`.offline`) and each
fold, ``task.get_train_and_val_data(fold)`` → ``estimator.fit`` → ``task.get_test_data(fold)`` →
``estimator.predict`` → ``task.record(fold, predictions, params=...)``; at the end
``mb.validate()`` must return no errors. Folds already recorded are skipped, so an interrupted
run resumes from a saved benchmark.

:func:`write_submission` writes matbench's leaderboard layout into one folder:

* ``results.json.gz``: ``mb.to_file`` (matbench 0.6 writes the JSON text under this name; its
  ``MatbenchBenchmark.from_file`` reads it back and re-checks the hash and every fold);
* ``info.json``: the fields matbench's submission guide requires, ``authors``, ``algorithm``
  (5-15 characters), ``algorithm_long``, ``bibtex_refs``, ``notes``, ``requirements``
  (``{"python": ["pkg==version", ...]}`` including matbench);
* a copy of the script that produced the run.

Every file is written atomically (:mod:`orbit_pyg.io`).

Example::

    from matbench.bench import MatbenchBenchmark
    mb = MatbenchBenchmark(autoload=False, subset=["matbench_jdft2d"])
    run_benchmark(mb, lambda task: OrbitPretrainedEstimator(task.metadata.task_type, pretrain="orbit"))
    write_submission(mb, "submission/", authors="Jane Doe", script=__file__)
"""
from __future__ import annotations

import importlib.metadata
import os
import tempfile
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from orbit_pyg.io import atomic_copy, atomic_write_json

__all__ = ["run_benchmark", "write_submission", "write_results", "default_info", "requirements", "INFO_FIELDS"]

#: Keys matbench's submission guide requires in ``info.json``.
INFO_FIELDS = ("authors", "algorithm", "algorithm_long", "bibtex_refs", "notes", "requirements")

BIBTEX = [
    "@misc{orbitdiffusion2025,\n  title = {Rao-Blackwell Gradient Estimators for Equivariant Denoising Diffusion},\n"
    "  year = {2025},\n  eprint = {2502.09890},\n  archivePrefix = {arXiv},\n  note = {NeurIPS 2025}\n}",
    "@inproceedings{diffcsp2023,\n  title = {Crystal Structure Prediction by Joint Equivariant Diffusion},\n"
    "  booktitle = {Advances in Neural Information Processing Systems},\n  year = {2023}\n}",
    "@article{Dunn2020,\n  doi = {10.1038/s41524-020-00406-3},\n  year = {2020},\n"
    "  author = {Alexander Dunn and Qi Wang and Alex Ganose and Daniel Dopp and Anubhav Jain},\n"
    "  title = {Benchmarking materials property prediction methods: the Matbench test set and Automatminer "
    "reference algorithm},\n  journal = {npj Computational Materials},\n  volume = {6},\n  number = {1}\n}",
]

_PACKAGES = ("orbit-pyg", "matbench", "torch", "torch_geometric", "pymatgen", "numpy", "scikit-learn", "matminer")


def requirements(packages: tuple = _PACKAGES) -> dict:
    """``{"python": ["name==version", ...]}`` of the installed packages (missing ones are left out)."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": pins}


def default_info(estimator_params: Optional[dict] = None, **overrides: Any) -> dict:
    """An ``info.json`` dict for the orbit-pretrained estimator; ``overrides`` replace any field (``authors`` has no default)."""
    params = estimator_params or {}
    pretrain = params.get("pretrain", "orbit")
    info = {
        "authors": "",
        "algorithm": f"OrbitCSP-{pretrain}"[:15],
        "algorithm_long": (
            "A DiffCSP CSPNet encoder (fully connected periodic message passing on Niggli-reduced cells) is "
            f"pretrained on each fold's training structures with a denoising diffusion objective ({pretrain}: "
            "'orbit' replaces the fractional-coordinate score target by its posterior mean over the orbit of "
            "periodic translations, Rao-Blackwellization as in arXiv 2502.09890; 'plain' is DiffCSP's target; "
            "'off' skips pretraining). The mean-pooled node embedding then feeds an MLP head, and encoder and "
            "head are fine-tuned on standardized targets (MSE) or class labels (binary cross-entropy)."),
        "bibtex_refs": list(BIBTEX),
        "notes": "Hyperparameters (identical on every fold, stored per fold in results.json.gz): "
                 + ", ".join(f"{k}={v}" for k, v in sorted(params.items())),
        "requirements": requirements(),
    }
    info.update(overrides)
    return info


def _check_info(info: dict) -> None:
    missing = [k for k in INFO_FIELDS if k not in info]
    if missing:
        raise ValueError(f"info.json needs the fields {list(INFO_FIELDS)}; missing {missing}")
    empty = [k for k in ("authors", "algorithm", "algorithm_long", "bibtex_refs") if not info[k]]
    if empty:
        raise ValueError(f"info.json fields {empty} must not be empty (matbench's leaderboard requires them)")
    if not 5 <= len(str(info["algorithm"])) <= 15:
        raise ValueError(f"info.json 'algorithm' should be 5-15 characters (matbench's guide), got {info['algorithm']!r}")
    req = info["requirements"]
    if not isinstance(req, dict) or not isinstance(req.get("python"), list):
        raise ValueError("info.json 'requirements' must be a dict like {'python': ['matbench==0.6', ...]}")


def _ensure_loaded(task: Any) -> None:
    if getattr(task, "df", None) is not None:
        return
    try:
        task.load()
    except Exception as err:  # noqa: BLE001 - matminer raises many kinds on a failed download
        raise RuntimeError(
            f"matbench could not load {task.dataset_name} ({type(err).__name__}: {err}). Without the internet, "
            "assign the task's data yourself: orbit_pyg.integrations.matbench.assign_task_df(task, structures, "
            "targets) or task.df = <DataFrame indexed by matbench ids>") from err


def run_benchmark(mb: Any, estimator_factory: Callable[[Any], Any], *, progress: bool = True,
                  params: Optional[Callable[[Any], dict]] = None, on_fold: Optional[Callable[[Any, int], None]] = None) -> Any:
    r"""Fit, predict and ``record`` every fold of every task of ``mb``; returns ``mb`` (validated).

    Args:
        mb: a ``MatbenchBenchmark`` (``autoload=False``) or :class:`~.offline.LocalMatbenchBenchmark`.
        estimator_factory: ``task -> estimator`` with ``fit(structures, targets)`` and
            ``predict(structures)``; called once per fold (a fresh model per fold).
        progress: tqdm bars over tasks and folds.
        params: ``estimator -> dict`` stored with each fold (default: ``estimator.get_params()``
            when it exists).
        on_fold: called as ``on_fold(task, fold)`` after each recorded fold (e.g. to checkpoint
            ``mb.to_file``).

    Raises:
        ValueError: a composition task (this encoder reads structures), non-finite predictions,
            or a benchmark that matbench's ``validate`` rejects.
    """
    from tqdm.auto import tqdm

    tasks = list(mb.tasks)
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        if task.metadata.input_type != "structure":
            raise ValueError(f"{task.dataset_name} is a {task.metadata.input_type} task; this runner's estimators "
                             "read crystal structures (use a structure task)")
        _ensure_loaded(task)
        todo = [f for f in task.folds if not task.is_recorded[f]]
        for fold in tqdm(todo, desc=task.dataset_name, leave=False, disable=not progress):
            train_inputs, train_outputs = task.get_train_and_val_data(fold)
            estimator = estimator_factory(task)
            estimator.fit(train_inputs, train_outputs)
            test_inputs = task.get_test_data(fold, include_target=False)
            predictions = np.asarray(estimator.predict(test_inputs), dtype=np.float64).reshape(-1)
            if predictions.shape[0] != len(test_inputs):
                raise ValueError(f"{task.dataset_name} fold {fold}: {predictions.shape[0]} predictions for "
                                 f"{len(test_inputs)} test structures")
            if not np.isfinite(predictions).all():
                raise ValueError(f"{task.dataset_name} fold {fold}: {int((~np.isfinite(predictions)).sum())} "
                                 "non-finite predictions")
            fold_params = params(estimator) if params else getattr(estimator, "get_params", dict)()
            task.record(fold, predictions, params=fold_params)
            if on_fold is not None:
                on_fold(task, fold)
    errors = mb.validate()
    if errors:
        raise ValueError("matbench's validation rejected the benchmark:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items()))
    return mb


def write_results(mb: Any, path: str) -> str:
    """``mb.to_file(path)`` made atomic: matbench serializes into a staging folder, then the file is moved into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".mb-") as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        mb.to_file(staged)
        atomic_copy(staged, path)
    return path


def write_submission(mb: Any, out_dir: str, *, info: Optional[dict] = None,
                     script: Union[None, str, Sequence[str]] = None, **info_fields: Any) -> dict:
    r"""Write ``results.json.gz`` (``mb.to_file``), ``info.json`` and the producing script(s) into ``out_dir``.

    Args:
        mb: a recorded, valid benchmark.
        info: the full ``info.json`` dict (default :func:`default_info` with ``info_fields``).
        script: path(s) of the source file(s) to copy (basenames kept); ``None`` copies nothing.
        info_fields: ``authors=...`` etc. when ``info`` is not given.

    Returns ``{"results": path, "info": path, "scripts": [paths]}``.

    Raises:
        ValueError: a required ``info.json`` field is missing or empty, or matbench's
            ``validate`` rejects the benchmark.
    """
    if info is None:
        info = default_info(**info_fields)
    _check_info(info)
    errors = mb.validate()
    if errors:
        raise ValueError("refusing to write a benchmark that matbench's validation rejects: " + ", ".join(errors))
    paths = {"results": write_results(mb, os.path.join(out_dir, "results.json.gz")),
             "info": os.path.join(out_dir, "info.json"), "scripts": []}
    atomic_write_json(paths["info"], info)
    for src in ([script] if isinstance(script, str) else list(script or [])):
        dst = os.path.join(out_dir, os.path.basename(src))
        if os.path.abspath(src) != os.path.abspath(dst):
            atomic_copy(src, dst)
        paths["scripts"].append(dst)
    return paths
