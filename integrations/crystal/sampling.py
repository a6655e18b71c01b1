r"""Reverse-process samplers for crystal structure prediction (composition given, lattice and
fractional coordinates generated).

:class:`PredictorCorrector` is DiffCSP's sampler, generalized to a strided time grid
``T = k_S > ... > k_1 >= 1`` (``num_steps = T`` reproduces DiffCSP exactly; fewer steps is the
faster sampler):

* coordinates (wrapped normal, VE): a Langevin corrector at ``sigma_k`` with step
  ``step_lr · (sigma_k / sigma_1)^2``, then the reverse-SDE predictor from ``sigma_k`` to the next
  ``sigma_k'`` (``sigma = 0`` after the last step):
  ``F <- F + (sigma_k^2 - sigma_k'^2) · score + sqrt(sigma_k'^2 (sigma_k^2 - sigma_k'^2) / sigma_k^2) · z``,
  wrapped into ``[0, 1)``; ``score = model_output · sqrt(lambda_k)`` (the model predicts the normalized
  score);
* lattice (DDPM, cosine): the DDIM update with ``eta`` from ``abar_k`` to ``abar_k'``; with
  consecutive steps and ``eta = 1`` it is DDPM's ancestral step with the posterior variance
  ``beta_k (1 - abar_{k-1}) / (1 - abar_k)``, as in DiffCSP.

Priors: ``L_T ~ N(0, I)``, ``F_T ~ U[0, 1)``.

Conditioning: ``sample(..., cond=c)`` / ``step(..., cond=c)`` pass a per-crystal condition
``[B, d]`` to a conditional network, combined by classifier-free guidance with the sampler's
``guidance`` scale ``s`` (:func:`~.condition.guided_model`: ``o(null) + s (o(c) - o(null))``;
``s = 1``, the default, is the plain conditional prediction, ``s = 0`` the unconditioned one).
``cond=None`` calls the model exactly as before (for a conditional :class:`~.model.CSPNet`, the
null condition).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .condition import guided_model
from .diffusion import CrystalDiffusion


def step_grid(num_steps: int, total: int) -> list[int]:
    """Strided grid ``k_S = T > ... > k_1 >= 1`` of ``num_steps`` distinct steps (all ``T`` when equal)."""
    if not 1 <= num_steps <= total:
        raise ValueError(f"`num_steps` must lie in [1, {total}], got {num_steps}")
    grid = torch.linspace(total, 1, num_steps).round().long().unique_consecutive().tolist()
    return grid


class PredictorCorrector:
    """DiffCSP's predictor-corrector sampler on a (possibly strided) step grid.

    Args:
        model: ``model(z, frac_t, cell_t, t, batch, num_graphs) -> (lattice_eps [B,3,3], coord_score_normalized [N,3])``.
        diffusion: the :class:`~.diffusion.CrystalDiffusion` the model was trained with.
        num_steps: steps of the grid (``diffusion.num_steps`` = DiffCSP's 1000).
        step_lr: corrector step size scale (DiffCSP: 5e-7 Perov-5, 1e-5 MP-20); 0 disables it.
        eta: DDIM stochasticity of the lattice update (1 = ancestral).
        lattice_clip: clip the predicted clean lattice entries to ``[-c, c]`` Å at every step
            (``None``: no clipping, DiffCSP's sampler). Strided grids need it: without it the
            first steps from ``abar_T ~ 1e-9`` amplify the model's error into huge cells.
        guidance: classifier-free guidance scale ``s`` used when a ``cond`` is passed (keyword only;
            1 = the conditional prediction, 0 = the unconditioned one, > 1 = stronger guidance).

    Example:
        >>> import torch
        >>> zero = lambda z, f, l, t, b, n: (torch.zeros_like(l), torch.zeros_like(f))
        >>> sampler = PredictorCorrector(zero, CrystalDiffusion(50), num_steps=10)
        >>> frac, cell = sampler.sample(torch.tensor([8, 8, 22]), torch.zeros(3, dtype=torch.long), generator=torch.Generator().manual_seed(0))
        >>> frac.shape, cell.shape, bool(((frac >= 0) & (frac < 1)).all())
        (torch.Size([3, 3]), torch.Size([1, 3, 3]), True)
    """

    def __init__(
        self,
        model: Callable,
        diffusion: CrystalDiffusion,
        num_steps: Optional[int] = None,
        step_lr: float = 5e-7,
        eta: float = 1.0,
        lattice_clip: Optional[float] = None,
        *,
        guidance: float = 1.0,
    ):
        self.model, self.diffusion = model, diffusion
        self.guidance = float(guidance)
        if not math.isfinite(self.guidance):
            raise ValueError(f"`guidance` must be finite, got {guidance}")
        self.num_steps = int(diffusion.num_steps if num_steps is None else num_steps)
        self.grid = step_grid(self.num_steps, diffusion.num_steps)
        self.step_lr, self.eta = float(step_lr), float(eta)
        if lattice_clip is not None and not lattice_clip > 0:
            raise ValueError(f"`lattice_clip` must be positive or None, got {lattice_clip}")
        self.lattice_clip = lattice_clip

    def __repr__(self) -> str:
        return (f"PredictorCorrector(num_steps={self.num_steps}, step_lr={self.step_lr}, eta={self.eta}"
                + (f", guidance={self.guidance})" if self.guidance != 1.0 else ")"))

    def _predict(self, z, frac, cell, k: int, batch, b, cond: Optional[Tensor] = None):
        t = torch.full((b,), k / self.diffusion.num_steps, dtype=frac.dtype, device=frac.device)
        model = self.model if cond is None else guided_model(self.model, cond, self.guidance)
        lattice_eps, coord = model(z, frac, cell, t, batch, b)
        score = coord * self.diffusion.score_norms[k - 1].sqrt().to(frac.dtype)
        return lattice_eps, score

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        batch: Tensor,
        num_graphs: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[int, Tensor, Tensor], None]] = None,
        dtype: torch.dtype = torch.float32,
        *,
        cond: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Generate ``(frac_coords [N, 3], cell [B, 3, 3])`` for the compositions ``z`` grouped by ``batch``.

        ``callback(k, frac, cell)`` is called after every step (e.g. to record a trajectory);
        ``cond [B, d]``: per-crystal condition of a conditional model (guided by ``self.guidance``).
        """
        if z.dim() != 1 or batch.shape != z.shape:
            raise ValueError(f"`z` and `batch` must be matching [N] vectors, got {list(z.shape)} and {list(batch.shape)}")
        if z.numel() == 0:
            raise ValueError("empty composition: nothing to sample")
        b = int(num_graphs or int(batch.max()) + 1)
        if isinstance(self.model, nn.Module):
            self.model.eval()
        frac, cell = self.prior(z.numel(), b, generator=generator, dtype=dtype, device=z.device)
        grid = self.grid + [0]
        for k, k_next in zip(grid[:-1], grid[1:]):
            frac, cell = self.step(z, frac, cell, k, k_next, batch, b, generator=generator, cond=cond)
            if callback is not None:
                callback(k, frac, cell)
        return frac, cell

    def prior(self, num_atoms: int, num_graphs: int, generator: Optional[torch.Generator] = None,
              dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """Draw the prior ``F_T ~ U[0, 1)^{N x 3}``, ``L_T ~ N(0, I)^{B x 3 x 3}`` (in this order)."""
        frac = torch.rand(num_atoms, 3, generator=generator, dtype=dtype, device=device)
        cell = torch.randn(num_graphs, 3, 3, generator=generator, dtype=dtype, device=device)
        return frac, cell

    @torch.no_grad()
    def step(self, z: Tensor, frac: Tensor, cell: Tensor, k: int, k_next: int, batch: Tensor, num_graphs: int,
             generator: Optional[torch.Generator] = None, *, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One reverse step from grid step ``k`` to ``k_next < k`` (``0`` = the end): corrector, then predictor.

        :meth:`sample` is ``prior`` followed by ``step`` over ``zip(grid, grid[1:] + [0])``; callers that
        drive the chain themselves (e.g. an ASE dynamics) use the same two methods.
        """
        if not 0 <= k_next < k <= self.diffusion.num_steps:
            raise ValueError(f"need 0 <= k_next < k <= {self.diffusion.num_steps}, got k={k}, k_next={k_next}")
        d, b, dev, dtype = self.diffusion, num_graphs, frac.device, frac.dtype
        sigmas, abar = d.sigmas, d.alpha_bars
        sigma_first = float(sigmas[0])
        sigma = float(sigmas[k - 1])
        sigma_next = float(sigmas[k_next - 1]) if k_next > 0 else 0.0
        last = k_next == 0
        # corrector (coordinates only, as DiffCSP)
        if self.step_lr > 0:
            _, score = self._predict(z, frac, cell, k, batch, b, cond)
            step = self.step_lr * (sigma / sigma_first) ** 2
            noise = 0.0 if last else torch.randn(frac.shape, generator=generator, dtype=dtype, device=dev)
            frac = torch.remainder(frac + step * score + (2 * step) ** 0.5 * noise, 1.0)
        # predictor
        lattice_eps, score = self._predict(z, frac, cell, k, batch, b, cond)
        step = sigma**2 - sigma_next**2
        std = (sigma_next**2 * step / sigma**2) ** 0.5
        noise = torch.randn(frac.shape, generator=generator, dtype=dtype, device=dev)
        frac = torch.remainder(frac + step * score + std * noise, 1.0)
        cell = self._lattice_step(cell, lattice_eps, float(abar[k]), float(abar[k_next]), generator)
        return frac, cell

    def _lattice_step(self, cell: Tensor, eps: Tensor, abar: float, abar_next: float, generator) -> Tensor:
        cell0 = (cell - (1 - abar) ** 0.5 * eps) / abar**0.5
        if self.lattice_clip is not None:
            # near k = T, abar ~ 1e-9 turns a small eps error into a huge L0 estimate; a strided
            # step carries it into the sample (the full 1000-step chain damps it). Clipping the
            # estimate to the data's range (as image DDPMs clip to [-1, 1]) removes the blow-up.
            cell0 = cell0.clamp(-self.lattice_clip, self.lattice_clip)
            eps = (cell - abar**0.5 * cell0) / (1 - abar) ** 0.5
        if abar_next >= 1.0:
            return cell0
        s = self.eta * ((1 - abar_next) / (1 - abar)) ** 0.5 * (1 - abar / abar_next) ** 0.5
        direction = max(1 - abar_next - s**2, 0.0) ** 0.5
        noise = torch.randn(cell.shape, generator=generator, dtype=cell.dtype, device=cell.device)
        return abar_next**0.5 * cell0 + direction * eps + s * noise
