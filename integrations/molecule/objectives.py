r"""Training objectives for conformer generation and the model bundle that carries them.

Two generative objectives on centred Cartesian coordinates (Å), both as an
:class:`orbit_pyg.OrbitDiffusionLoss`:

* ``"diffusion"``: VP (cosine) schedule ``x_t = alpha_t x0 + sigma_t eps``, ``eps`` target;
* ``"flow"``: ET-Flow-style flow matching, linear interpolant from a Gaussian prior to the data
  (:class:`orbit_pyg.FlowSchedule`, optional bridge noise), velocity target
  ``E[dx_t/dt | x_t, x1]``.

and three switchable targets (``mode``): ``"plain"`` (the data's own labelling and pose),
``"augment"`` (one random rotation × automorphism per molecule), ``"orbit"`` (the Rao-Blackwell
posterior mean over ``rotations × automorphisms`` candidates, or with ``proposal="exact"`` over the
automorphisms with every rotation integrated in closed form, see
:func:`~orbit_pyg.integrations.molecule.orbits.molecule_orbit`).

:class:`ConformerModel` bundles the denoiser with its :class:`ConformerConfig` (schedule and
parameterization are needed again at sampling time); :func:`train_conformer_model` trains it with
the shared :class:`orbit_pyg.training.Trainer`; :func:`load_model` restores a run folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from orbit_pyg import FlowSchedule, OrbitDiffusionLoss, VPSchedule
from orbit_pyg._utils import center
from orbit_pyg.io import atomic_write_json, dataclass_from_dict

from .models import MODEL_KINDS, build_model
from .orbits import ROTATION_PROPOSALS, molecule_orbit

__all__ = ["ConformerConfig", "ConformerModel", "make_schedule", "make_loss", "train_conformer_model", "load_model",
           "OBJECTIVES"]

OBJECTIVES = ("diffusion", "flow")


@dataclass
class ConformerConfig:
    """Every setting of a conformer model run (saved as ``config.json`` in the run folder).

    Attributes:
        objective: ``"diffusion"`` or ``"flow"``; mode: ``"plain"`` / ``"augment"`` / ``"orbit"``.
        model: ``"transformer"`` (non-equivariant) or ``"egnn"``; hidden, layers, heads: its size.
        rotations: rotation candidates per molecule (orbit mode); reflections: O(3) instead of SO(3);
        automorphisms: graph automorphisms per molecule (``0`` = rotations only; the data must
            carry ``orbit_perm`` with this many columns); hydrogens: ``"permute"`` / ``"follow"``;
        proposal: rotation proposal ``"uniform"`` (Haar samples, the paper), ``"guided"`` or
            ``"exact"`` (closed-form matrix Fisher marginal over rotations, no samples: ``rotations``
            is ignored; see :func:`~orbit_pyg.integrations.molecule.orbits.molecule_orbit`);
        flow_noise: bridge noise of the flow interpolant; num_steps: discrete diffusion grid;
        steps, batch_size, lr, seed, ema_decay, grad_clip: training;
        sample_steps, sampler: default sampler settings (``"ode"`` or ``"sde"``).
    """

    objective: str = "diffusion"
    mode: str = "orbit"
    model: str = "transformer"
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    rotations: int = 200
    reflections: bool = False
    automorphisms: int = 50
    hydrogens: str = "permute"
    proposal: str = "uniform"
    flow_noise: float = 0.0
    num_steps: int = 1000
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    ema_decay: Optional[float] = 0.999
    grad_clip: Optional[float] = 1.0
    sample_steps: int = 50
    sampler: str = "ode"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mode not in ("plain", "augment", "orbit"):
            raise ValueError(f"`mode` must be 'plain', 'augment' or 'orbit', got {self.mode!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"`model` must be one of {MODEL_KINDS}, got {self.model!r}")
        if self.proposal not in ROTATION_PROPOSALS:
            raise ValueError(f"`proposal` must be one of {ROTATION_PROPOSALS}, got {self.proposal!r}")
        if self.sampler not in ("ode", "sde"):
            raise ValueError(f"`sampler` must be 'ode' or 'sde', got {self.sampler!r}")
        if self.rotations < 1 or self.automorphisms < 0:
            raise ValueError("`rotations` must be >= 1 and `automorphisms` >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> "ConformerConfig":
        """Build from a mapping, rejecting unknown keys with their names."""
        return dataclass_from_dict(cls, values, "conformer settings")


def make_schedule(cfg: ConformerConfig):
    """The noise path of ``cfg``: ``VPSchedule("cosine")`` or ``FlowSchedule(noise=flow_noise)``."""
    if cfg.objective == "diffusion":
        return VPSchedule("cosine", num_steps=cfg.num_steps)
    return FlowSchedule(noise=cfg.flow_noise, num_steps=cfg.num_steps)


def make_loss(cfg: ConformerConfig) -> OrbitDiffusionLoss:
    r"""The :class:`~orbit_pyg.OrbitDiffusionLoss` of ``cfg`` (positions always centred per molecule).

    Example:
        >>> make_loss(ConformerConfig(objective="flow", mode="augment", rotations=8, automorphisms=0)).parameterization
        'velocity'
    """
    orbit = molecule_orbit(cfg.rotations, cfg.reflections, cfg.automorphisms > 0, cfg.proposal)
    param = "eps" if cfg.objective == "diffusion" else "velocity"
    return OrbitDiffusionLoss(make_schedule(cfg), orbit=orbit, mode=cfg.mode, parameterization=param, center=True)


class ConformerModel(nn.Module):
    """A denoiser plus its configuration; ``forward(x_t, t, data)`` returns the per-graph-centred prediction.

    Centring keeps the prediction in the zero-centre-of-mass subspace where the (centred) targets live.

    Example:
        >>> m = ConformerModel(ConformerConfig(hidden=16, layers=1, heads=2))
        >>> m.config.model, m.schedule
        ('transformer', VPSchedule(kind='cosine', num_steps=1000, discrete=True))
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.config = config
        self.net = build_model(config.model, config.hidden, config.layers, config.heads)
        self.schedule = make_schedule(config)

    @property
    def parameterization(self) -> str:
        """What the network predicts: ``"eps"`` (diffusion objective) or ``"velocity"`` (flow)."""
        return "eps" if self.config.objective == "diffusion" else "velocity"

    def forward(self, xt: Tensor, t: Tensor, data: Any) -> Tensor:
        out = self.net(xt, t, data)
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(xt.size(0), dtype=torch.long, device=xt.device)
        return center(out, batch, int(batch.max()) + 1 if batch.numel() else 0)


