"""Noise schedules: closed forms, grids, derivatives, time sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orbit_pyg.schedules import FlowSchedule, VESchedule, VPSchedule


def _interior_times(n=37):
    # off-grid times (the VP schedule is piecewise linear in log abar between grid points)
    return torch.linspace(0.013, 0.987, n, dtype=torch.float64) + 1e-4 * math.pi


# --- VP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_vp_variance_preserving_and_monotone(kind):
    sched = VPSchedule(kind, num_steps=1000)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), atol=1e-12)
    assert float(a[0]) == pytest.approx(1.0, abs=1e-15) and float(s[0]) == pytest.approx(0.0, abs=1e-15)
    assert bool((a[1:] <= a[:-1]).all()) and bool((s[1:] >= s[:-1]).all())
    assert bool((a[1:] < a[:-1]).sum() > 1900)  # strictly decreasing almost everywhere
    assert float(s[-1]) > 0.99


def test_vp_cosine_grid_values_and_clipping():
    T, s_off = 1000, 0.008
    sched = VPSchedule("cosine", num_steps=T, s=s_off, beta_min=1e-4, beta_max=0.9999)
    k = np.arange(T + 1)
    f = np.cos((k / T + s_off) / (1 + s_off) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 1e-4, 0.9999)
    assert np.allclose(sched.betas.numpy(), betas, rtol=0, atol=1e-15)
    assert float(sched.betas.min()) >= 1e-4 and float(sched.betas.max()) <= 0.9999
    assert float(sched.betas[-1]) == pytest.approx(0.9999)  # f(1) = 0 forces the clip
    abar = np.cumprod(1 - betas)
    grid = sched.timesteps()
    assert np.allclose(grid.numpy(), k[1:] / T)
    assert np.allclose(sched.alpha(grid).numpy() ** 2, abar, rtol=1e-10, atol=1e-15)
    assert (betas[:3] == 1e-4).all()  # the first cosine betas are below beta_min: clipped
    # without clipping, abar_k = f(k/T) / f(0) telescopes exactly
    loose = VPSchedule("cosine", num_steps=T, s=s_off, beta_min=1e-12, beta_max=0.9999)
    assert np.allclose(loose.alpha(grid).numpy()[:-1] ** 2, (f[1:] / f[0])[:-1], rtol=1e-9)


def test_vp_linear_betas_and_grid():
    sched = VPSchedule("linear", num_steps=200, beta_start=1e-4, beta_end=0.02)
    betas = np.linspace(1e-4, 0.02, 200)
    assert np.allclose(sched.betas.numpy(), betas, atol=1e-15)
    abar = np.cumprod(1 - betas)
    assert np.allclose(sched.sigma(sched.timesteps()).numpy() ** 2, 1 - abar, rtol=1e-10)


def test_vp_unknown_kind():
    with pytest.raises(ValueError, match="unknown VP schedule kind"):
        VPSchedule("quadratic")


# --- VE ----------------------------------------------------------------------------------------


def test_ve_geometric_endpoints_and_ratio():
    sched = VESchedule(0.005, 0.5, num_steps=1000)
    grid = sched.timesteps()
    sig = sched.sigma(grid)
    assert float(sig[0]) == pytest.approx(0.005, rel=1e-12)
    assert float(sig[-1]) == pytest.approx(0.5, rel=1e-12)
    ratios = sig[1:] / sig[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 999)), rtol=1e-12)
    assert torch.equal(sched.alpha(grid), torch.ones_like(grid))
    t = torch.rand(50, dtype=torch.float64)
    assert torch.allclose(sched.sigma(t), 0.005 ** (1 - t) * 0.5**t, rtol=1e-12)


def test_ve_bad_range():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule(0.5, 0.005)


# --- flow --------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_flow_alpha_sigma(noise):
    sched = FlowSchedule(noise=noise)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(sched.alpha(t), t)
    expected = torch.sqrt((1 - t) ** 2 + noise**2 * t * (1 - t))
    assert torch.allclose(sched.sigma(t), expected, atol=1e-15)
    assert float(sched.sigma(torch.tensor(1.0))) == 0.0
    assert sched.data_at_one and not VPSchedule().data_at_one


def test_time_out_of_range_rejected():
    for sched in (VPSchedule(), VESchedule(), FlowSchedule()):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            sched.sigma(torch.tensor([0.5, 1.5]))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            sched.alpha(torch.tensor([float("nan")]))


# --- derivatives -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sched",
    [VPSchedule("cosine"), VPSchedule("linear"), VESchedule(0.005, 0.5), VESchedule(0.01, 80.0),
     FlowSchedule(0.0), FlowSchedule(0.5)],
    ids=["vp-cos", "vp-lin", "ve", "ve-wide", "flow", "flow-noisy"],
)
def test_derivatives_match_finite_differences(sched):
    t = _interior_times()
    h = 1e-7
    fd_a = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    fd_s = (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h)
    assert torch.allclose(sched.alpha_dot(t), fd_a, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sched.sigma_dot(t), fd_s, rtol=1e-5, atol=1e-6)


def test_flow_velocity_identity():
    """For the flow interpolant with noise 0, alpha' x1 + sigma' eps = x1 - x_prior."""
    sched = FlowSchedule(0.0)
    t = _interior_times()
    assert torch.allclose(sched.alpha_dot(t), torch.ones_like(t))
    assert torch.allclose(sched.sigma_dot(t), -torch.ones_like(t), atol=1e-12)


# --- time sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("sched", [VPSchedule(num_steps=50), VESchedule(num_steps=50), FlowSchedule(num_steps=50, discrete=True)])
def test_discrete_sample_time_on_grid(sched):
    t = sched.sample_time(4000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and t.shape == (4000,)
    grid = sched.timesteps()
    dist = (t.view(-1, 1) - grid.view(1, -1)).abs().min(1).values
    assert float(dist.max()) == 0.0
    # every grid point is hit (50 points, 4000 draws), roughly uniformly
    counts = torch.bincount((t.view(-1, 1) == grid.view(1, -1)).float().argmax(1), minlength=50)
    assert int(counts.min()) > 40 and int(counts.max()) < 140


@pytest.mark.parametrize("sched", [VPSchedule(num_steps=50, discrete=False), VESchedule(discrete=False), FlowSchedule(t_max=0.9)])
def test_continuous_sample_time(sched):
    t = sched.sample_time(5000, generator=torch.Generator().manual_seed(0))
    lo, hi = sched.time_range()
    assert float(t.min()) >= lo and float(t.max()) <= hi
    assert t.unique().numel() == 5000  # not on a grid
    # uniform on [lo, hi]: KS-like check of the empirical CDF
    u = ((t - lo) / (hi - lo)).sort().values
    ecdf = torch.arange(1, 5001, dtype=torch.float64) / 5000
    assert float((u - ecdf).abs().max()) < 0.03
    assert (sched.sigma(t) > 0).all()


@pytest.mark.parametrize("discrete", [True, False])
def test_sample_time_generator_seeding(discrete):
    sched = VPSchedule(num_steps=1000, discrete=discrete)
    a = sched.sample_time(64, generator=torch.Generator().manual_seed(7))
    b = sched.sample_time(64, generator=torch.Generator().manual_seed(7))
    c = sched.sample_time(64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_num_steps():
    with pytest.raises(ValueError, match="num_steps"):
        VPSchedule(num_steps=0)
