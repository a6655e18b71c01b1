"""Forward kernels: Gaussian and wrapped normal against brute force."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import stats

from _reference import wrapped_normal_logpdf, wrapped_normal_score
from orbit_pyg.kernels import GaussianKernel, WrappedNormalKernel

SIGMAS = [1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.299, 0.3, 0.301, 0.5, 1.0, 2.0, 10.0]


def _wn_terms(kernel, d: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-coordinate log density at displacement ``d`` (``x0 = 0``)."""
    x0 = torch.zeros_like(d)
    return kernel.log_prob_terms(d, x0, None, torch.full_like(d, sigma))


# --- Gaussian ----------------------------------------------------------------------------------


def test_gaussian_log_prob_and_score():
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    alpha = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
    sigma = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
    k = GaussianKernel()
    lp = k.log_prob_terms(xt, x0, alpha, sigma)
    ref = stats.norm.logpdf(xt.numpy(), loc=(alpha * x0).numpy(), scale=sigma.numpy())
    assert np.allclose(lp.numpy(), ref, atol=1e-12)
    xr = xt.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(k.log_prob_terms(xr, x0, alpha, sigma).sum(), xr)
    assert torch.allclose(k.score(xt, x0, alpha, sigma), grad, atol=1e-12)
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(k.perturb(x0, alpha, sigma, eps), alpha * x0 + sigma * eps)


# --- wrapped normal ----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", SIGMAS)
def test_wrapped_normal_log_density_matches_image_sum(sigma):
    k = WrappedNormalKernel()
    # displacements all over the torus, including near the antipode and beyond one period
    d = torch.cat([torch.linspace(-1.7, 1.7, 301, dtype=torch.float64), torch.tensor([0.5, -0.5, 0.0, 1e-9, 0.4999999])])
    got = _wn_terms(k, d, sigma).numpy()
    ref = wrapped_normal_logpdf(d.numpy(), sigma)
    finite = np.isfinite(ref)
    # at tiny sigma the far side of the torus has log densities ~ -1e7: compare relatively there
    assert np.allclose(got[finite], ref[finite], rtol=1e-9, atol=1e-9)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_wrapped_normal_score_matches_brute_force_and_autograd(sigma):
    k = WrappedNormalKernel()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(40, 3, generator=g, dtype=torch.float64)
    # x_t near x0 (where the density lives) and anywhere on the torus
    xt = torch.cat([
        torch.remainder(x0[:20] + min(sigma, 0.3) * torch.randn(20, 3, generator=g, dtype=torch.float64), 1.0),
        torch.rand(20, 3, generator=g, dtype=torch.float64),
    ])
    s = torch.full_like(xt, sigma)
    score = k.score(xt, x0, None, s)
    assert torch.isfinite(score).all()
    d = (xt - x0).numpy()
    ref = wrapped_normal_score(d, sigma)
    scale = 1.0 / sigma**2  # natural size of the score
    assert np.allclose(score.numpy(), ref, rtol=1e-8, atol=1e-9 * scale)
    xr = xt.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(k.log_prob_terms(xr, x0, None, s).sum(), xr)
    assert torch.allclose(score, grad, rtol=1e-8, atol=1e-9 * scale)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.3, 1.0, 10.0])
def test_wrapped_normal_score_finite_differences(sigma):
    k = WrappedNormalKernel()
    d = torch.linspace(-0.49, 0.49, 99, dtype=torch.float64)
    h = 1e-6 * min(sigma, 1.0)
    fd = (_wn_terms(k, d + h, sigma) - _wn_terms(k, d - h, sigma)) / (2 * h)
    score = k.score(d, torch.zeros_like(d), None, torch.full_like(d, sigma))
    assert torch.allclose(score, fd, rtol=1e-5, atol=1e-5 / sigma)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2, 0.299, 0.3, 0.7, 3.0, 10.0])
def test_wrapped_normal_normalized_on_unit_interval(sigma):
    k = WrappedNormalKernel()
    n = 20000  # periodic trapezoid rule: spectrally accurate once the grid resolves sigma
    x = torch.arange(n, dtype=torch.float64) / n
    dens = torch.exp(_wn_terms(k, x - 0.3, sigma))
    assert float(dens.mean()) == pytest.approx(1.0, abs=1e-9)


def test_wrapped_normal_periodic_and_continuous_at_switch():
    k = WrappedNormalKernel()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(30, 3, generator=g, dtype=torch.float64)
    xt = torch.rand(30, 3, generator=g, dtype=torch.float64)
    for sigma in [1e-3, 0.1, 0.5, 5.0]:
        s = torch.full_like(xt, sigma)
        base_lp, base_sc = k.log_prob_terms(xt, x0, None, s), k.score(xt, x0, None, s)
        for shift in (1.0, -3.0, 7.0):
            assert torch.allclose(k.log_prob_terms(xt + shift, x0, None, s), base_lp, atol=1e-7, rtol=1e-9)
            assert torch.allclose(k.score(xt + shift, x0, None, s), base_sc, atol=1e-6 / sigma, rtol=1e-7)
            assert torch.allclose(k.log_prob_terms(xt, x0 + shift, None, s), base_lp, atol=1e-7, rtol=1e-9)
    # the image-sum and Fourier branches agree at the switch point
    d = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64)
    lo = _wn_terms(k, d, k.switch * (1 - 1e-12))
    hi = _wn_terms(k, d, k.switch)
    assert torch.allclose(lo, hi, atol=1e-10)


def test_wrapped_normal_perturb_in_unit_cube():
    k = WrappedNormalKernel()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(100, 3, generator=g)
    for sigma in [1e-4, 0.1, 3.0]:
        xt = k.perturb(x0, None, torch.full((100, 1), sigma), torch.randn(100, 3, generator=g))
        assert float(xt.min()) >= 0.0 and float(xt.max()) < 1.0
    # small noise: x_t - x0 wraps back to the noise itself
    eps = torch.randn(100, 3, generator=g, dtype=torch.float64)
    xt = k.perturb(x0.double(), None, 1e-3, eps)
    d = xt - x0.double()
    assert torch.allclose(d - torch.round(d), 1e-3 * eps, atol=1e-12)


def test_wrapped_normal_float32_is_finite_and_accurate():
    k = WrappedNormalKernel()
    d = torch.linspace(-0.5, 0.5, 201, dtype=torch.float32)
    for sigma in [1e-4, 1e-2, 0.3, 10.0, 1e3]:
        lp = _wn_terms(k, d, sigma)
        sc = k.score(d, torch.zeros_like(d), None, torch.full_like(d, sigma))
        assert torch.isfinite(lp).all() and torch.isfinite(sc).all()
        if sigma >= 1e-2:
            # beyond sigma ~ 10 the wrapped normal is uniform to within exp(-2 pi^2 sigma^2)
            ref = wrapped_normal_logpdf(d.double().numpy(), sigma) if sigma <= 10 else np.zeros(d.numel())
            assert np.allclose(lp.double().numpy(), ref, rtol=1e-4, atol=1e-4)