def _check_training_data(data: Sequence, cfg: ConformerConfig) -> None:
    if len(data) == 0:
        raise ValueError("no training molecules")
    first = data[0]
    for key in ("z", "pos", "edge_index", "edge_attr"):
        if getattr(first, key, None) is None:
            raise KeyError(f"training molecules need `{key}` (see orbit_pyg.integrations.molecule.convert)")
    if cfg.mode != "plain" and cfg.automorphisms > 0:
        perm = getattr(first, "orbit_perm", None)
        if perm is None or perm.size(1) != cfg.automorphisms:
            raise ValueError(
                f"mode={cfg.mode!r} with automorphisms={cfg.automorphisms} needs `orbit_perm` [N, {cfg.automorphisms}] "
                "on every molecule (QM9Conformers(automorphisms=...) or AddAutomorphisms)")


def train_conformer_model(train_data: Sequence, cfg: ConformerConfig, out_dir: Optional[str] = None,
                          val_fn=None, val_every: Optional[int] = None, log_every: int = 50,
                          progress: Optional[bool] = None, callbacks: Sequence = (), device: Any = "cpu") -> tuple[ConformerModel, list[dict]]:
    """Train a :class:`ConformerModel` with the shared :class:`~orbit_pyg.training.Trainer`.

    Writes ``config.json`` (and the trainer's ``last.pt`` / ``metrics.jsonl``) into ``out_dir``.
    ``callbacks``: ``(fn(trainer), interval)`` pairs attached to the trainer.
    Returns the trained model (EMA weights copied in) and the logged history.
    """
    from orbit_pyg.training import Trainer

    _check_training_data(train_data, cfg)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, "config.json"), asdict(cfg), indent=1)
    with torch.random.fork_rng(devices=[]):  # seeded by cfg.seed; the caller's global RNG state is left as it was
        torch.manual_seed(cfg.seed)
        model = ConformerModel(cfg)
        trainer = Trainer(model, make_loss(cfg), train_data, batch_size=min(cfg.batch_size, len(train_data)), lr=cfg.lr,
                          max_steps=cfg.steps, seed=cfg.seed, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                          log_every=log_every, out_dir=out_dir, val_fn=val_fn, val_every=val_every or cfg.steps,
                          checkpoint_every=cfg.steps, progress=progress, device=device)
        for fn, interval in callbacks:
            trainer.attach(fn, interval)
        history = trainer.fit()
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    return model.eval(), history


def load_model(run_dir: str, ema: bool = True, map_location: Any = "cpu") -> ConformerModel:
    """Restore a trained :class:`ConformerModel` from a run folder (``config.json`` + ``last.pt``).

    Example:
        >>> # model = load_model("runs/qm9_orbit"); sample_conformers(model, smiles_to_data("CCO"), 4)
    """
    from orbit_pyg.training import load_checkpoint

    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir!r} is not a conformer run folder: no config.json")
    with open(cfg_path) as fh:
        cfg = ConformerConfig.from_dict(json.load(fh))
    model = ConformerModel(cfg)
    ckpt = None
    for name in ("best.pt", "last.pt"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            ckpt = path
            break
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir!r} holds no checkpoint (last.pt / best.pt)")
    load_checkpoint(ckpt, model, ema=ema, map_location=map_location)
    return model.eval()
