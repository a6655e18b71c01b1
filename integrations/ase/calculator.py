r"""An ASE calculator whose forces are a trained denoiser's direction towards the data.

A diffusion model trained at noise level ``t`` has learned the score ``∇ log p_t`` of the noised
data density ``p_t``. :class:`DenoiserCalculator` reports it the way ASE reports a potential: as the
forces of the free energy ``E_t(x) = -kT log p_t(x)`` (``kT`` in eV, a user-chosen scale, 1 eV by
default)::

    forces_i = kT · ∇_{x_i} log p_t(x)                                      [eV/Å]

For a crystal the model scores the fractional coordinates ``F`` (Cartesian ``X = F L``, rows of
``L`` = lattice vectors) and the lattice ``L``:

* ``∇_X log p_t = score_F · L^{-T}`` with ``score_F = coord_out · sqrt(lambda_k)`` (the
  wrapped-normal score the network was trained to predict);
* ``∇_L log p_t = -eps_hat / sqrt(1 - abar_k)`` (the DDPM noise prediction of the lattice), and
  under the ASE strain ``L -> L (I + e)`` (fractional coordinates fixed) the stress of ``E_t`` is
  ``stress = sym(L^T ∂E_t/∂L) / V = kT · sym(L^T eps_hat) / (V sqrt(1 - abar_k))``  [eV/Å³]
  (the antisymmetric part, a rotation, is dropped).

Scale: ``∇ log p_t = -(x - alpha_t x0_hat) / s_t²`` with ``s_t`` the Cartesian noise std (exact on
a Gaussian path; for a crystal ``alpha = 1`` and ``s_t ≈ sigma_k`` times the lattice length while
``sigma_k ≪ 1``), so ``|forces| ≈ kT |x - alpha_t x0_hat| / s_t²`` grows fast as ``t -> 0``. Pick
``kT`` for the use (``kT ≈ s_t²`` in eV/Å² makes the forces, in eV/Å, about the displacement in Å);
the Tweedie displacement below is the scale-free view of the same direction.

``energy`` is not implemented: the network gives the gradient of ``log p_t``, not its value, so
``get_potential_energy`` raises :class:`~ase.calculators.calculator.PropertyNotImplementedError`.
ASE's optimizers read the energy for their log line and therefore do not run on this calculator;
ASE's Langevin molecular dynamics reads forces only, and at ``temperature_K = kT / units.kB`` it
samples ``p_t`` of the positions itself (at a fixed cell). To sample the data, run the reverse process (:class:`~.dynamics.ReverseDiffusion`).

Non-standard outputs go into the Atoms (only standard properties survive an ASE ``Trajectory``;
``atoms.info`` survives it and extxyz keeps both), and into ``calc.results`` under the same names:

* ``atoms.arrays["denoiser_displacement"]`` ``[N, 3]`` Å: the Tweedie step
  ``sigma_k² · score_F · L``, the expected move to the clean structure when ``sigma_k ≪ 1``
  (fractional noise std ``sigma_k``; at large noise only its direction is meaningful);
* ``atoms.info["denoiser_cell"]`` ``[3, 3]`` Å: the predicted clean lattice
  ``(L - sqrt(1 - abar) eps_hat) / sqrt(abar)``;
* ``atoms.info["denoiser_t"]``, ``["denoiser_step"]``, ``["denoiser_sigma"]``: the noise level used;
* ``atoms.info["denoiser_text"]`` / ``["denoiser_props"]`` (``name=value,...``) and ``["denoiser_guidance"]``:
  the condition and guidance scale the scores were predicted with (absent for the null condition).

For a molecule (a conformer model of :mod:`orbit_pyg.integrations.molecule`, on the Gaussian path
``x_s = alpha_s x0 + sigma_s eps`` of centred Cartesian positions) the same definitions read
``forces = kT · score = -kT (x - alpha_s x0_hat) / sigma_s²`` (``x`` centred, so the forces sum to
zero: the density lives in the zero-centre-of-mass subspace), no stress (no cell), and
``atoms.arrays["denoiser_displacement"] = x0_hat - x`` is the exact Tweedie step
``E[x0 | x_s] - x`` (Å); ``atoms.info["denoiser_sigma"]`` and ``["denoiser_alpha"]`` hold the path's
coefficients. The molecular graph comes from ``graph=`` (a SMILES, an RDKit ``Mol`` or a graph
``Data`` whose atom order is the Atoms' order), else it is perceived once from the geometry of the
first Atoms calculated (RDKit bond perception, checked against ``atoms.info["smiles"]`` when present)
and kept: give ``graph=`` for noisy structures.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .models import (
    CrystalDenoiser, MoleculeDenoiser, as_denoiser, check_graph_matches, check_molecule, check_periodic,
)
from .generate import _condition_info

__all__ = ["DenoiserCalculator"]


class DenoiserCalculator(Calculator):
    r"""ASE calculator of a trained denoiser at noise level ``t`` (see the module docstring for the math).

    Args:
        model: a :class:`~.models.CrystalDenoiser`, a run folder, or ``(net, cfg)`` (see :func:`~.models.as_denoiser`).
        cfg: the ``CSPConfig`` when ``model`` is a bare network.
        t: model time in ``(0, 1]`` (1 = pure noise). Small ``t`` asks "where are the nearby clean
            structures"; the default 0.05 is low noise for Perov-5-scale crystals.
        kT: energy scale in eV of ``E_t = -kT log p_t``; forces scale linearly with it.
        graph: molecules only: the molecular graph (SMILES, RDKit ``Mol`` or graph ``Data``) of the Atoms.
        text, props: crystals: the condition of a conditional run (``orbit-pyg crystal train --condition
            text|props|text+props``), as :func:`~.generate.generate` takes it: ``text="..."`` and / or
            ``props="heat_all=-0.5,dir_gap=2"`` (or a ``{name: value}`` mapping, physical units). Neither:
            the null condition (the unconditioned score of a conditional run).
        guidance: classifier-free guidance scale ``s`` of the condition (default: the run's, 1 unless the
            run stored another): the network outputs, hence forces and stress (linear in them), are
            ``o = o(null) + s · (o(c) - o(null))``; ``s = 1`` the conditional score ``∇ log p_t(x | c)``,
            ``s = 0`` exactly the unconditioned one.

    A condition for an unconditional run, a part the run was not trained on, only one part of a
    ``text+props`` condition, or any condition for a conformer model raise the ``ValueError`` of
    :func:`~.generate.generate` (at construction or in ``set``, before anything is stored).

    Parameters live in ``calc.parameters`` (``calc.set(t=0.3)`` or ``calc.set(props=...)`` reset the
    cached results, as ASE requires). Results are cached until positions, numbers, cell, pbc, charges or
    magnetic moments change (ASE's ``system_changes``).

    Example:
        >>> from ase.build import bulk
        >>> from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion
        >>> pull = lambda z, f, l, t, b, n: (torch.zeros_like(l), 0.5 - torch.remainder(f, 1.0))
        >>> atoms = bulk("Cu", "sc", a=2.5)
        >>> atoms.calc = DenoiserCalculator(CrystalDenoiser(pull, CrystalDiffusion(100)), t=0.5)
        >>> atoms.get_forces().shape, sorted(k for k in atoms.info if k.startswith("denoiser_"))
        ((1, 3), ['denoiser_cell', 'denoiser_sigma', 'denoiser_step', 'denoiser_t'])
    """

    implemented_properties = ["forces", "stress"]
    default_parameters = {"t": 0.05, "kT": 1.0, "text": None, "props": None, "guidance": None}
    name = "orbit_denoiser"
    discard_results_on_any_change = True  # a new t, kT or condition invalidates every cached result

    def __init__(self, model: Any, cfg: Any = None, *, t: float = 0.05, kT: float = 1.0, graph: Any = None,
                 text: Optional[str] = None, props: Any = None, guidance: Optional[float] = None, **kwargs: Any):
        self.denoiser = as_denoiser(model, cfg)
        self._cond, self._asked, self._guidance = None, None, None
        self._perceived = (None, None)  # (atomic numbers, graph perceived from a geometry with them)
        self._graph = None if graph is None or isinstance(self.denoiser, CrystalDenoiser) else self.denoiser.graph(graph)
        if isinstance(self.denoiser, MoleculeDenoiser):
            self.implemented_properties = ["forces"]
        super().__init__(t=t, kT=kT, text=text, props=props, guidance=guidance, **kwargs)

    def set(self, **kwargs: Any) -> dict:
        """Change ``t`` / ``kT`` / ``text`` / ``props`` / ``guidance`` (validated); ASE then discards the cached
        results."""
        if "t" in kwargs:
            if isinstance(self.denoiser, CrystalDenoiser):
                self.denoiser.step_of(kwargs["t"])  # validates
            else:
                self.denoiser.model_time(kwargs["t"])
        if "kT" in kwargs and not (np.isfinite(kwargs["kT"]) and kwargs["kT"] > 0):
            raise ValueError(f"`kT` must be a positive energy in eV, got {kwargs['kT']}")
        if {"text", "props", "guidance"} & kwargs.keys():
            self._set_condition(*(kwargs.get(k, self.parameters.get(k)) for k in ("text", "props", "guidance")))
        return super().set(**kwargs)

    def _set_condition(self, text: Optional[str], props: Any, guidance: Optional[float]) -> None:
        """Validate and build the condition once, as :func:`~.generate.generate` does (same helpers, same errors)."""
        den = self.denoiser
        if isinstance(den, MoleculeDenoiser):
            if text is not None or props or guidance is not None:
                raise ValueError("a conformer model takes no text / props / guidance: those condition crystal runs")
            return
        cond, asked = den.condition(1, text=text, props=props)
        self._cond, self._asked, self._guidance = cond, asked, den.sampler(guidance=guidance).guidance

    def __repr__(self) -> str:
        p = self.parameters
        extra = "".join(f", {k}={p[k]!r}" for k in ("text", "props", "guidance") if p.get(k) is not None)
        return f"DenoiserCalculator({self.denoiser!r}, t={p.t}, kT={p.kT}{extra})"

    def calculate(self, atoms=None, properties: Sequence[str] = ("forces",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = atoms if atoms is not None else self.atoms
        if isinstance(self.denoiser, CrystalDenoiser):
            self._calculate_crystal(atoms)
        else:
            self._calculate_molecule(atoms)

    def _molecule_graph(self, atoms):
        graph = self._graph
        if graph is None:  # perceived once from the geometry (checked against atoms.info["smiles"]), then kept
            key = tuple(atoms.numbers.tolist())
            if self._perceived[0] != key:
                self._perceived = (key, self.denoiser.graph(atoms))
            graph = self._perceived[1]
        check_graph_matches(graph, atoms)
        return graph

    def _calculate_molecule(self, atoms) -> None:
        check_molecule(atoms)
        den: MoleculeDenoiser = self.denoiser
        kT, t = float(self.parameters.kT), float(self.parameters.t)
        s = den.model_time(t)
        out = den.predict(self._molecule_graph(atoms), torch.from_numpy(np.asarray(atoms.positions, dtype=np.float64)), s)
        x, x0, alpha, sigma = out["x"].numpy(), out["x0_hat"].numpy(), out["alpha"], out["sigma"]
        if not sigma > 0:
            raise ValueError(f"noise level t={t} is the data end of the path (sigma = 0): the score is undefined")
        if not np.isfinite(x0).all():
            raise FloatingPointError("the denoiser returned non-finite positions for this molecule")
        forces = -kT * (x - alpha * x0) / sigma**2
        displacement = x0 - x
        self.results = {"forces": forces, "denoiser_displacement": displacement, "denoiser_t": t,
                        "denoiser_sigma": sigma, "denoiser_alpha": alpha}
        atoms.arrays["denoiser_displacement"] = displacement.copy()
        atoms.info.update({"denoiser_t": t, "denoiser_sigma": sigma, "denoiser_alpha": alpha})

    def _calculate_crystal(self, atoms) -> None:
        check_periodic(atoms)
        den: CrystalDenoiser = self.denoiser
        kT, k = float(self.parameters.kT), den.step_of(self.parameters.t)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        frac = np.linalg.solve(cell.T, atoms.positions.T).T  # unwrapped: only differences mod 1 matter
        dtype = den.dtype
        out = den.predict(torch.as_tensor(atoms.numbers, dtype=torch.long), torch.from_numpy(frac).to(dtype),
                          torch.from_numpy(cell).to(dtype), k, cond=self._cond, guidance=self._guidance)
        score = out["score_frac"].numpy()
        eps = out["lattice_eps"].numpy()
        sigma, abar = out["sigma"], out["abar"]
        if not (np.isfinite(score).all() and np.isfinite(eps).all()):
            raise FloatingPointError("the denoiser returned non-finite scores for this structure")
        inv_t = np.linalg.inv(cell).T
        forces = kT * score @ inv_t
        dEdL = kT * eps / np.sqrt(1.0 - abar)
        virial = cell.T @ dEdL
        stress = 0.5 * (virial + virial.T) / abs(np.linalg.det(cell))
        voigt = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        displacement = sigma**2 * score @ cell
        denoised_cell = (cell - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
        t = float(self.parameters.t)
        condition = {} if self._asked is None else {
            f"denoiser_{key}": value for key, value in _condition_info(self._asked, self._guidance).items()}
        self.results = {
            "forces": forces, "stress": voigt,
            "denoiser_displacement": displacement, "denoiser_cell": denoised_cell,
            "denoiser_t": t, "denoiser_step": k, "denoiser_sigma": sigma, **condition,
        }
        atoms.arrays["denoiser_displacement"] = displacement.copy()
        for key in ("denoiser_text", "denoiser_props", "denoiser_guidance"):  # no stale condition of an earlier call
            atoms.info.pop(key, None)
        atoms.info.update({"denoiser_cell": denoised_cell.copy(), "denoiser_t": t, "denoiser_step": k,
                           "denoiser_sigma": sigma, **condition})
