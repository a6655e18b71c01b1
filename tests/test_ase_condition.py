"""The ASE door takes the crystal door's condition: ``generate`` / ``ReverseDiffusion`` / ``orbit-pyg ase`` with
``props`` (and ``text``) build the condition vector as ``orbit-pyg crystal sample`` does, guidance scale 0 is
sampling without a condition, and conditions a run was not trained on are refused clearly."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("ase")

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402
from torch_geometric.data import Data  # noqa: E402

from orbit_pyg.integrations.ase import CrystalDenoiser, ReverseDiffusion, generate, load_denoiser, right_handed  # noqa: E402
from orbit_pyg.integrations.ase.cli import add_parser  # noqa: E402
from orbit_pyg.integrations.crystal.condition import PropertyNormalizer, attach_conditions, condition_vectors  # noqa: E402
from orbit_pyg.integrations.crystal.csp import CSPConfig, make_diffusion, train_csp  # noqa: E402
from orbit_pyg.integrations.crystal.sampling import PredictorCorrector  # noqa: E402

NAMES = ["heat_all", "dir_gap"]
ASK = {"heat_all": -0.5, "dir_gap": 2.0}


def crystals(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        heat, gap = float(torch.randn(1, generator=g)), float(3 * torch.rand(1, generator=g))
        out.append(Data(z=torch.tensor([38, 22, 8, 8, 8]), frac_coords=torch.rand(5, 3, generator=g),
                        cell=(3.9 + 0.3 * heat) * torch.eye(3).unsqueeze(0), num_nodes=5,
                        heat_all=torch.tensor([heat]), dir_gap=torch.tensor([gap])))
    return out


@pytest.fixture(scope="module")
def props_run(tmp_path_factory):
    """A tiny props-conditioned CSP run (a few steps at a large learning rate, so FiLM is not zero)."""
    data = crystals()
    values = torch.tensor([[float(d.heat_all), float(d.dir_gap)] for d in data])
    norm = PropertyNormalizer(NAMES).fit(values)
    cfg = CSPConfig(hidden=16, layers=1, n_freq=4, steps=6, batch_size=4, lr=2e-2, translations=8, diffusion_steps=30,
                    sample_steps=6, ema_decay=None, condition="props", cond_props=NAMES, cond_stats=norm.to_dict())
    out = tmp_path_factory.mktemp("props_run")
    train_csp(attach_conditions(data, condition_vectors("props", len(data), props=values, normalizer=norm)), cfg,
              out_dir=str(out))
    return str(out)


def same(a, b) -> bool:
    return all(np.array_equal(x.positions, y.positions) and np.array_equal(x.cell.array, y.cell.array)
               for x, y in zip(a, b))


def test_props_condition_is_the_normalized_target_seeded_and_scale_zero_is_no_condition(props_run):
    den = load_denoiser(props_run)
    assert den.guidance == 1.0 and "condition='props'" in repr(den)
    a = generate(den, "SrTiO3", n=3, seed=4, props="heat_all=-0.5,dir_gap=2")
    assert same(a, generate(props_run, "SrTiO3", n=3, seed=4, props=ASK))  # seeded; mapping == string
    assert a[0].info["props"] == "heat_all=-0.5,dir_gap=2" and a[0].info["guidance"] == 1.0

    # the condition is (target - train mean) / train std, as `orbit-pyg crystal sample --props` builds it
    norm = PropertyNormalizer.from_dict(den.cfg.cond_stats)
    cond = ((torch.tensor([[-0.5, 2.0]]) - norm.mean) / norm.std).expand(3, -1)
    frac, cell = PredictorCorrector(den.net, make_diffusion(den.cfg), num_steps=6, step_lr=den.step_lr,
                                    lattice_clip=den.lattice_clip).sample(
        torch.tensor([38, 22, 8, 8, 8] * 3), torch.arange(3).repeat_interleave(5), 3,
        generator=torch.Generator().manual_seed(4), cond=cond)
    for i, x in enumerate(a):  # generate re-expresses a left-handed cell on -L (same crystal)
        f, c = right_handed(frac[5 * i:5 * i + 5].double().numpy(), cell[i].double().numpy())
        np.testing.assert_allclose(x.cell.array, c, atol=1e-5)
        d = x.get_scaled_positions() - f
        assert np.abs(d - np.round(d)).max() < 1e-5

    null = generate(den, "SrTiO3", n=3, seed=4)  # no condition: the null condition
    assert "props" not in null[0].info
    assert not same(a, null)  # the condition reaches the network
    assert same(generate(den, "SrTiO3", n=3, seed=4, props=ASK, guidance=0.0), null)  # s = 0: unconditioned
    other = generate(den, "SrTiO3", n=3, seed=4, props={"heat_all": 1.5, "dir_gap": 0.1})
    strong = generate(den, "SrTiO3", n=3, seed=4, props=ASK, guidance=3.0)
    assert not same(a, other) and not same(a, strong)


def test_dynamics_takes_the_condition_step_for_step(props_run):
    atoms = Atoms(numbers=[38, 22, 8, 8, 8], cell=np.eye(3) * 4.0, pbc=True)
    dyn = ReverseDiffusion(atoms, props_run, props=ASK, guidance=2.0, seed=3)
    dyn.run()
    assert dyn.todict()["guidance"] == 2.0
    (expected,) = generate(props_run, "SrTiO3", n=1, seed=3, props=ASK, guidance=2.0)
    np.testing.assert_allclose(atoms.cell.array, expected.cell.array, atol=1e-5)
    null = Atoms(numbers=[38, 22, 8, 8, 8], cell=np.eye(3) * 4.0, pbc=True)
    ReverseDiffusion(null, props_run, seed=3).run()
    assert np.abs(null.cell.array - atoms.cell.array).max() > 1e-6


def test_conditions_a_model_was_not_trained_on_raise_clear_errors(props_run):
    with pytest.raises(ValueError, match="not text"):
        generate(props_run, "SrTiO3", n=1, text="a cubic perovskite")
    with pytest.raises(ValueError, match="missing"):
        generate(props_run, "SrTiO3", n=1, props="heat_all=1")
    with pytest.raises(ValueError, match="not a number"):
        generate(props_run, "SrTiO3", n=1, props="heat_all=high,dir_gap=1")
    den = load_denoiser(props_run)
    with pytest.raises(ValueError, match="no run configuration"):
        generate(CrystalDenoiser(den.net, den.diffusion, num_steps=3), "SrTiO3", props=ASK)
    plain_cfg = CSPConfig(hidden=8, layers=1, n_freq=2, diffusion_steps=20, sample_steps=3)
    from orbit_pyg.integrations.crystal.csp import make_model

    with pytest.raises(ValueError, match="without a condition"):
        generate((make_model(plain_cfg), plain_cfg), "SrTiO3", props=ASK)
    with pytest.raises(ValueError, match="without a condition"):
        ReverseDiffusion(Atoms("NaCl", cell=np.eye(3) * 4, pbc=True), (make_model(plain_cfg), plain_cfg), text="x")
    text_cfg = CSPConfig(hidden=8, layers=1, n_freq=2, diffusion_steps=20, sample_steps=3, condition="text+props",
                         cond_dim=3, cond_stats={"names": ["a"], "mean": [0.0], "std": [1.0]}, cond_props=["a"])
    with pytest.raises(ValueError, match="give text as well"):
        generate((make_model(text_cfg), text_cfg), "NaCl", props="a=1")


def test_cli_generate_with_props_and_guidance(props_run, tmp_path):
    parser = argparse.ArgumentParser(prog="orbit-pyg")
    add_parser(parser.add_subparsers(dest="door", required=True))
    out = tmp_path / "c.extxyz"
    args = parser.parse_args(["ase", "generate", "--run", props_run, "--composition", "SrTiO3", "-n", "2", "--seed", "4",
                              "--props", "heat_all=-0.5", "dir_gap=2", "--guidance", "2", "--out", str(out)])
    assert args.func(args) == 0
    back = ase.io.read(str(out), index=":")
    assert back[0].info["props"] == "heat_all=-0.5,dir_gap=2" and back[0].info["guidance"] == 2.0
    api = generate(props_run, "SrTiO3", n=2, seed=4, props=ASK, guidance=2.0)
    np.testing.assert_allclose(back[1].cell.array, api[1].cell.array, atol=1e-6)
    traj = tmp_path / "t.traj"
    args = parser.parse_args(["ase", "trajectory", "--run", props_run, "--composition", "SrTiO3", "--num-steps", "3",
                              "--props", "heat_all=0,dir_gap=1", "--out", str(traj)])
    assert args.func(args) == 0 and len(ase.io.read(str(traj), index=":")) == 4
    args = parser.parse_args(["ase", "generate", "--run", props_run, "--composition", "SrTiO3", "--text", "cubic",
                              "--out", str(out)])
    with pytest.raises(SystemExit, match="not text"):
        args.func(args)


def perovskite(shift=0.0) -> Atoms:
    g = np.random.default_rng(1)
    return Atoms(numbers=[38, 22, 8, 8, 8], cell=np.diag([3.9, 4.0, 4.1]) + shift, pbc=True,
                 scaled_positions=g.random((5, 3)))


def forces_stress(model, t=0.3, **condition):
    from orbit_pyg.integrations.ase import DenoiserCalculator

    atoms = perovskite()
    atoms.calc = DenoiserCalculator(model, t=t, **condition)
    return atoms.get_forces(), atoms.get_stress(), atoms


def test_calculator_scores_the_condition_with_guidance_linear_in_s(props_run):
    den = load_denoiser(props_run)
    f_null, s_null, plain = forces_stress(den)
    f_a, s_a, atoms = forces_stress(den, props=ASK)
    f_b, _, _ = forces_stress(den, props={"heat_all": 1.5, "dir_gap": 0.1})
    assert np.abs(f_a - f_b).max() > 1e-6 * np.abs(f_a).max() and np.abs(f_a - f_null).max() > 0
    assert atoms.info["denoiser_props"] == "heat_all=-0.5,dir_gap=2" and atoms.info["denoiser_guidance"] == 1.0
    assert atoms.calc.results["denoiser_props"] == "heat_all=-0.5,dir_gap=2"
    assert not any(k in plain.info for k in ("denoiser_props", "denoiser_guidance", "props", "guidance"))
    f0, s0, _ = forces_stress(den, props=ASK, guidance=0.0)  # s = 0: the unconditioned score, exactly
    assert np.array_equal(f0, f_null) and np.array_equal(s0, s_null)
    # forces and stress are linear in the network outputs: o(null) + s (o(c) - o(null)) carries over to them
    f3, s3, _ = forces_stress(den, props=ASK, guidance=3.0)
    np.testing.assert_allclose(f3, f_null + 3.0 * (f_a - f_null), rtol=1e-4, atol=1e-6 * np.abs(f3).max())
    np.testing.assert_allclose(s3, s_null + 3.0 * (s_a - s_null), rtol=1e-4, atol=1e-6 * np.abs(s3).max())
    # the same condition as generate(): the same vector reaches the network
    cond, _ = den.condition(1, props=ASK)
    atoms = perovskite()
    frac = np.linalg.solve(atoms.cell.array.T, atoms.positions.T).T
    out = den.predict(torch.tensor(atoms.numbers), torch.from_numpy(frac).to(den.dtype),
                      torch.from_numpy(atoms.cell.array).to(den.dtype), den.step_of(0.3), cond=cond, guidance=1.0)
    np.testing.assert_allclose(f_a, out["score_frac"].numpy() @ np.linalg.inv(atoms.cell.array).T, rtol=1e-6, atol=1e-9)


def test_calculator_set_condition_invalidates_the_cache(props_run):
    from orbit_pyg.integrations.ase import DenoiserCalculator

    atoms = perovskite()
    calc = DenoiserCalculator(props_run, t=0.3, props=ASK)
    atoms.calc = calc
    first = atoms.get_forces()
    assert calc.set(props=dict(ASK)) == {} and calc.results  # the same condition keeps the results
    other = {"heat_all": 1.5, "dir_gap": 0.1}
    assert "props" in calc.set(props=other) and calc.results == {}
    second = atoms.get_forces()
    np.testing.assert_array_equal(second, forces_stress(props_run, props=other)[0])
    assert np.abs(second - first).max() > 0 and atoms.info["denoiser_props"] == "heat_all=1.5,dir_gap=0.1"
    calc.set(props=None)  # back to the null condition: no stale condition in the Atoms
    np.testing.assert_array_equal(atoms.get_forces(), forces_stress(props_run)[0])
    assert "denoiser_props" not in atoms.info and "denoiser_guidance" not in atoms.info
    assert "props=" not in repr(calc) and "props=" in repr(DenoiserCalculator(props_run, props=ASK, guidance=2.0))


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_calculator_refuses_conditions_as_generate_does(props_run):
    from orbit_pyg.integrations.ase import DenoiserCalculator
    from orbit_pyg.integrations.crystal.csp import make_model

    plain_cfg = CSPConfig(hidden=8, layers=1, n_freq=2, diffusion_steps=20, sample_steps=3)
    plain = (make_model(plain_cfg), plain_cfg)
    expected = message(generate, plain, "SrTiO3", props=ASK)
    assert "without a condition" in expected
    assert message(DenoiserCalculator, plain, props=ASK) == expected
    calc = DenoiserCalculator(plain)
    assert message(calc.set, props=ASK) == expected and calc.parameters["props"] is None  # nothing stored
    for bad in ({"text": "a cubic perovskite"}, {"props": "heat_all=1"}, {"props": ASK, "guidance": float("nan")}):
        assert message(DenoiserCalculator, props_run, **bad) == message(generate, props_run, "SrTiO3", **bad)
    calc = DenoiserCalculator(props_run, props=ASK)
    message(calc.set, props="heat_all=high,dir_gap=1")
    assert calc.parameters["props"] == ASK and calc._asked["props"] == ASK  # the old condition stands
