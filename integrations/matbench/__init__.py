"""matbench integration of orbit_pyg: an orbit-pretrained crystal encoder as a matbench baseline.

Installed as ``orbit_pyg.integrations.matbench``. matbench 0.6 (installed with ``--no-deps``
beside current matminer / scikit-learn / monty) is imported lazily, only by the functions that
need it.

* :class:`OrbitPretrainedEstimator` (:mod:`.model`): ``fit(structures, targets)`` /
  ``predict(structures)``; CSPNet encoder, pretraining off / plain / orbit, MLP head.
* :func:`run_benchmark`, :func:`write_submission` (:mod:`.runner`): loop a ``MatbenchBenchmark``'s
  tasks and folds with matbench's API, write ``results.json.gz`` + ``info.json`` + the script.
* :func:`assign_task_df`, :func:`local_task`, :func:`perovskite_task`,
  ``LocalMatbenchTask`` / ``LocalMatbenchBenchmark`` (:mod:`.offline`): offline use.
* ``orbit-pyg matbench run ...`` (:mod:`.cli`).
"""
from .model import (
    PRETRAIN_MODES,
    TASK_TYPES,
    OrbitPretrainedEstimator,
    PropertyModel,
    UnfeaturizableStructureError,
    encode,
    structures_to_data,
)
from .offline import (
    LOCAL_BENCHMARK,
    assign_task_df,
    local_folds,
    local_task,
    matbench_ids,
    matbench_split_settings,
    perovskite_task,
)
from .runner import INFO_FIELDS, default_info, requirements, run_benchmark, write_results, write_submission

__all__ = [
    "OrbitPretrainedEstimator",
    "PropertyModel",
    "UnfeaturizableStructureError",
    "encode",
    "structures_to_data",
    "PRETRAIN_MODES",
    "TASK_TYPES",
    "assign_task_df",
    "local_folds",
    "local_task",
    "matbench_ids",
    "matbench_split_settings",
    "perovskite_task",
    "LocalMatbenchTask",
    "LocalMatbenchBenchmark",
    "LOCAL_BENCHMARK",
    "run_benchmark",
    "write_submission",
    "write_results",
    "default_info",
    "requirements",
    "INFO_FIELDS",
]


def __getattr__(name: str):
    if name in ("LocalMatbenchTask", "LocalMatbenchBenchmark"):
        from . import offline

        return getattr(offline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
