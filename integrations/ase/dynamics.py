r"""The reverse diffusion process as an ASE dynamics: ``ReverseDiffusion(atoms, model).run()``.

Each ``step()`` is one step of the model's reverse process on the grid ``k_S = T > ... > k_1 >= 1``
(then ``0``), done by the crystal sampler's own update,
:meth:`~orbit_pyg.integrations.crystal.sampling.PredictorCorrector.step` (DiffCSP's Langevin
corrector + reverse-SDE predictor on the fractional coordinates, DDPM/DDIM update of the lattice);
the new fractional coordinates and lattice are written into the Atoms (``set_cell(scale_atoms=False)``
then ``set_scaled_positions``), so positions **and** cell move. ``atoms.info["denoiser_t"]`` /
``["denoiser_step"]`` hold the noise level the structure has reached (0 at the end).

The ASE idiom is kept: ``trajectory=`` (one frame per ``loginterval`` steps, the start included;
read it back with ``ase.io.read(path, index=":")``), ``logfile=`` (``"-"`` for stdout),
``attach(function, interval=...)``, ``run(steps=...)`` / ``irun``, and ``converged()`` once the
process reached ``t = 0``.

Start. ``t_start=1`` (default) replaces the structure by a draw from the prior (``F ~ U[0, 1)``,
``L ~ N(0, I)``; the Atoms only fixes the composition). ``t_start < 1`` keeps the structure and
noises it forward to ``k_start = round(t_start T)`` first (``F + sigma eps mod 1``,
``sqrt(abar) L + sqrt(1 - abar) eps``), then denoises it back: a model-guided rattle-and-refine.
At the end a left-handed cell is flipped to ``-L`` with ``F -> -F`` (same Cartesian positions).

Condition (conditional crystal runs): ``text=`` / ``props=`` / ``guidance=`` as in
:func:`~.generate.generate` (neither: the null condition); every step then passes it to the sampler.

Molecules (a conformer model of :mod:`orbit_pyg.integrations.molecule`): the chain runs on the model's
own uniform time grid (as :func:`~orbit_pyg.integrations.molecule.sampling.time_grid`) with the molecule sampler's own update,
:func:`~orbit_pyg.integrations.molecule.sampling.reverse_step` (DDIM ``"ode"`` or ancestral ``"sde"``) on centred Cartesian positions, the last step
returning ``x0_hat``; only positions move (no cell). The graph comes from ``graph=`` (SMILES, RDKit
``Mol`` or graph ``Data``), else from the starting Atoms' geometry. Same seed, steps and sampler give
the same conformer as :func:`~orbit_pyg.integrations.molecule.sampling.sample_positions` on a batch of one.
"""
from __future__ import annotations

import time
from typing import IO, Any, Optional

import numpy as np
import torch
from ase.optimize.optimize import BaseDynamics

from .models import (
    CrystalDenoiser, MoleculeDenoiser, as_denoiser, check_graph_matches, check_molecule, check_periodic, right_handed,
)

__all__ = ["ReverseDiffusion"]


class _CrystalChain:
    """Reverse chain of a crystal denoiser: the PredictorCorrector's ``prior`` and ``step`` on one crystal."""

    def __init__(self, den: CrystalDenoiser, atoms: Any, num_steps: Optional[int], step_lr: Optional[float],
                 t_start: float, generator: torch.Generator, text: Optional[str] = None, props: Any = None,
                 guidance: Optional[float] = None):
        from orbit_pyg.integrations.crystal.sampling import step_grid

        check_periodic(atoms)
        self.den, self.generator = den, generator
        total = den.diffusion.num_steps
        k_start = den.step_of(t_start)
        if num_steps is None:
            num_steps = max(1, round(den.num_steps * k_start / total))
        self.cond, self.asked = den.condition(1, text=text, props=props)
        self.sampler = den.sampler(num_steps=None, step_lr=step_lr, guidance=guidance)
        self.grid = step_grid(min(int(num_steps), k_start), k_start) + [0]
        dtype, dev = den.dtype, den.device
        self.z = torch.as_tensor(atoms.numbers, dtype=torch.long, device=dev)
        self.batch = torch.zeros(len(atoms), dtype=torch.long, device=dev)
        if t_start >= 1.0:
            self.frac, self.cell = self.sampler.prior(len(atoms), 1, generator=generator, dtype=dtype, device=dev)
        else:  # forward-noise the given crystal to k_start
            d = den.diffusion
            cell0 = torch.as_tensor(atoms.cell.array, dtype=dtype, device=dev).reshape(1, 3, 3)
            frac0 = torch.as_tensor(atoms.get_scaled_positions(wrap=True), dtype=dtype, device=dev)
            sigma, abar = float(d.sigmas[k_start - 1]), float(d.alpha_bars[k_start])
            noise = torch.randn(frac0.shape, generator=generator, dtype=dtype, device=dev)
            self.frac = torch.remainder(frac0 + sigma * noise, 1.0)
            noise = torch.randn(cell0.shape, generator=generator, dtype=dtype, device=dev)
            self.cell = abar**0.5 * cell0 + (1 - abar) ** 0.5 * noise

    def t(self, i: int) -> float:
        return self.grid[i] / self.den.diffusion.num_steps

    def step(self, i: int) -> None:
        k, k_next = self.grid[i], self.grid[i + 1]
        self.frac, self.cell = self.sampler.step(self.z, self.frac, self.cell, k, k_next, self.batch, 1,
                                                 generator=self.generator, cond=self.cond)
        if not (torch.isfinite(self.frac).all() and torch.isfinite(self.cell).all()):
            raise FloatingPointError(f"the reverse process produced non-finite coordinates at step {k}")

    def write(self, atoms: Any, i: int) -> None:
        frac = self.frac.detach().cpu().double().numpy()
        cell = self.cell[0].detach().cpu().double().numpy()
        if self.grid[i] == 0:
            frac, cell = right_handed(frac, cell)
        atoms.set_cell(cell, scale_atoms=False)
        atoms.set_scaled_positions(frac)
        atoms.info["denoiser_step"] = int(self.grid[i])

    def todict(self) -> dict:
        out = {"step_lr": self.sampler.step_lr}
        if self.asked is not None:
            out.update({"guidance": self.sampler.guidance, **{k: str(v) for k, v in self.asked.items()}})
        return out


