"""The matbench door: offline tasks, the runner against matbench's own validation, the estimator, the CLI."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("matbench")
pymatgen_core = pytest.importorskip("pymatgen.core")
Lattice, Structure = pymatgen_core.Lattice, pymatgen_core.Structure

from orbit_pyg.integrations.matbench import (  # noqa: E402
    INFO_FIELDS,
    LocalMatbenchBenchmark,
    OrbitPretrainedEstimator,
    UnfeaturizableStructureError,
    assign_task_df,
    local_folds,
    local_task,
    matbench_ids,
    run_benchmark,
    structures_to_data,
    write_submission,
)

logging.getLogger("matbench").setLevel(logging.WARNING)

TINY = dict(hidden=8, layers=1, n_freq=2, time_dim=4, pretrain_steps=2, finetune_steps=2, batch_size=32,
            translations=4, diffusion_steps=50, niggli=False)
SPECIES = [("Sr", "Ti"), ("Ba", "Ti"), ("Ca", "Zr"), ("K", "Nb"), ("Na", "Ta")]


def perovskites(n: int, seed: int = 0) -> tuple[list, np.ndarray]:
    """Cubic ABO3 cells with random species and lattice constant; target = lattice constant (Å)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        a_site, b_site = SPECIES[rng.integers(len(SPECIES))]
        a = float(rng.uniform(3.6, 4.4))
        coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
        xs.append(Structure(Lattice.cubic(a), [a_site, b_site, "O", "O", "O"], coords))
        ys.append(a)
    return xs, np.asarray(ys)


def test_local_folds_reproduce_matbench_published_splits():
    from matbench.metadata import mbv01_validation

    for name, n in (("matbench_jdft2d", 636), ("matbench_phonons", 1265)):
        folds = local_folds(matbench_ids(name, n))
        official = mbv01_validation.splits[name]
        assert sorted(folds) == sorted(official)
        for key in folds:
            assert sorted(folds[key]["test"]) == sorted(official[key]["test"])
            assert sorted(folds[key]["train"]) == sorted(official[key]["train"])


def test_runner_records_real_matbench_task_offline_and_results_read_back(tmp_path):
    from matbench.bench import MatbenchBenchmark

    mb = MatbenchBenchmark(autoload=False, subset=["matbench_jdft2d"])
    task = mb.matbench_jdft2d
    assert task.df is None  # nothing downloaded
    xs, ys = perovskites(task.metadata.n_samples)
    assign_task_df(task, xs, ys)
    run_benchmark(mb, lambda t: OrbitPretrainedEstimator(t.metadata.task_type, "orbit", **TINY), progress=False)

    assert all(task.is_recorded.values()) and len(task.is_recorded) == 5
    assert mb.validate() == {} and mb.is_valid
    truth = dict(zip(matbench_ids("matbench_jdft2d", len(ys)), ys))
    for key in task.folds_keys:
        preds = task.results[key].data
        assert set(preds) == set(task.validation[key].test)
        values = np.array(list(preds.values()))
        assert np.isfinite(values).all()
        # matbench scored each prediction against the target of the same id
        mae = np.mean([abs(p - truth[i]) for i, p in preds.items()])
        assert task.results[key].scores.mae == pytest.approx(mae, rel=1e-9)

    script = tmp_path / "make_submission.py"
    script.write_text("# the script that produced the run\n")
    paths = write_submission(mb, str(tmp_path / "sub"), authors="Test Author", script=str(script))
    info = json.loads((tmp_path / "sub" / "info.json").read_text())
    assert set(INFO_FIELDS) <= set(info)
    assert all(info[k] for k in ("authors", "algorithm", "algorithm_long", "bibtex_refs"))
    assert 5 <= len(info["algorithm"]) <= 15
    assert any(p.startswith("matbench==") for p in info["requirements"]["python"])
    assert os.path.exists(paths["scripts"][0])

    back = MatbenchBenchmark.from_file(paths["results"])  # re-checks the hash and validates every fold
    assert back.validate() == {}
    assert back.matbench_jdft2d.results.fold_3.data == task.results.fold_3.data


