"""Losses: the four parameterizations, plain / augment / orbit modes, split form, torus kernel."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from _reference import cube_rotations, ess, gaussian_posterior_mean, species_group, wrapped_normal_logpdf, wrapped_normal_score
from conftest import TorusTranslations, graph_slice, make_batch
from orbit_pyg import PARAMETERIZATIONS, FlowSchedule, OrbitDiffusionLoss, VESchedule, VPSchedule
from orbit_pyg.kernels import WrappedNormalKernel
from orbit_pyg.nn import PositionTransformer
from orbit_pyg.orbits import SO3, FiniteGroup, SpeciesPermutation
from orbit_pyg.orbits.rotation import kabsch

SCHEDULES = {
    "vp-cosine": lambda: VPSchedule("cosine"),
    "vp-linear-continuous": lambda: VPSchedule("linear", discrete=False),
    "ve": lambda: VESchedule(0.01, 5.0),
    "flow": lambda: FlowSchedule(0.0),
    "flow-bridge": lambda: FlowSchedule(0.3),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _per_node(v, batch):
    return v[batch].view(-1, 1)


def _batch20(dtype=torch.float64):
    species = [[6, 1, 1, 1, 1], [8, 1, 1], [6, 6, 1, 1, 1, 1], [7, 1, 1, 1]] * 5
    return make_batch(species, seed=40, dtype=dtype)


# --- plain mode: the targets are the true quantities ------------------------------------------


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_plain_parameterizations_reproduce_true_quantities(sched_name):
    sched = SCHEDULES[sched_name]()
    data = _batch20()
    losses = {p: OrbitDiffusionLoss(sched, mode="plain", parameterization=p) for p in PARAMETERIZATIONS}
    noisy = {p: loss.corrupt(data, generator=_gen(3)) for p, loss in losses.items()}
    base = noisy["eps"]
    for p in PARAMETERIZATIONS:  # same seed: same times, same noise
        assert torch.equal(noisy[p].xt, base.xt) and torch.equal(noisy[p].t, base.t)
        assert torch.equal(noisy[p].x0, data.pos)  # plain, no orbit: no centring
    t = base.t.double()
    assert torch.allclose(base.alpha, sched.alpha(t)) and torch.allclose(base.sigma, sched.sigma(t))
    a, s = _per_node(base.alpha, data.batch), _per_node(base.sigma, data.batch)
    eps = base.target
    # x_t = alpha x0 + sigma eps with eps standard normal
    assert torch.allclose(base.xt, a * data.pos + s * eps, atol=1e-10)
    assert abs(float(eps.mean())) < 0.25 and abs(float(eps.var()) - 1) < 0.3
    assert torch.equal(noisy["x0"].target, data.pos)
    assert torch.allclose(noisy["score"].target, -eps / s, rtol=1e-10, atol=1e-10)
    a_dot, s_dot = _per_node(sched.alpha_dot(t), data.batch), _per_node(sched.sigma_dot(t), data.batch)
    # velocity: d x_t / dt = alpha' x0 + sigma' eps (for the flow bridge, its expectation given x_t, x1)
    assert torch.allclose(noisy["velocity"].target, a_dot * data.pos + s_dot * eps, atol=1e-9)
    if sched_name == "flow":
        # x_t = t x1 + (1 - t) x_prior: the velocity is x1 - x_prior, x_prior = eps
        assert torch.allclose(noisy["velocity"].target, data.pos - eps, atol=1e-9)
        assert torch.allclose(base.xt, t[data.batch].view(-1, 1) * data.pos + (1 - t[data.batch].view(-1, 1)) * eps, atol=1e-10)


def test_explicit_times_and_single_graph_data():
    sched = VPSchedule()
    data = Data(pos=torch.randn(5, 3, generator=_gen(0), dtype=torch.float64))
    loss = OrbitDiffusionLoss(sched, mode="plain", parameterization="eps")
    noisy = loss.corrupt(data, generator=_gen(1), t=torch.tensor([0.25]))
    assert noisy.num_graphs == 1 and noisy.t.tolist() == [0.25]
    assert torch.allclose(noisy.xt, sched.alpha(torch.tensor(0.25)) * data.pos + sched.sigma(torch.tensor(0.25)) * noisy.target)


# --- determinism and the split form -------------------------------------------------------------


ORBITS = {
    "so3-guided": lambda: SO3(16, proposal="guided"),
    "species-guided": lambda: SpeciesPermutation(max_candidates=5, proposal="guided"),
    "product": lambda: SpeciesPermutation(max_candidates=6) * SO3(8),
}


@pytest.mark.parametrize("orbit_name", list(ORBITS))
@pytest.mark.parametrize("mode", ["plain", "augment", "orbit"])
def test_same_seed_same_targets(orbit_name, mode):
    data = make_batch(seed=41)
    loss = OrbitDiffusionLoss(VPSchedule(), ORBITS[orbit_name](), mode=mode, parameterization="eps")
    a, b = loss.corrupt(data, generator=_gen(5)), loss.corrupt(data, generator=_gen(5))
    c = loss.corrupt(data, generator=_gen(6))
    for field in ("xt", "t", "target", "x0", "ess"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.target, c.target)


@pytest.mark.parametrize("mode", ["plain", "augment", "orbit"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_split_form_equals_one_call(mode, reduction):
    data = make_batch(seed=42, dtype=torch.float32)
    torch.manual_seed(0)
    model = PositionTransformer(hidden=16, num_layers=1, heads=2)
    loss = OrbitDiffusionLoss(VPSchedule(), SO3(16, proposal="guided"), mode=mode, reduction=reduction)
    one = loss(model, data, generator=_gen(7))
    noisy = loss.corrupt(data, generator=_gen(7))
    pred = model(noisy.xt, noisy.t, data)
    split = loss.criterion(pred, noisy)
    assert torch.equal(one, split)
    per_node = ((pred - noisy.target) ** 2).sum(-1)
    expected = {"mean": per_node.mean(), "sum": per_node.sum(), "none": per_node}[reduction]
    assert torch.allclose(split, expected, rtol=1e-6)
    if reduction != "none":
        g1 = torch.autograd.grad(one, list(model.parameters()))
        g2 = torch.autograd.grad(loss.criterion(model(noisy.xt, noisy.t, data), noisy), list(model.parameters()))
        assert all(torch.equal(x, y) for x, y in zip(g1, g2))
    assert not noisy.target.requires_grad


def test_target_carries_no_gradient():
    data = make_batch(seed=43)
    data.pos.requires_grad_(True)
    loss = OrbitDiffusionLoss(VPSchedule(), SO3(8), mode="orbit")
    noisy = loss.corrupt(data, generator=_gen(0))
    assert not noisy.target.requires_grad and not noisy.xt.requires_grad


# --- augment / orbit modes ----------------------------------------------------------------------


def test_augment_mode_uses_one_orbit_element_per_graph():
    data = make_batch(seed=44)
    loss = OrbitDiffusionLoss(VPSchedule(), SO3(8), mode="augment", parameterization="eps")
    noisy = loss.corrupt(data, generator=_gen(1))
    a, s = _per_node(noisy.alpha, data.batch).float().double(), _per_node(noisy.sigma, data.batch)
    for b in range(data.num_graphs):
        sl = graph_slice(data, b)
        x0 = data.pos[sl] - data.pos[sl].mean(0)
        aug = noisy.x0[sl]
        # a rotation of the centred positions: same distances, same centroid
        assert torch.allclose(torch.cdist(aug, aug), torch.cdist(x0, x0), atol=1e-10)
        if sl.stop - sl.start >= 3:
            r, _ = kabsch((aug.T @ x0).unsqueeze(0))  # best proper rotation taking x0 to aug
            assert torch.allclose(aug, x0 @ r[0].T, atol=1e-8)
            assert not torch.allclose(aug, x0, atol=1e-3)
        assert torch.allclose(noisy.xt[sl].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)  # centred noise
    assert torch.allclose(noisy.xt, a * noisy.x0 + s * noisy.target, atol=1e-10)
    assert torch.equal(noisy.ess, torch.ones(data.num_graphs, dtype=torch.float64)) and noisy.log_weights is None


def _expected_target(p, x0_hat, xt, a, s, a_dot, s_dot):
    resid = xt - a * x0_hat
    return {"x0": x0_hat, "eps": resid / s, "score": -resid / s**2, "velocity": a_dot * x0_hat + (s_dot / s) * resid}[p]


@pytest.mark.parametrize("sched_name", ["vp-cosine", "flow-bridge"])
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("group", ["cube", "species"])
def test_orbit_mode_target_is_the_posterior_mean(sched_name, parameterization, group):
    """Orbit mode: x0_hat is the brute-force posterior mean over the orbit of the augmented x0,
    and each parameterization follows from x0_hat."""
    sched = SCHEDULES[sched_name]()
    data = make_batch(seed=45)
    rots = cube_rotations()
    orbit = FiniteGroup(torch.as_tensor(rots)) if group == "cube" else SpeciesPermutation(max_candidates=50)
    loss = OrbitDiffusionLoss(sched, orbit, mode="orbit", parameterization=parameterization)
    # noisy times, where the posterior over the group is spread (the flow has data at t = 1)
    lo, hi = (0.6, 0.95) if sched_name.startswith("vp") else (0.05, 0.5)
    t = torch.linspace(lo, hi, data.num_graphs, dtype=torch.float64)
    noisy = loss.corrupt(data, generator=_gen(2), t=t)
    x0, xt = noisy.x0.numpy(), noisy.xt.numpy()
    x0_hat = np.zeros_like(x0)
    spread = 0
    for b in range(data.num_graphs):
        sl = graph_slice(data, b)
        if group == "cube":
            cands = [x0[sl] @ r.T for r in rots]
        else:
            cands = [x0[sl][list(p)] for p in species_group(data.z[sl].tolist())]
        x0_hat[sl], w = gaussian_posterior_mean(x0[sl], xt[sl], float(noisy.alpha[b]), float(noisy.sigma[b]), cands)
        assert float(noisy.ess[b]) == pytest.approx(ess(w), rel=1e-8)
        spread += ess(w) > 1.5
    assert spread >= 2  # the test is not trivially the plain target
    a, s = _per_node(noisy.alpha, data.batch), _per_node(noisy.sigma, data.batch)
    a_dot, s_dot = _per_node(sched.alpha_dot(t), data.batch), _per_node(sched.sigma_dot(t), data.batch)
    expected = _expected_target(parameterization, torch.as_tensor(x0_hat), noisy.xt, a, s, a_dot, s_dot)
    assert torch.allclose(noisy.target, expected, atol=1e-9)
    assert noisy.log_weights is not None and torch.allclose(noisy.log_weights.exp().sum(1), torch.ones(data.num_graphs, dtype=torch.float64))


# --- the torus kernel ---------------------------------------------------------------------------


def _frac_batch(seed=46):
    data = make_batch([[6, 1, 1, 1], [8, 8], [1, 1, 1, 1, 1]], seed=seed)
    data.pos = torch.rand(data.pos.shape, generator=_gen(seed), dtype=torch.float64)
    return data


def test_wrapped_normal_plain_score_target():
    data = _frac_batch()
    loss = OrbitDiffusionLoss(VESchedule(0.005, 0.5), mode="plain", parameterization="score", kernel=WrappedNormalKernel())
    assert loss.center is False
    noisy = loss.corrupt(data, generator=_gen(3))
    assert float(noisy.xt.min()) >= 0 and float(noisy.xt.max()) < 1
    s = _per_node(noisy.sigma, data.batch).numpy()
    d = (noisy.xt - data.pos).numpy()
    ref = np.stack([wrapped_normal_score(d[i], float(s[i, 0])) for i in range(d.shape[0])])
    assert np.allclose(noisy.target.numpy(), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("mode", ["orbit", "augment"])
def test_wrapped_normal_orbit_score_target_with_shift_factor(mode):
    data = _frac_batch(47)
    m = 3
    grid = TorusTranslations(m=m)._grid().numpy()
    loss = OrbitDiffusionLoss(VESchedule(0.05, 0.5), TorusTranslations(m=m), mode=mode, parameterization="score",
                              kernel=WrappedNormalKernel())
    t = torch.tensor([0.8, 0.9, 1.0], dtype=torch.float64)  # sigma ~ 0.3 - 0.5: a spread posterior
    noisy = loss.corrupt(data, generator=_gen(4), t=t)
    x0, xt = noisy.x0.numpy(), noisy.xt.numpy()
    for b in range(data.num_graphs):
        sl = graph_slice(data, b)
        sigma = float(noisy.sigma[b])
        # the augmented x0 is the data shifted by one grid translation (mod 1)
        assert ((x0[sl] >= 0) & (x0[sl] < 1)).all()  # torus coordinates stay in [0, 1)
        diff = np.remainder(x0[sl] - data.pos[sl].numpy(), 1.0)
        shift = diff[0]
        assert np.allclose(np.remainder(diff - shift + 0.5, 1.0) - 0.5, 0, atol=1e-12)
        assert np.allclose(np.remainder(shift * m + 1e-9, 1.0), 0, atol=1e-6)
        if mode == "augment":
            ref = wrapped_normal_score(xt[sl] - x0[sl], sigma)
            assert np.allclose(noisy.target[sl].numpy(), ref, rtol=1e-8, atol=1e-8)
            continue
        logits = np.array([wrapped_normal_logpdf(xt[sl] - x0[sl] - g, sigma).sum() for g in grid])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        ref = sum(wk * wrapped_normal_score(xt[sl] - x0[sl] - g, sigma) for wk, g in zip(w, grid))
        assert np.allclose(noisy.target[sl].numpy(), ref, rtol=1e-7, atol=1e-7)
        assert float(noisy.ess[b]) == pytest.approx(ess(w), rel=1e-7)
        assert ess(w) > 1.5
    if mode == "orbit":
        assert math.isfinite(float(loss.criterion(torch.zeros_like(noisy.xt), noisy)))