class _MoleculeChain:
    """Reverse chain of a conformer model: the molecule sampler's ODE / SDE update on one molecule."""

    def __init__(self, den: MoleculeDenoiser, atoms: Any, graph: Any, num_steps: Optional[int], t_start: float,
                 generator: torch.Generator):
        from torch_geometric.data import Batch

        from orbit_pyg._utils import center
        from orbit_pyg.integrations.molecule.sampling import graph_only

        check_molecule(atoms)
        self.den, self.generator = den, generator
        graph = den.graph(graph if graph is not None else atoms)
        check_graph_matches(graph, atoms)
        self.dev = next(den.model.parameters()).device
        self.graph = Batch.from_data_list([graph_only(graph)]).to(self.dev)
        self.bvec = self.graph.batch
        sch = den.schedule
        steps = int(num_steps or den.num_steps)
        s0 = den.model_time(t_start)
        end = 1.0 if sch.data_at_one else 0.0
        self.grid = torch.linspace(s0, end, steps + 1, dtype=torch.float64, device=self.dev)
        n = len(atoms)
        noise = center(torch.randn(n, 3, generator=generator, dtype=torch.float64, device=self.dev), self.bvec, 1)
        if t_start >= 1.0:  # the prior, exactly as sample_positions draws it
            self.x = noise * sch.sigma(self.grid[0]).item()
        else:
            x0 = center(torch.as_tensor(atoms.positions, dtype=torch.float64, device=self.dev), self.bvec, 1)
            self.x = sch.alpha(self.grid[0]).item() * x0 + sch.sigma(self.grid[0]).item() * noise

    def t(self, i: int) -> float:
        s = float(self.grid[i])
        return 1.0 - s if self.den.schedule.data_at_one else s

    def step(self, i: int) -> None:
        from orbit_pyg.integrations.molecule.sampling import reverse_step

        den = self.den
        self.x = reverse_step(den.model, self.x, self.grid[i], self.grid[i + 1], self.graph, self.bvec, 1,
                              den.sampler_kind, last=i == len(self.grid) - 2, generator=self.generator, clip=den.clip)
        if not torch.isfinite(self.x).all():
            raise FloatingPointError(f"the reverse process produced non-finite positions at step {i}")

    def write(self, atoms: Any, i: int) -> None:
        atoms.positions = self.x.detach().cpu().numpy()

    def todict(self) -> dict:
        return {"sampler": self.den.sampler_kind}


