"""Crystal structure prediction end to end on 50 Perov-5 structures: train -> sample -> evaluate,
through :mod:`orbit_pyg.integrations.crystal.csp` and through the ``orbit-pyg crystal`` CLI.

Tiny models and few steps: these tests check the plumbing (files, shapes, determinism, metrics),
not the quality of the samples.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("pymatgen")
pytest.importorskip("smact")

from orbit_pyg.integrations.crystal import CDVAEDataset, split_indices  # noqa: E402
from orbit_pyg.integrations.crystal.csp import CSPConfig, evaluate, generate, load_model, train_csp  # noqa: E402
from orbit_pyg.training import read_metrics  # noqa: E402

from _reference import PEROV_CSV  # noqa: E402
N_ROWS = 50


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> pathlib.Path:
    """The first 50 Perov-5 rows, written to a temporary CSV (the repo is never written)."""
    if not PEROV_CSV.is_file():
        pytest.skip(f"Perov-5 CSV not found at {PEROV_CSV}")
    with open(PEROV_CSV, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(N_ROWS), reader)]
        header = list(reader.fieldnames)
    path = tmp_path_factory.mktemp("perov") / "val.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def dataset(small_csv, tmp_path_factory):
    return CDVAEDataset(str(tmp_path_factory.mktemp("root")), source=str(small_csv), progress=False)


def tiny_config(**over) -> CSPConfig:
    values = dict(hidden=16, layers=1, n_freq=4, steps=4, batch_size=16, translations=8, proposal="guided",
                  lattice_orbit="perm", diffusion_steps=30, sample_steps=5, ema_decay=0.9, seed=0)
    values.update(over)
    return CSPConfig(**values)


def _finite_numbers(metrics: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value), (key, value)


def test_csp_train_generate_evaluate_and_reload(dataset, tmp_path):
    assert len(dataset) == N_ROWS and dataset.num_skipped == 0
    split = split_indices(len(dataset), n_test=8, seed=0)
    train = [dataset[int(i)] for i in split.train]
    test = [dataset[int(i)] for i in split.test]
    cfg = tiny_config()
    run = tmp_path / "run"
    model, history = train_csp(train, cfg, out_dir=str(run))
    for name in ("last.pt", "metrics.jsonl", "config.json"):
        assert (run / name).is_file(), name
    assert history and all(math.isfinite(r["loss"]) for r in history)
    logged = [r for r in read_metrics(str(run / "metrics.jsonl")) if "loss" in r]
    assert logged and logged[-1]["step"] == cfg.steps
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))

    generated = generate(model, test, cfg, seed=3)
    assert len(generated) == len(test)
    for g, r in zip(generated, test):
        assert torch.equal(g.z, r.z)  # CSP: the composition is given
        assert g.frac_coords.shape == r.frac_coords.shape and g.cell.shape == (1, 3, 3)
        assert bool(torch.isfinite(g.frac_coords).all() and torch.isfinite(g.cell).all())
        assert bool(((g.frac_coords >= 0) & (g.frac_coords < 1)).all())
    again = generate(model, test, cfg, seed=3)
    assert all(torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.cell, b.cell) for a, b in zip(generated, again))
    with pytest.raises(ValueError, match="num_steps"):  # 0 used to fall back to cfg.sample_steps silently
        generate(model, test[:1], cfg, num_steps=0)
    other = generate(model, test, cfg, seed=4)
    assert not all(torch.equal(a.frac_coords, b.frac_coords) for a, b in zip(generated, other))

    metrics = evaluate(generated, test)
    assert 0.0 <= metrics["match_rate"] <= 1.0 and metrics["n_references"] == len(test)
    assert 0.0 <= metrics["valid_generated"] <= 1.0
    _finite_numbers(metrics)
    # the metric is able to say "perfect": the references against themselves match wherever valid
    perfect = evaluate(test, test)
    assert perfect["match_rate"] == pytest.approx(perfect["valid_reference"]) and perfect["match_rate"] > 0.5
    assert perfect["rmse"] == pytest.approx(0.0, abs=1e-8)

    # load_model round trip: the same configuration, the same (EMA) weights, the same outputs
    loaded, cfg2 = load_model(str(run))
    assert cfg2 == cfg
    batch = torch.cat([torch.zeros(test[0].num_nodes), torch.ones(test[1].num_nodes)]).long()
    z = torch.cat([test[0].z, test[1].z])
    frac = torch.cat([test[0].frac_coords, test[1].frac_coords])
    cell = torch.cat([test[0].cell, test[1].cell])
    t = torch.tensor([0.3, 0.8])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        out_a, out_b = model(z, frac, cell, t, batch, 2), loaded(z, frac, cell, t, batch, 2)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    regenerated = generate(loaded, test, cfg2, seed=3)
    assert all(torch.equal(a.frac_coords, b.frac_coords) for a, b in zip(generated, regenerated))


@pytest.mark.parametrize("mode", ["plain", "augment"])
def test_csp_other_modes_train(dataset, mode):
    train = [dataset[i] for i in range(16)]
    model, history = train_csp(train, tiny_config(mode=mode, steps=2, lattice_orbit=False, proposal="uniform"))
    assert history and all(math.isfinite(r["loss"]) for r in history)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_cli_train_sample_evaluate(small_csv, tmp_path, capsys):
    from orbit_pyg.integrations.cli import main

    root, run = tmp_path / "root", tmp_path / "run"
    config = tmp_path / "csp.json"
    # the file sets the model / diffusion sizes; flags override it (steps: 100 -> 3)
    config.write_text(json.dumps({"n_freq": 4, "diffusion_steps": 30, "steps": 100, "ema_decay": 0.9}))
    common = ["--data", str(small_csv), "--root", str(root), "--n-test", "10", "--quiet"]
    rc = main(["crystal", "train", *common, "--out", str(run), "--config", str(config), "--steps", "3",
               "--batch-size", "16", "--hidden", "16", "--layers", "1", "--translations", "8",
               "--proposal", "guided", "--lattice-orbit", "perm", "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "training orbit on 40 crystals for 3 steps" in out and "final loss" in out
    for name in ("last.pt", "metrics.jsonl", "config.json", "data.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 3 and saved["n_freq"] == 4 and saved["diffusion_steps"] == 30
    assert saved["lattice_orbit"] == "perm" and saved["proposal"] == "guided" and saved["hidden"] == 16
    assert read_metrics(str(run / "metrics.jsonl"))

    # sample: dataset flags are inherited from the run's data.json
    rc = main(["crystal", "sample", "--run", str(run), "--limit", "4", "--num-steps", "4", "--seed", "2", "--quiet"])
    assert rc == 0
    assert "wrote 4 CIFs" in capsys.readouterr().out
    samples = run / "samples"
    payload = torch.load(samples / "samples.pt", weights_only=False)
    assert len(payload["generated"]) == 4
    held_out = split_indices(N_ROWS, n_test=10, seed=0).test[:4].tolist()
    assert payload["reference_indices"] == held_out
    cifs = sorted((samples / "generated").glob("*.cif"))
    assert len(cifs) == 4 and all(p.stat().st_size > 0 for p in cifs)
    from pymatgen.core import Structure

    for p, g in zip(cifs, payload["generated"]):
        s = Structure.from_file(str(p))
        assert len(s) == g.num_nodes

    # evaluate: one JSON line with the headline metrics
    rc = main(["crystal", "evaluate", "--run", str(run), "--quiet"])
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    assert set(result) == {"match_rate", "rmse", "metre", "crmse", "valid_generated"}
    assert 0.0 <= result["match_rate"] <= 1.0 and 0.0 <= result["valid_generated"] <= 1.0
    _finite_numbers(result)
    written = json.loads((samples / "metrics.json").read_text())
    assert written["metrics"]["match_rate"] == result["match_rate"]
    assert written["metrics"]["n_references"] == 4

    # the run folder is self-contained: load_model reads what the CLI wrote
    model, cfg = load_model(str(run))
    assert cfg.steps == 3 and cfg.mode == "orbit" and cfg.hidden == 16 and model.n_freq == 4
