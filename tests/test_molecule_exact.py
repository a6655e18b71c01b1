"""Molecule door with the exact rotation proposal: the closed-form (matrix Fisher) orbit target of a
conformer batch equals a large-K importance-sampling estimate over rotations × automorphisms within
its Monte Carlo error, the loss's velocity target is built from it, and one training step is finite."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("rdkit")

from torch_geometric.data import Batch  # noqa: E402

from orbit_pyg.estimator import orbit_estimate  # noqa: E402
from orbit_pyg.orbits import OrbitContext  # noqa: E402
from orbit_pyg.integrations.molecule import (  # noqa: E402
    AddAutomorphisms, ConformerConfig, make_loss, molecule_orbit, smiles_to_data, train_conformer_model,
)

F64 = torch.float64
K_AUT = 8


@pytest.fixture(scope="module")
def batch():
    # methanol (|G| = 3! methyl hydrogen relabellings) and water (|G| = 2): both listed exactly
    aut = AddAutomorphisms(max_automorphisms=K_AUT)
    data = [aut(smiles_to_data(s, embed=True, seed=1)) for s in ("CO", "O")]
    assert [int(d.aut_order) for d in data] == [6, 2]
    return Batch.from_data_list(data)


def _sampled(orbit, ctx, seed, repeats):
    g = torch.Generator().manual_seed(seed)
    runs = torch.stack([orbit_estimate(orbit, ctx, generator=g).target.to(F64) for _ in range(repeats)])
    return runs.mean(0), runs.std(0) / math.sqrt(repeats)


@pytest.mark.parametrize("reflections", [False, True])
@pytest.mark.parametrize("t,proposal,k", [(0.3, "uniform", 4000), (0.7, "guided", 2000)])
def test_exact_molecule_target_matches_large_k_sampling(batch, reflections, t, proposal, k):
    cfg = ConformerConfig(objective="flow", mode="orbit", proposal="exact", reflections=reflections, automorphisms=K_AUT)
    loss = make_loss(cfg)
    noisy = loss.corrupt(batch, torch.Generator().manual_seed(3), t=torch.full((2,), t))
    ctx = OrbitContext(noisy.x0, noisy.xt, noisy.batch, 2, noisy.alpha, noisy.sigma, loss.kernel, data=batch)
    exact = orbit_estimate(loss.orbit, ctx).target.to(F64)
    mean, se = _sampled(molecule_orbit(k, reflections, True, proposal), ctx, seed=7, repeats=16)
    z = (exact - mean) / se.clamp(min=1e-6)  # 36 coordinates, 16 repeats each
    assert float((z**2).mean()) < 3.0 and float(z.abs().max()) < 5.5
    # the comparison has power: sampling rotations only (automorphisms left out) is rejected by it
    rot_only, _ = _sampled(molecule_orbit(k, reflections, False, proposal), ctx, seed=7, repeats=16)
    assert float((((exact - rot_only) / se.clamp(min=1e-6)) ** 2).mean()) > 6.0
    # the exact target is not the clean pose: the posterior is not a point mass at this noise level
    assert float((exact - noisy.x0.to(F64)).abs().max()) > 0.05
    # the loss's velocity target u = a' x0_hat + (s' / s)(x_t - a x0_hat) is made from the exact x0_hat
    sched, tt = loss.schedule, torch.full((2,), t, dtype=F64)
    a, s = sched.alpha(tt)[noisy.batch].view(-1, 1), sched.sigma(tt)[noisy.batch].view(-1, 1)
    a_dot, s_dot = sched.alpha_dot(tt)[noisy.batch].view(-1, 1), sched.sigma_dot(tt)[noisy.batch].view(-1, 1)
    xt = noisy.xt.to(F64)
    velocity = a_dot * exact + (s_dot / s) * (xt - a * exact)
    assert torch.allclose(noisy.target.to(F64), velocity, atol=1e-4)
    # and differs from the augmentation target (one pose), so the test can tell them apart
    augment = a_dot * noisy.x0.to(F64) + (s_dot / s) * (xt - a * noisy.x0.to(F64))
    assert float((noisy.target.to(F64) - augment).abs().max()) > 0.05


def test_exact_is_deterministic_given_the_noise(batch):
    """No rotation samples: the same (x0, x_t) gives the same target whatever the generator."""
    loss = make_loss(ConformerConfig(objective="diffusion", proposal="exact", automorphisms=K_AUT))
    noisy = loss.corrupt(batch, torch.Generator().manual_seed(0), t=torch.tensor([0.3, 0.3]))
    ctx = OrbitContext(noisy.x0, noisy.xt, noisy.batch, 2, noisy.alpha, noisy.sigma, loss.kernel, data=batch)
    one = orbit_estimate(loss.orbit, ctx, generator=torch.Generator().manual_seed(1)).target
    two = orbit_estimate(loss.orbit, ctx, generator=torch.Generator().manual_seed(2)).target
    assert torch.equal(one, two)
    assert noisy.ess.max() <= 6 + 1e-9 and noisy.ess.min() >= 1 - 1e-9  # counts automorphisms only


def test_one_training_step_with_exact_targets_is_finite(batch):
    data = Batch.to_data_list(batch)
    cfg = ConformerConfig(objective="flow", mode="orbit", proposal="exact", hidden=16, layers=1, heads=2,
                          automorphisms=K_AUT, steps=1, batch_size=2, ema_decay=None)
    torch.manual_seed(cfg.seed)
    before = [p.detach().clone() for p in train_conformer_model(data, ConformerConfig(**{**cfg.__dict__, "steps": 1, "lr": 0.0}),
                                                                progress=False)[0].parameters()]
    model, history = train_conformer_model(data, cfg, progress=False, log_every=1)
    losses = [r["loss"] for r in history if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(model.parameters(), before))
    assert math.isfinite(moved) and moved > 0


def test_config_rejects_unknown_proposal():
    with pytest.raises(ValueError, match="proposal"):
        ConformerConfig(proposal="exactly")
    with pytest.raises(ValueError, match="rotation proposal"):
        molecule_orbit(proposal="kabsch")