class ReverseDiffusion(BaseDynamics):
    r"""Sample a structure by moving an Atoms along a trained model's reverse process (module docstring).

    Args:
        atoms: a periodic ``Atoms`` for a crystal model, a non-periodic one for a conformer model (its
            numbers are the composition; its geometry is the start when ``t_start < 1``).
        model: a :class:`~.models.CrystalDenoiser` / :class:`~.models.MoleculeDenoiser`, a run folder,
            ``(net, cfg)`` or a ``ConformerModel`` (see :func:`~.models.as_denoiser`).
        cfg: the ``CSPConfig`` when ``model`` is a bare crystal network.
        num_steps: reverse steps from ``t_start`` to 0 (default: the model's, scaled by ``t_start`` for crystals).
        step_lr: crystals: corrector step scale (default: the model's).
        t_start: noise level to start from (1 = the prior).
        graph: molecules: the molecular graph (SMILES, RDKit ``Mol``, graph ``Data``); default: from the Atoms' geometry.
        text, props, guidance: crystals: the condition of a conditional run and the guidance scale ``s``
            (as :func:`~.generate.generate`; neither text nor props: the null condition).
        seed: seed of the ``torch.Generator`` driving the noise (or pass ``generator``).
        logfile, trajectory, append_trajectory, loginterval: as in every ASE dynamics.

    Example:
        >>> from ase.build import bulk
        >>> from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion
        >>> zero = lambda z, f, l, t, b, n: (torch.zeros_like(l), torch.zeros_like(f))
        >>> atoms = bulk("NaCl", "rocksalt", a=5.6)
        >>> dyn = ReverseDiffusion(atoms, CrystalDenoiser(zero, CrystalDiffusion(50)), num_steps=5, seed=0)
        >>> dyn.run(steps=2), dyn.nsteps, dyn.run(), dyn.nsteps, atoms.info["denoiser_t"]
        (False, 2, True, 5, 0.0)
    """

    def __init__(
        self,
        atoms: Any,
        model: Any,
        cfg: Any = None,
        *,
        num_steps: Optional[int] = None,
        step_lr: Optional[float] = None,
        t_start: float = 1.0,
        graph: Any = None,
        text: Optional[str] = None,
        props: Any = None,
        guidance: Optional[float] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        logfile: IO | str | None = None,
        trajectory: Any = None,
        append_trajectory: bool = False,
        loginterval: int = 1,
    ):
        self.denoiser = den = as_denoiser(model, cfg)
        self.t_start = float(t_start)
        if generator is None:
            dev = den.device if isinstance(den, CrystalDenoiser) else next(den.model.parameters()).device
            generator = torch.Generator(device=dev)
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()
        self.generator, self.seed = generator, seed
        if isinstance(den, CrystalDenoiser):
            self.chain: Any = _CrystalChain(den, atoms, num_steps, step_lr, self.t_start, generator, text, props, guidance)
        else:
            if text is not None or props or guidance is not None:
                raise ValueError("a conformer model takes no text / props / guidance: those condition crystal runs")
            self.chain = _MoleculeChain(den, atoms, graph, num_steps, self.t_start, generator)
        self._index = 0
        super().__init__(atoms, logfile=logfile, trajectory=trajectory, append_trajectory=append_trajectory,
                         loginterval=loginterval)
        self._write()

    @property
    def num_steps(self) -> int:
        """Reverse steps from ``t_start`` to ``t = 0``."""
        return len(self.chain.grid) - 1

    def __repr__(self) -> str:
        return (f"ReverseDiffusion({self.atoms.get_chemical_formula()}, {self.denoiser!r}, "
                f"num_steps={self.num_steps}, t_start={self.t_start}, seed={self.seed})")

    def todict(self) -> dict:
        return {"type": "reverse-diffusion", "dynamics-type": self.__class__.__name__,
                "num_steps": self.num_steps, "t_start": self.t_start, **self.chain.todict()}

    def _write(self) -> None:
        self.chain.write(self.atoms, self._index)
        self.atoms.info["denoiser_t"] = self.t

    @property
    def t(self) -> float:
        """Noise level the structure has reached (1 at the prior, 0 at the end)."""
        return 0.0 if self.converged() else self.chain.t(self._index)

    def converged(self, *args: Any) -> bool:
        """``True`` once the reverse process reached ``t = 0``."""
        return self._index >= self.num_steps

    def step(self) -> None:
        """One reverse step: update the chain and write positions (and cell) into the Atoms."""
        if self.converged():
            raise RuntimeError("the reverse process already reached t = 0; build a new ReverseDiffusion to sample again")
        self.chain.step(self._index)
        self._index += 1
        self._write()

    def log(self) -> None:
        periodic = bool(np.asarray(self.atoms.pbc).all())
        if self.nsteps == 0:
            extra = f"{'Volume':>12} {'min|a|':>8}" if periodic else f"{'Rg':>8}"
            self.logfile.write(f"{'':<16} {'Step':>5} {'Time':>8} {'t':>8} {extra}\n")
        name = self.__class__.__name__
        clock = time.strftime("%H:%M:%S", time.localtime())
        if periodic:
            cell = self.atoms.cell
            extra = f"{abs(cell.volume):12.4f} {float(np.min(cell.lengths())):8.4f}"
        else:
            x = self.atoms.positions - self.atoms.positions.mean(0)
            extra = f"{float(np.sqrt((x**2).sum(1).mean())):8.4f}"
        self.logfile.write(f"{name:<16} {self.nsteps:5d} {clock:>8} {self.t:8.4f} {extra}\n")

    def irun(self, steps: Optional[int] = None):
        """Run as a generator; yields ``converged()`` after the start and after every step."""
        remaining = self.num_steps - self._index
        steps = remaining if steps is None else min(int(steps), remaining)
        self.max_steps = self.nsteps + steps
        if self.nsteps == 0:
            self.log()
            self.call_observers()
        yield self.converged()
        while self.nsteps < self.max_steps:
            self.step()
            self.nsteps += 1
            self.log()
            self.call_observers()
            yield self.converged()

    def run(self, steps: Optional[int] = None) -> bool:
        """Run ``steps`` more reverse steps (default: to the end); returns ``converged()``."""
        converged = self.converged()
        for converged in self.irun(steps):
            pass
        return converged