def test_assign_task_df_checks_ids_and_unloadable_task_error():
    from matbench.bench import MatbenchBenchmark

    mb = MatbenchBenchmark(autoload=False, subset=["matbench_jdft2d"])
    task = mb.matbench_jdft2d
    xs, ys = perovskites(10)
    with pytest.raises(ValueError, match="636"):
        assign_task_df(task, xs, ys)  # the task has 636 rows
    import pandas as pd

    ids = matbench_ids("matbench_jdft2d", 636)
    xs, ys = perovskites(636)
    df = pd.DataFrame({"structure": xs, "exfoliation_en": ys}, index=ids).drop(index=ids[5])
    with pytest.raises(ValueError, match="1 ids"):
        assign_task_df(task, df)
    assert task.df is None

    def offline_load():
        raise ConnectionError("no network")

    task.load = offline_load
    with pytest.raises(RuntimeError, match="assign_task_df"):
        run_benchmark(mb, lambda t: OrbitPretrainedEstimator(**TINY), progress=False)


def test_disordered_structure_is_a_clear_error():
    xs, ys = perovskites(6)
    bad = Structure(Lattice.cubic(4.0), [{"Sr": 0.5, "Ba": 0.5}, "Ti", "O", "O", "O"],
                    [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    with pytest.raises(UnfeaturizableStructureError, match=r"structure 3 .*disordered") as err:
        structures_to_data(xs[:3] + [bad])
    assert err.value.index == 3 and err.value.reason == "disordered"
    est = OrbitPretrainedEstimator(**TINY)
    with pytest.raises(UnfeaturizableStructureError):
        est.fit(xs + [bad], list(ys) + [4.0])
    with pytest.raises(TypeError, match="Structure"):
        structures_to_data(["SrTiO3"])


def test_local_task_of_50_structures_runs_validates_and_learns(tmp_path):
    xs, ys = perovskites(50, seed=1)
    task = local_task("toy_perov", xs, ys, target_name="a")
    mb = LocalMatbenchBenchmark([task])
    cfg = dict(TINY, hidden=16, finetune_steps=60, pretrain="plain", lr=1e-2, ema_decay=None)
    run_benchmark(mb, lambda t: OrbitPretrainedEstimator(**cfg), progress=False)
    assert mb.validate() == {}
    maes = np.array([task.results[k].scores.mae for k in task.folds_keys])
    # matbench's dummy: the training-fold mean
    dummy = np.array([np.mean(np.abs(task.get_test_data(f, include_target=True)[1].values
                                     - task.get_train_and_val_data(f)[1].values.mean())) for f in task.folds])
    assert maes.mean() < 0.6 * dummy.mean()  # the encoder reads the lattice constant
    path = tmp_path / "results.json.gz"
    mb.to_file(str(path))
    assert set(json.loads(path.read_text())["tasks"]["toy_perov"]["results"]) == set(task.folds_keys)


def test_pretraining_modes_change_the_model_and_seed_makes_it_deterministic():
    xs, ys = perovskites(24, seed=2)
    cfg = dict(TINY, pretrain_steps=5)
    preds = {}
    for mode in (None, "plain", "orbit"):
        est = OrbitPretrainedEstimator("regression", mode, **cfg).fit(xs, ys)
        preds[mode] = est.predict(xs[:6])
        assert len(est.history_["pretrain"]) == (0 if mode is None else 1)
    again = OrbitPretrainedEstimator("regression", "orbit", **cfg).fit(xs, ys).predict(xs[:6])
    np.testing.assert_array_equal(again, preds["orbit"])
    assert not np.allclose(preds[None], preds["plain"])
    assert not np.allclose(preds["plain"], preds["orbit"])
    assert OrbitPretrainedEstimator(pretrain="off").pretrain is None
    with pytest.raises(ValueError, match="pretrain"):
        OrbitPretrainedEstimator(pretrain="denoise")


def test_classification_probabilities_and_float64():
    xs, ys = perovskites(30, seed=3)
    labels = ys > np.median(ys)
    task = local_task("toy_clf", xs, labels, task_type="classification", target_name="big")
    mb = LocalMatbenchBenchmark([task])
    run_benchmark(mb, lambda t: OrbitPretrainedEstimator(t.metadata.task_type, None, **TINY, dtype=torch.float64),
                  progress=False)
    assert mb.validate() == {}
    for key in task.folds_keys:
        p = np.array(list(task.results[key].data.values()))
        assert ((p >= 0) & (p <= 1)).all()
        # stratified folds: both classes in every test fold
        y = task.get_test_data(int(key[-1]), include_target=True)[1].values
        assert y.any() and not y.all()


def test_cli_local_csv_writes_leaderboard_folder(tmp_path):
    from pymatgen.io.cif import CifWriter

    from orbit_pyg.integrations.matbench.cli import main

    xs, ys = perovskites(20, seed=4)
    import csv

    csv_path = tmp_path / "tiny.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "material_id", "cif", "heat_all"])
        for i, (s, y) in enumerate(zip(xs, ys)):
            w.writerow([i, f"m{i}", str(CifWriter(s)), y])
    out = tmp_path / "run"
    argv = ["matbench", "run", "--local-csv", str(csv_path), "--out", str(out), "--authors", "Test Author",
            "--pretrain", "orbit", "--hidden", "8", "--layers", "1", "--n-freq", "2", "--time-dim", "4",
            "--pretrain-steps", "2", "--finetune-steps", "2", "--translations", "4", "--quiet"]
    assert main(argv) == 0
    names = set(os.listdir(out))
    assert {"results.json.gz", "info.json", "command.txt", "model.py", "runner.py"} <= names
    results = json.loads((out / "results.json.gz").read_text())
    assert len(results["tasks"]["local_perov5"]["results"]) == 5
    assert "--local-csv" in (out / "command.txt").read_text()

    # --resume keeps every recorded fold: a different seed would change the predictions if it refit
    assert main(argv + ["--resume", "--seed", "7"]) == 0
    again = json.loads((out / "results.json.gz").read_text())
    assert again["tasks"]["local_perov5"]["results"] == results["tasks"]["local_perov5"]["results"]


def test_encoder_trunk_is_cspnet_forward_and_pooled_embedding_is_invariant():
    from torch_geometric.data import Batch

    from orbit_pyg.integrations.crystal.model import CSPNet
    from orbit_pyg.integrations.matbench import encode

    torch.manual_seed(0)
    net = CSPNet(hidden=16, num_layers=2, n_freq=3, time_dim=8).double()
    xs, _ = perovskites(3, seed=5)
    batch = Batch.from_data_list(structures_to_data(xs, dtype=torch.float64))
    cell, t = batch.cell.reshape(-1, 3, 3), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    h, pooled = encode(net, batch.z, batch.frac_coords, cell, batch.batch, 3, t)
    lattice_out, coord_out = net(batch.z, batch.frac_coords, cell, t, batch.batch, 3)
    # the trunk handed to the property head is exactly the one the denoiser's heads read
    torch.testing.assert_close(net.coord_head(h), coord_out)
    torch.testing.assert_close(net.lattice_head(pooled).view(3, 3, 3) @ cell, lattice_out)

    # pooled embedding: invariant to a periodic translation, an atom permutation and a lattice rotation
    shift = torch.remainder(batch.frac_coords + torch.tensor([0.3, -0.2, 0.75], dtype=torch.float64), 1.0)
    perm = torch.cat([torch.randperm(5) + 5 * b for b in range(3)])
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    _, moved = encode(net, batch.z[perm], shift[perm], cell @ q.T, batch.batch, 3, t)
    torch.testing.assert_close(moved, pooled)


def test_non_finite_predictions_raise_instead_of_passing_silently():
    xs, ys = perovskites(6, seed=3)
    est = OrbitPretrainedEstimator("regression", None, **dict(TINY, finetune_steps=0)).fit(xs, ys)
    assert np.isfinite(est.predict(xs)).all()
    with torch.no_grad():
        est.model_.head[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="6 of 6 predictions are NaN"):
        est.predict(xs)
