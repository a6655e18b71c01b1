r"""Trained denoisers as the ASE door sees them: one object per model family.

:class:`CrystalDenoiser` bundles a crystal network (:class:`~orbit_pyg.integrations.crystal.model.CSPNet`
or any callable with its signature) with the :class:`~orbit_pyg.integrations.crystal.diffusion.CrystalDiffusion`
it was trained with and the sampler settings. The calculator, the dynamics and :func:`~.generate.generate`
accept one, or anything :func:`as_denoiser` turns into one (a run folder written by
:func:`~orbit_pyg.integrations.crystal.csp.train_csp`, or the ``(model, cfg)`` pair of
:func:`~orbit_pyg.integrations.crystal.csp.load_model`).

Noise level. Every public entry point speaks of the model time ``t`` in ``(0, 1]`` (``t = 1`` is the
prior, pure noise; small ``t`` is nearly clean data). A crystal model trained with ``T`` discrete
steps reads ``t`` as the step ``k = clamp(round(t T), 1, T)``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CrystalDenoiser", "MoleculeDenoiser", "as_denoiser", "load_denoiser", "check_periodic", "check_molecule",
           "check_graph_matches", "right_handed"]


def check_periodic(atoms: Any, what: str = "atoms") -> None:
    """Raise a clear ``ValueError`` unless ``atoms`` is periodic in all three directions with a non-singular cell.

    Example:
        >>> from ase import Atoms
        >>> check_periodic(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
        Traceback (most recent call last):
        ...
        ValueError: atoms: a crystal model needs a periodic Atoms (pbc=True in all three directions), got pbc=[False, False, False]; ...
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.all():
        raise ValueError(
            f"{what}: a crystal model needs a periodic Atoms (pbc=True in all three directions), got "
            f"pbc={pbc.tolist()}; for a molecule use a molecule model, for a crystal set atoms.pbc = True "
            "and give it a cell")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.isfinite(cell).all() or abs(np.linalg.det(cell)) < 1e-8 * max(np.prod(np.linalg.norm(cell, axis=1)), 1e-300):
        raise ValueError(f"{what}: the cell must be finite and non-singular (three independent lattice vectors), got {cell.tolist()}")
    if len(atoms) == 0:
        raise ValueError(f"{what}: the Atoms object has no atoms")


def check_molecule(atoms: Any, what: str = "atoms") -> None:
    """Raise a clear ``ValueError`` unless ``atoms`` is a non-empty, non-periodic molecule with finite positions.

    Example:
        >>> from ase.build import bulk
        >>> check_molecule(bulk("Cu"))
        Traceback (most recent call last):
        ...
        ValueError: atoms: a molecule model needs a non-periodic Atoms (pbc=False), got pbc=[True, True, True]; ...
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        raise ValueError(f"{what}: a molecule model needs a non-periodic Atoms (pbc=False), got pbc={pbc.tolist()}; "
                         "for a crystal use a crystal model")
    if len(atoms) == 0:
        raise ValueError(f"{what}: the Atoms object has no atoms")
    if not np.isfinite(atoms.positions).all():
        raise ValueError(f"{what}: the positions have non-finite entries")


def check_graph_matches(graph: Any, atoms: Any) -> None:
    """Raise a clear ``ValueError`` unless the molecular graph's ``z`` are the Atoms' numbers, in the same order.

    Example:
        >>> from ase import Atoms
        >>> check_graph_matches(type("G", (), {"z": torch.tensor([8, 1, 1])})(), Atoms("HOH"))
        Traceback (most recent call last):
        ...
        ValueError: the molecular graph's atoms [8, 1, 1] do not match the Atoms' numbers [1, 8, 1] (...)
    """
    z = graph.z.cpu().numpy()
    if z.shape != atoms.numbers.shape or (z != atoms.numbers).any():
        raise ValueError(f"the molecular graph's atoms {z.tolist()} do not match the Atoms' numbers "
                         f"{atoms.numbers.tolist()} (same elements in the same order, hydrogens explicit)")


def right_handed(frac: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The same crystal on a right-handed basis: if ``det L < 0``, ``L -> -L`` and ``F -> (-F) mod 1``.

    Cartesian positions ``F L = (-F)(-L)`` are unchanged, so nothing moves; CIF (which stores only
    lengths and angles, i.e. a right-handed cell) then describes the same crystal, not its mirror image.

    Example:
        >>> f, l = right_handed(np.array([[0.25, 0.0, 0.5]]), -np.eye(3))
        >>> f.tolist(), float(np.linalg.det(l))
        ([[0.75, 0.0, 0.5]], 1.0)
    """
    frac, cell = np.asarray(frac, dtype=np.float64), np.asarray(cell, dtype=np.float64)
    if np.linalg.det(cell) < 0:
        frac, cell = np.remainder(-frac, 1.0), -cell
        frac[frac >= 1.0] = 0.0
    return frac, cell


class CrystalDenoiser:
    r"""A crystal denoiser and its diffusion: ``predict`` gives the scores, ``sampler`` the reverse process.

    The network is called as ``net(z, frac_t, cell_t, t, batch, num_graphs) -> (lattice_eps [B, 3, 3],
    coord_out [N, 3])`` (the :class:`~orbit_pyg.integrations.crystal.model.CSPNet` contract), with
    ``coord_out = score_F / sqrt(lambda_k)`` the normalized wrapped-normal score of the fractional
    coordinates and ``lattice_eps`` the DDPM noise of the lattice.

    Args:
        net: the network (an ``nn.Module`` or any callable with the signature above).
        diffusion: the :class:`~orbit_pyg.integrations.crystal.diffusion.CrystalDiffusion` it was trained with.
        num_steps: reverse steps of the sampler (default: all ``T``).
        step_lr: corrector step scale (DiffCSP: 5e-7 on Perov-5; 0 disables the corrector).
        lattice_clip: clip of the predicted clean lattice (Å) used by the sampler (see
            :class:`~orbit_pyg.integrations.crystal.sampling.PredictorCorrector`).
        eta: DDIM stochasticity of the lattice update (1 = ancestral DDPM, 0 = deterministic DDIM).
        dtype: float dtype of the sampler state and network inputs (default: the parameters' dtype of
            an ``nn.Module``, float64 for a plain callable).
        cfg: the run's :class:`~orbit_pyg.integrations.crystal.csp.CSPConfig` (keyword only; set by
            :meth:`from_config` / :meth:`from_run`): a conditional run's condition kind, property
            statistics and text kind, read by :meth:`condition`.
        guidance: classifier-free guidance scale ``s`` of the sampler (keyword only; default: the
            run's ``cfg.guidance``, else 1 = the conditional prediction; 0 = the unconditioned one).

    Example:
        >>> from orbit_pyg.integrations.crystal.diffusion import CrystalDiffusion
        >>> zero = lambda z, f, l, t, b, n: (torch.zeros_like(l), torch.zeros_like(f))
        >>> d = CrystalDenoiser(zero, CrystalDiffusion(50), num_steps=10)
        >>> d.step_of(1.0), d.step_of(0.0), d
        (50, 1, CrystalDenoiser(T=50, num_steps=10, step_lr=5e-07, lattice_clip=None, eta=1.0))
    """

    kind = "crystal"

    def __init__(self, net: Callable, diffusion: Any, num_steps: Optional[int] = None, step_lr: float = 5e-7,
                 lattice_clip: Optional[float] = None, eta: float = 1.0, dtype: Optional[torch.dtype] = None, *,
                 cfg: Any = None, guidance: Optional[float] = None):
        self.net, self.diffusion = net, diffusion
        self._dtype, self.cfg = dtype, cfg
        self.guidance = float(getattr(cfg, "guidance", 1.0) if guidance is None else guidance)
        if not np.isfinite(self.guidance):
            raise ValueError(f"`guidance` must be finite, got {guidance}")
        self.num_steps = int(diffusion.num_steps if num_steps is None else num_steps)
        if not 1 <= self.num_steps <= diffusion.num_steps:
            raise ValueError(f"`num_steps` must lie in [1, {diffusion.num_steps}] (T), got {num_steps}")
        self.step_lr, self.lattice_clip, self.eta = float(step_lr), lattice_clip, float(eta)

    @classmethod
    def from_config(cls, net: Callable, cfg: Any, **overrides: Any) -> "CrystalDenoiser":
        """From a network and the :class:`~orbit_pyg.integrations.crystal.csp.CSPConfig` of its run."""
        from orbit_pyg.integrations.crystal.csp import make_diffusion

        kwargs = {"num_steps": cfg.sample_steps, "step_lr": cfg.step_lr, "lattice_clip": cfg.lattice_clip, "cfg": cfg}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(net, make_diffusion(cfg), **kwargs)

    @classmethod
    def from_run(cls, run_dir: str, **overrides: Any) -> "CrystalDenoiser":
        """From a run folder written by :func:`~orbit_pyg.integrations.crystal.csp.train_csp` (EMA weights)."""
        from orbit_pyg.integrations.crystal.csp import load_model

        net, cfg = load_model(run_dir)
        return cls.from_config(net, cfg, **overrides)

    def __repr__(self) -> str:
        cond = getattr(self.cfg, "condition", "none")
        extra = "" if cond == "none" else f", condition={cond!r}, guidance={self.guidance}"
        return (f"CrystalDenoiser(T={self.diffusion.num_steps}, num_steps={self.num_steps}, step_lr={self.step_lr}, "
                f"lattice_clip={self.lattice_clip}, eta={self.eta}{extra})")

    @property
    def dtype(self) -> torch.dtype:
        """Float dtype of the sampler state (see ``dtype`` in the class docstring)."""
        if self._dtype is not None:
            return self._dtype
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                return p.dtype
        return torch.float64

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters (CPU for a plain callable)."""
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                return p.device
        return torch.device("cpu")

    def step_of(self, t: float) -> int:
        """Discrete step ``k = clamp(round(t T), 1, T)`` of a model time ``t``."""
        t = float(t)
        if not np.isfinite(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"the noise level `t` must lie in [0, 1] (1 = pure noise), got {t}")
        total = self.diffusion.num_steps
        return int(min(max(round(t * total), 1), total))

    def sampler(self, num_steps: Optional[int] = None, step_lr: Optional[float] = None,
                guidance: Optional[float] = None):
        """The :class:`~orbit_pyg.integrations.crystal.sampling.PredictorCorrector` of this model
        (guidance scale ``guidance``, default :attr:`guidance`; it acts when a ``cond`` is passed)."""
        from orbit_pyg.integrations.crystal.sampling import PredictorCorrector

        return PredictorCorrector(self.net, self.diffusion, num_steps=num_steps or self.num_steps,
                                  step_lr=self.step_lr if step_lr is None else step_lr, eta=self.eta,
                                  lattice_clip=self.lattice_clip, guidance=self.guidance if guidance is None else guidance)

    def condition(self, n: int, text: Optional[str] = None, props: Any = None,
                  encoder: Optional[Callable] = None) -> tuple[Optional[Tensor], Optional[dict]]:
        r"""``(cond [n, d] or None, what was asked)`` for ``n`` samples, as ``orbit-pyg crystal sample --text / --props``
        builds it (:func:`~orbit_pyg.integrations.crystal.condition.sample_condition`, no references).

        No ``text`` and no ``props``: ``(None, None)``, the null condition (a conditional run samples
        unconditioned). A condition for an unconditional run, a part the run was not trained on, or
        one part only of a ``text+props`` run raise ``ValueError``.
        """
        if text is None and not props:
            return None, None
        if self.cfg is None:
            raise ValueError("this CrystalDenoiser has no run configuration (cfg), so it cannot build a condition: "
                             "make it with CrystalDenoiser.from_run / from_config or as_denoiser(run folder or (net, cfg))")
        from orbit_pyg.integrations.crystal.condition import sample_condition

        cond, asked = sample_condition(self.cfg, n, text=text, props=props, encoder=encoder)
        return (None if cond is None else cond.to(device=self.device, dtype=self.dtype)), asked

    @torch.no_grad()
    def predict(self, z: Tensor, frac: Tensor, cell: Tensor, k: int, cond: Optional[Tensor] = None,
                guidance: Optional[float] = None) -> dict[str, Tensor]:
        r"""Scores of one crystal at step ``k``: ``score_frac = coord_out · sqrt(lambda_k)`` ([N, 3]),
        ``lattice_eps`` ([3, 3]), with ``sigma`` (fractional noise std) and ``abar`` (lattice signal level).

        ``cond [1, d]`` (from :meth:`condition`; ``None``: the null condition) is guided with scale
        ``guidance`` (default :attr:`guidance`): ``o = o(null) + s (o(cond) - o(null))``
        (:func:`~orbit_pyg.integrations.crystal.condition.guided_model`)."""
        from orbit_pyg.integrations.crystal.condition import guided_model

        if isinstance(self.net, nn.Module):
            self.net.eval()
        d = self.diffusion
        dev, dtype = self.device, frac.dtype
        z, frac, cell = z.to(dev), frac.to(dev), cell.reshape(1, 3, 3).to(dev)
        batch = torch.zeros(z.numel(), dtype=torch.long, device=dev)
        t = torch.full((1,), k / d.num_steps, dtype=dtype, device=dev)
        net = guided_model(self.net, None if cond is None else cond.to(dev),
                           self.guidance if guidance is None else guidance)
        lattice_eps, coord = net(z, frac, cell, t, batch, 1)
        score = coord.to(torch.float64) * float(d.score_norms[k - 1].sqrt())
        return {"score_frac": score.cpu(), "lattice_eps": lattice_eps.reshape(3, 3).to(torch.float64).cpu(),
                "sigma": float(d.sigmas[k - 1]), "abar": float(d.alpha_bars[k])}


class MoleculeDenoiser:
    r"""A conformer model of :mod:`orbit_pyg.integrations.molecule` as the ASE door sees it.

    The model (a :class:`~orbit_pyg.integrations.molecule.objectives.ConformerModel`) lives on a Gaussian
    path ``x_s = alpha_s x0 + sigma_s eps`` of centred Cartesian positions (Å) in its own time ``s``
    (VP diffusion: data at ``s = 0``; flow matching: data at ``s = 1``). The door's noise level ``t``
    (1 = noise, 0 = data) maps to ``s = t`` or ``s = 1 - t``. ``predict`` gives the posterior mean
    ``x0_hat = E[x0 | x_s]`` from the network output; the score is ``-(x_s - alpha_s x0_hat) / sigma_s²``.

    Args:
        model: the ``ConformerModel``.
        num_steps: sampler steps (default: the model's ``sample_steps``).
        sampler: ``"ode"`` (DDIM) or ``"sde"`` (ancestral); default: the model's.
        clip: clip of ``x0_hat`` in Å (as the molecule sampler).
    """

    kind = "molecule"

    def __init__(self, model: Any, num_steps: Optional[int] = None, sampler: Optional[str] = None, clip: float = 10.0):
        self.model = model
        cfg = model.config
        self.num_steps = int(num_steps or cfg.sample_steps)
        self.sampler_kind = sampler or cfg.sampler
        if self.sampler_kind not in ("ode", "sde"):
            raise ValueError(f"`sampler` must be 'ode' or 'sde', got {self.sampler_kind!r}")
        if self.num_steps < 1:
            raise ValueError(f"`num_steps` must be >= 1, got {num_steps}")
        self.clip = float(clip)

    @classmethod
    def from_run(cls, run_dir: str, **overrides: Any) -> "MoleculeDenoiser":
        """From a run folder written by :func:`~orbit_pyg.integrations.molecule.train_conformer_model` (EMA weights)."""
        from orbit_pyg.integrations.molecule import load_model

        kwargs = {k: v for k, v in overrides.items() if k in ("num_steps", "sampler", "clip") and v is not None}
        return cls(load_model(run_dir), **kwargs)

    def __repr__(self) -> str:
        return (f"MoleculeDenoiser({self.model.config.objective}, num_steps={self.num_steps}, "
                f"sampler={self.sampler_kind!r}, clip={self.clip})")

    @property
    def schedule(self):
        """The model's noise path (``alpha_s``, ``sigma_s``, ``data_at_one``)."""
        return self.model.schedule

    def model_time(self, t: float) -> float:
        """The model's own time of the door's noise level ``t`` (1 = noise, 0 = data)."""
        t = float(t)
        if not np.isfinite(t) or not 0.0 < t <= 1.0:
            raise ValueError(f"the noise level `t` must lie in (0, 1] (1 = pure noise), got {t}")
        return 1.0 - t if self.schedule.data_at_one else t

    def graph(self, what: Any) -> Any:
        """The molecular graph (``z``, ``edge_index``, ``edge_attr``) of a SMILES, an RDKit ``Mol``, a ``Data``
        or an ``ase.Atoms`` (bonds from its geometry, or from ``atoms.info["smiles"]`` when present)."""
        from ase import Atoms

        from orbit_pyg.integrations.molecule import atoms_to_data, mol_to_data, smiles_to_data

        if isinstance(what, str):
            if not what.strip():
                raise ValueError("empty SMILES: give a molecule such as 'CCO'")
            return smiles_to_data(what)
        if isinstance(what, Atoms):
            check_molecule(what)
            return atoms_to_data(what, smiles=what.info.get("smiles"))
        if hasattr(what, "GetNumAtoms"):  # an RDKit Mol
            from rdkit import Chem

            mol = what if all(a.GetNumImplicitHs() == 0 for a in what.GetAtoms()) else Chem.AddHs(what)
            return mol_to_data(mol)
        if getattr(what, "z", None) is not None and getattr(what, "edge_index", None) is not None:
            return what
        raise TypeError(f"a molecule model generates from a SMILES, an RDKit Mol, a molecular graph Data or a "
                        f"non-periodic Atoms, got {type(what).__name__}")

    @torch.no_grad()
    def predict(self, graph: Any, pos: Tensor, s: float) -> dict[str, Tensor]:
        r"""``x0_hat`` ([N, 3], float64, centred), ``x`` (the centred input), ``alpha`` and ``sigma`` at model time ``s``.

        ``x0_hat`` is the network's own prediction, unclipped (the sampler clips; the calculator does not)."""
        from torch_geometric.data import Batch

        from orbit_pyg._utils import center
        from orbit_pyg.integrations.molecule.sampling import graph_only, posterior_mean

        model = self.model.eval()
        dev = next(model.parameters()).device
        batch = Batch.from_data_list([graph_only(graph)]).to(dev)
        bvec = batch.batch
        x = center(pos.to(dev, torch.float64), bvec, 1)
        tb = torch.full((1,), float(s), dtype=torch.float64, device=dev)
        out = model(x.to(torch.float32), tb.to(torch.float32), batch)
        x0 = posterior_mean(model, out, x, tb, bvec)
        sch = self.schedule
        return {"x0_hat": x0.cpu(), "x": x.cpu(), "alpha": float(sch.alpha(tb)[0]), "sigma": float(sch.sigma(tb)[0])}


def load_denoiser(run_dir: str, **overrides: Any) -> "CrystalDenoiser | MoleculeDenoiser":
    """A trained model from its run folder: a crystal run (``config.json`` + ``last.pt`` of ``train_csp``)
    or a conformer run (of ``train_conformer_model``), told apart by the keys of ``config.json``."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder: it has no config.json")
    with open(path) as fh:
        keys = set(json.load(fh))
    if {"hidden", "layers", "n_freq", "translations"} <= keys:
        return CrystalDenoiser.from_run(run_dir, **overrides)
    if {"objective", "rotations", "automorphisms"} <= keys:
        return MoleculeDenoiser.from_run(run_dir, **overrides)
    raise ValueError(f"{run_dir!r}: config.json is neither a crystal (CSP) nor a conformer run configuration; "
                     f"keys: {sorted(keys)}")


def as_denoiser(model: Any, cfg: Any = None, **overrides: Any) -> "CrystalDenoiser | MoleculeDenoiser":
    """Normalize what a user hands over: a denoiser, a run folder, ``(net, cfg)`` or ``net`` with ``cfg``
    (crystals), or a ``ConformerModel`` (molecules).

    Example:
        >>> from orbit_pyg.integrations.crystal.csp import CSPConfig, make_model
        >>> cfg = CSPConfig(hidden=8, layers=1, n_freq=2, diffusion_steps=20, sample_steps=5)
        >>> as_denoiser(make_model(cfg), cfg).num_steps
        5
    """
    if isinstance(model, CrystalDenoiser):
        if any(v is not None for v in overrides.values()):
            return CrystalDenoiser(model.net, model.diffusion, **{
                "num_steps": model.num_steps, "step_lr": model.step_lr, "lattice_clip": model.lattice_clip,
                "eta": model.eta, "dtype": model._dtype, "cfg": model.cfg, "guidance": model.guidance,
                **{k: v for k, v in overrides.items() if v is not None}})
        return model
    if isinstance(model, MoleculeDenoiser):
        if any(v is not None for v in overrides.values()):
            kw = {"num_steps": model.num_steps, "sampler": model.sampler_kind, "clip": model.clip}
            kw.update({k: v for k, v in overrides.items() if k in kw and v is not None})
            return MoleculeDenoiser(model.model, **kw)
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_denoiser(os.fspath(model), **overrides)
    if hasattr(model, "config") and hasattr(model, "schedule") and hasattr(model.config, "objective"):
        kw = {k: v for k, v in overrides.items() if k in ("num_steps", "sampler", "clip") and v is not None}
        return MoleculeDenoiser(model, **kw)
    if isinstance(model, tuple) and len(model) == 2 and cfg is None:
        model, cfg = model
    if cfg is not None and hasattr(cfg, "diffusion_steps"):
        return CrystalDenoiser.from_config(model, cfg, **overrides)
    raise TypeError(
        "cannot make a denoiser of a {}: pass a CrystalDenoiser, a run folder, the (model, cfg) pair of "
        "orbit_pyg.integrations.crystal.csp.load_model, a network with its CSPConfig, or a ConformerModel".format(type(model).__name__))
