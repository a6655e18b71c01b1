"""Crystal structure prediction end to end: configure, train, generate, evaluate.

The pieces (:class:`~.model.CSPNet`, :class:`~.diffusion.CrystalDiffusionLoss`,
:class:`~.sampling.PredictorCorrector`, :func:`~.metrics.csp_metrics`) assembled with the shared
:class:`orbit_pyg.training.Trainer`; the CLI (``orbit-pyg crystal ...``), the README's main job and
``benchmarks/csp_perov5.py`` all go through here.

Example (a smoke run; real runs train for thousands of steps):
    >>> import torch
    >>> from torch_geometric.data import Data
    >>> crystals = [Data(z=torch.tensor([38, 22, 8, 8, 8]), frac_coords=torch.rand(5, 3),
    ...                  cell=3.9 * torch.eye(3).unsqueeze(0), num_nodes=5) for _ in range(8)]
    >>> cfg = CSPConfig(hidden=16, layers=1, n_freq=4, steps=2, batch_size=4, translations=8, diffusion_steps=20, sample_steps=5)
    >>> model, history = train_csp(crystals, cfg)
    >>> generated = generate(model, crystals[:2], cfg)
    >>> len(generated), generated[0].frac_coords.shape
    (2, torch.Size([5, 3]))
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch_geometric.data import Batch, Data

from orbit_pyg.io import atomic_write_json, dataclass_from_dict
from orbit_pyg.training import Trainer

from .condition import CONDITIONS, PROPERTY_COLUMNS
from .diffusion import CrystalDiffusion, CrystalDiffusionLoss, crystal_orbit
from .model import CSPNet
from .sampling import PredictorCorrector


@dataclass
class CSPConfig:
    """Every knob of a CSP run (serializable; the CLI and YAML files map onto these fields).

    Model: ``hidden``, ``layers``, ``n_freq``, ``lattice_input`` (``"gram"`` / ``"fixed_basis"``).
    Objective: ``mode`` (``plain`` / ``augment`` / ``orbit``), ``translations`` (K), ``proposal``
    (``uniform`` / ``wrapped_normal`` / ``guided``), ``lattice_orbit`` (``False`` / ``"perm"`` /
    ``"signed"``), ``species`` (species-permutation candidates, 0 = off), ``diffusion_steps`` (T).
    Training: ``steps``, ``batch_size``, ``lr``, ``grad_clip``, ``ema_decay``, ``seed``,
    ``scheduler`` (``None`` / ``"cosine"`` / ``"plateau"``). Sampling: ``sample_steps``, ``step_lr``,
    ``lattice_clip`` (Å; :func:`train_csp` sets it to 1.5 × the largest training lattice entry).
    Conditioning (:mod:`.condition`): ``condition`` (``"none"`` / ``"text"`` / ``"props"`` /
    ``"text+props"``), ``cond_dim`` (width of the condition vector; :func:`train_csp` reads it from
    the data), ``cond_drop_prob`` (classifier-free-guidance dropout), ``guidance`` (scale ``s`` at
    sampling, :func:`~.condition.guided_model`: 1 = plain conditional, the default; 0 = unconditioned;
    > 1 = stronger guidance), ``cond_text`` (``"short"`` / ``"long"`` descriptions),
    ``cond_props`` (property columns) and ``cond_stats`` (their train-split normalizer). With
    ``condition="none"`` the model and checkpoints are those of an unconditioned run.

    """

    hidden: int = 256
    layers: int = 4
    n_freq: int = 32
    lattice_input: str = "gram"
    mode: str = "orbit"
    translations: int = 1000
    proposal: str = "uniform"
    lattice_orbit: Any = False
    species: int = 0
    diffusion_steps: int = 1000
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    grad_clip: float = 0.5
    ema_decay: Optional[float] = 0.999
    seed: int = 0
    scheduler: Optional[str] = None
    sample_steps: int = 1000
    step_lr: float = 5e-7
    lattice_clip: Optional[float] = None
    condition: str = "none"
    cond_dim: int = 0
    cond_drop_prob: float = 0.1
    guidance: float = 1.0
    cond_text: str = "short"
    cond_props: list = field(default_factory=lambda: list(PROPERTY_COLUMNS))
    cond_stats: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"`condition` must be one of {CONDITIONS}, got {self.condition!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "CSPConfig":
        """Build from a mapping (a run's ``config.json``, a YAML file), rejecting unknown keys by name."""
        return dataclass_from_dict(cls, values, "CSP configuration keys")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_model(cfg: CSPConfig) -> CSPNet:
    """The denoiser of ``cfg`` (conditioned through FiLM when ``cfg.condition != "none"``)."""
    kwargs = {"cond_dim": cfg.cond_dim} if cfg.condition != "none" else {}
    if kwargs and cfg.cond_dim < 1:
        raise ValueError(f"condition={cfg.condition!r} needs cond_dim >= 1 (train_csp reads it from the data's `cond`)")
    return CSPNet(hidden=cfg.hidden, num_layers=cfg.layers, n_freq=cfg.n_freq, lattice_input=cfg.lattice_input, **kwargs)


def make_diffusion(cfg: CSPConfig) -> CrystalDiffusion:
    return CrystalDiffusion(num_steps=cfg.diffusion_steps)


def make_loss(cfg: CSPConfig, diffusion: Optional[CrystalDiffusion] = None) -> torch.nn.Module:
    """The training loss of ``cfg`` (one option switches plain / augment / orbit): a
    :class:`~.diffusion.CrystalDiffusionLoss`, wrapped in a :class:`~.condition.ConditionalLoss`
    (classifier-free-guidance dropout) when ``cfg.condition != "none"``."""
    orbit = crystal_orbit(cfg.translations, cfg.proposal, cfg.lattice_orbit, cfg.species)
    loss = CrystalDiffusionLoss(cfg.mode, orbit, diffusion or make_diffusion(cfg))
    if cfg.condition != "none":
        from .condition import ConditionalLoss

        return ConditionalLoss(loss, cfg.cond_drop_prob)
    return loss


def train_csp(
    train_data: Sequence[Data],
    cfg: CSPConfig,
    out_dir: Optional[str] = None,
    progress: Optional[bool] = False,
    log_every: int = 50,
    model: Optional[CSPNet] = None,
) -> tuple[CSPNet, list[dict]]:
    """Train a CSP model; returns the model carrying its EMA weights and the logged history.

    With ``out_dir`` the run checkpoints (``last.pt``, resumable), logs ``metrics.jsonl`` and writes
    ``config.json``. A conditional ``cfg`` needs every crystal to carry ``cond [1, d]``
    (:func:`~.condition.attach_conditions`; NaN rows count as missing and train the null condition).
    """
    if cfg.condition != "none":
        from .condition import stack_conditions

        dims = stack_conditions(train_data).size(1)
        if cfg.cond_dim and cfg.cond_dim != dims:
            raise ValueError(f"cfg.cond_dim={cfg.cond_dim} but the training data's `cond` has width {dims}")
        cfg.cond_dim = dims
    torch.manual_seed(cfg.seed)
    if cfg.lattice_clip is None:
        cfg.lattice_clip = 1.5 * max(float(d.cell.abs().max()) for d in train_data)
    model = model if model is not None else make_model(cfg)
    loss = make_loss(cfg)
    trainer = Trainer(
        model, loss, train_data, batch_size=cfg.batch_size, lr=cfg.lr, grad_clip=cfg.grad_clip,
        ema_decay=cfg.ema_decay, max_steps=cfg.steps, log_every=min(log_every, max(cfg.steps, 1)),
        out_dir=out_dir, seed=cfg.seed, scheduler=cfg.scheduler, normalizer="graphs", progress=progress,
        checkpoint_every=max(cfg.steps // 10, 1) if out_dir else None,
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())
    history = trainer.fit()
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)
    return trainer.model, history


@torch.no_grad()
def generate(
    model: CSPNet,
    references: Sequence[Data],
    cfg: CSPConfig,
    batch_size: int = 500,
    seed: int = 0,
    num_steps: Optional[int] = None,
    step_lr: Optional[float] = None,
    *,
    cond: Optional[torch.Tensor] = None,
    guidance: Optional[float] = None,
) -> list[Data]:
    """One generated crystal per reference, with the reference's composition (CSP).

    Returns ``Data`` with ``z``, ``frac_coords``, ``cell [1, 3, 3]``; feed them to
    :func:`~.metrics.csp_metrics` or :func:`~.convert.data_to_structure`. A conditional model takes
    ``cond`` (``[len(references), d]``, or ``[1, d]`` for one condition for all; ``None``: the
    null condition) and the guidance scale ``guidance`` (default ``cfg.guidance``).
    """
    diffusion = make_diffusion(cfg)
    sampler = PredictorCorrector(model, diffusion, num_steps=cfg.sample_steps if num_steps is None else num_steps,
                                 step_lr=cfg.step_lr if step_lr is None else step_lr, lattice_clip=cfg.lattice_clip,
                                 guidance=cfg.guidance if guidance is None else guidance)
    if cond is not None:
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() != 2 or cond.size(0) not in (1, len(references)):
            raise ValueError(f"`cond` must have shape [{len(references)}, d] or [1, d], got {list(cond.shape)}")
        cond = cond.expand(len(references), -1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out: list[Data] = []
    for start in range(0, len(references), batch_size):
        chunk = Batch.from_data_list([Data(z=r.z, num_nodes=r.z.numel()) for r in references[start:start + batch_size]])
        z, batch = chunk.z.to(device), chunk.batch.to(device)
        c = None if cond is None else cond[start:start + batch_size].to(device)
        frac, cell = sampler.sample(z, batch, chunk.num_graphs, generator=generator, cond=c)
        frac, cell = frac.cpu(), cell.cpu()
        for i in range(chunk.num_graphs):
            lo, hi = int(chunk.ptr[i]), int(chunk.ptr[i + 1])
            out.append(Data(z=chunk.z[lo:hi], frac_coords=frac[lo:hi], cell=cell[i : i + 1], num_nodes=hi - lo))
    return out


def evaluate(generated: Sequence[Data], references: Sequence[Data], workers: int = 1) -> dict:
    """DiffCSP metrics (match rate, RMSE, validity, METRe, cRMSE) of one sample per reference."""
    from .metrics import csp_metrics

    return csp_metrics(list(generated), list(references), workers=workers)


def load_model(run_dir: str) -> tuple[CSPNet, CSPConfig]:
    """Model (EMA weights when saved) and configuration of a run folder written by :func:`train_csp`.

    A ``config.json`` from before conditioning existed has none of its keys and reads as an
    unconditioned run (``guidance`` defaults to 1).
    """
    from orbit_pyg.training import load_checkpoint

    with open(os.path.join(run_dir, "config.json")) as fh:
        values = json.load(fh)
    cfg = CSPConfig.from_dict(values)
    model = make_model(cfg)
    load_checkpoint(os.path.join(run_dir, "last.pt"), model, ema=True)
    return model, cfg


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - t0
