r"""A matbench-ready property predictor: CSPNet encoder, optional orbit denoising pretraining, MLP head.

:class:`OrbitPretrainedEstimator` has the scikit-learn shape matbench expects,
``fit(structures, targets)`` / ``predict(structures)`` on pymatgen ``Structure`` objects:

1. **featurize**: each structure becomes a crystal graph (``z``, ``frac_coords``, ``cell``) with
   :func:`orbit_pyg.integrations.crystal.structure_to_data` (Niggli-reduced, canonical cell);
   disordered / partially occupied sites raise :class:`UnfeaturizableStructureError`;
2. **pretrain** (self-supervised, on the training structures only): the crystal integration's
   :class:`~orbit_pyg.integrations.crystal.model.CSPNet` is trained as a DiffCSP denoiser with
   :class:`~orbit_pyg.integrations.crystal.diffusion.CrystalDiffusionLoss`; ``pretrain`` picks the
   target: ``None`` (no pretraining), ``"plain"``, ``"augment"`` or ``"orbit"`` (the Rao-Blackwellized
   posterior mean over torus translations, arXiv 2502.09890);
3. **fine-tune**: the encoder trunk (the CSPNet layers up to the final LayerNorm, read at the
   smallest noise level ``t = 1 / T``) is mean-pooled per crystal and fed to an MLP head,
   ``y_hat_b = MLP( mean_{i in b} h_i )``; encoder and head are trained together on
   standardized targets ``(y - mean) / std`` with the mean squared error (regression) or on the
   binary cross-entropy of a logit (classification).

``predict`` returns targets in the original units (regression) or the probability of the
positive class (classification: matbench accepts floats in ``[0, 1]`` and scores ROC-AUC on them).

Example:
    >>> from pymatgen.core import Lattice, Structure
    >>> xs = [Structure(Lattice.cubic(3.0 + 0.1 * i), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]) for i in range(8)]
    >>> ys = [0.1 * i for i in range(8)]
    >>> est = OrbitPretrainedEstimator(hidden=16, layers=1, n_freq=4, time_dim=8, pretrain_steps=2,
    ...                                finetune_steps=2, batch_size=4, translations=8)
    >>> est.fit(xs, ys).predict(xs[:3]).shape
    (3,)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

from orbit_pyg.training import Trainer

from ..crystal.convert import CrystalConversionError, structure_to_data
from ..crystal.diffusion import CrystalDiffusion, CrystalDiffusionLoss, crystal_orbit
from ..crystal.model import CSPNet

__all__ = [
    "UnfeaturizableStructureError",
    "structures_to_data",
    "encode",
    "PropertyModel",
    "OrbitPretrainedEstimator",
    "PRETRAIN_MODES",
    "TASK_TYPES",
]

PRETRAIN_MODES = (None, "plain", "augment", "orbit")
TASK_TYPES = ("regression", "classification")


class UnfeaturizableStructureError(ValueError):
    """A structure the encoder cannot read (disordered / partially occupied sites, dummy species, ...).

    ``index`` is its position in the input list and ``reason`` the crystal-conversion category
    (``"disordered"``, ``"bad_species"``, ``"bad_lattice"``, ...).
    """

    def __init__(self, message: str, index: int, reason: str):
        super().__init__(message)
        self.index, self.reason = index, reason


def structures_to_data(structures: Sequence[Any], *, niggli: bool = True, max_atoms: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None) -> list[Data]:
    r"""pymatgen structures → crystal graphs, with an error naming the structure that fails.

    Args:
        structures: pymatgen ``Structure`` objects (a pandas ``Series`` works: its values are used).
        niggli: Niggli-reduce and canonicalize the cell (DiffCSP preprocessing; the same crystal).
        max_atoms: refuse larger structures (the encoder's graph is fully connected: ``O(n^2)``).
        dtype: float dtype of the coordinates (default ``torch.get_default_dtype()``).

    Raises:
        TypeError: an entry is not a pymatgen ``Structure``.
        UnfeaturizableStructureError: a disordered / partially occupied structure (matbench's
            ordered-structure featurizers cannot read it either) or any other conversion failure.

    Example:
        >>> from pymatgen.core import Lattice, Structure
        >>> s = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]])
        >>> structures_to_data([s])
        Traceback (most recent call last):
        ...
        orbit_pyg.integrations.matbench.model.UnfeaturizableStructureError: structure 0 (K0.5Na0.5) cannot be featurized: site 0 is disordered or partially occupied ('K0.5 Na0.5', total occupancy 1); only ordered structures convert. Order it first (e.g. pymatgen's OrderDisorderedStructureTransformation) or drop it.
    """
    from pymatgen.core import Structure

    values = list(getattr(structures, "values", structures))
    out = []
    for i, s in enumerate(values):
        if not isinstance(s, Structure):
            raise TypeError(f"structures[{i}] must be a pymatgen Structure, got {type(s).__name__} "
                            "(composition-only matbench tasks are not supported by this encoder)")
        try:
            out.append(structure_to_data(s, niggli=niggli, canonical=niggli, max_atoms=max_atoms, dtype=dtype))
        except CrystalConversionError as err:
            hint = (" Order it first (e.g. pymatgen's OrderDisorderedStructureTransformation) or drop it."
                    if err.reason == "disordered" else "")
            raise UnfeaturizableStructureError(
                f"structure {i} ({s.composition.formula.replace(' ', '')}) cannot be featurized: {err}.{hint}",
                i, err.reason) from err
    return out


def encode(net: CSPNet, z: Tensor, frac: Tensor, cell: Tensor, batch: Tensor, num_graphs: int,
           t: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    r"""The CSPNet trunk: node embeddings ``h [N, H]`` (after the final LayerNorm) and their per-crystal mean ``[B, H]``.

    ``h`` is :meth:`CSPNet.encode <orbit_pyg.integrations.crystal.model.CSPNet.encode>`, the features
    :meth:`CSPNet.forward` feeds its heads (species + time embedding, ``num_layers`` message-passing
    layers on the fully connected periodic graph, final norm), so a denoising-pretrained ``net``
    hands its learned representation to the property head. With the Gram lattice input the
    embeddings are invariant to rotations of the lattice and to periodic translations of the
    fractional coordinates, and the pooled embedding is invariant to permuting the atoms.

    Example:
        >>> net = CSPNet(hidden=8, num_layers=1, n_freq=2, time_dim=4)
        >>> h, g = encode(net, torch.tensor([11, 17]), torch.rand(2, 3), 4 * torch.eye(3)[None], torch.zeros(2, dtype=torch.long), 1)
        >>> h.shape, g.shape
        (torch.Size([2, 8]), torch.Size([1, 8]))
    """
    h = net.encode(z, frac, cell, t, batch, num_graphs)
    batch = batch.to(h.device) if batch is not None else torch.zeros(h.size(0), dtype=torch.long, device=h.device)
    return h, scatter(h, batch, dim=0, dim_size=num_graphs, reduce="mean")


class PropertyModel(nn.Module):
    r"""``y_hat = MLP(mean_i h_i)``: a :class:`CSPNet` encoder (see :func:`encode`) and an MLP head.

    Args:
        encoder: the (possibly pretrained) CSPNet; only its trunk is used.
        out_dim: outputs per crystal (1 for a scalar target or a binary logit).
        head_hidden: width of the head's hidden layer (default: the encoder width).
        t: the diffusion time the trunk is read at (``1 / T``: the cleanest level seen in pretraining).
        dropout: dropout before the head's last layer.

    ``forward(batch)`` reads ``z``, ``frac_coords``, ``cell`` and ``batch`` from a PyG ``Batch`` and
    returns ``[B, out_dim]``.
    """

    def __init__(self, encoder: CSPNet, out_dim: int = 1, head_hidden: Optional[int] = None,
                 t: float = 1e-3, dropout: float = 0.0):
        super().__init__()
        width = head_hidden or encoder.hidden
        self.encoder, self.t, self.out_dim = encoder, float(t), int(out_dim)
        self.head = nn.Sequential(nn.Linear(encoder.hidden, width), nn.SiLU(), nn.Dropout(dropout),
                                  nn.Linear(width, out_dim))

    def forward(self, data: Any) -> Tensor:
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(data.z.numel(), dtype=torch.long, device=data.z.device)
        num_graphs = int(getattr(data, "num_graphs", 1))
        _, pooled = encode(self.encoder, data.z, data.frac_coords, data.cell.reshape(-1, 3, 3), batch,
                           num_graphs, self.t)
        return self.head(pooled)

    def __repr__(self) -> str:
        return f"PropertyModel(encoder={self.encoder!r}, out_dim={self.out_dim}, t={self.t})"


def _regression_loss(model: nn.Module, batch: Any, generator: Optional[torch.Generator] = None):
    pred = model(batch).squeeze(-1)
    return F.mse_loss(pred, batch.y.to(pred.dtype).reshape(-1))


def _classification_loss(model: nn.Module, batch: Any, generator: Optional[torch.Generator] = None):
    logit = model(batch).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logit, batch.y.to(logit.dtype).reshape(-1))


class OrbitPretrainedEstimator:
    r"""``fit(structures, targets)`` / ``predict(structures)``: encoder pretrained by (orbit) denoising, MLP head.

    See the module docstring for the three stages and their maths.

    Args:
        task_type: ``"regression"`` (standardized targets, MSE; ``predict`` de-standardizes) or
            ``"classification"`` (binary targets, BCE on a logit; ``predict`` returns ``P(y = 1)``).
        pretrain: ``None`` / ``"off"`` (no pretraining), ``"plain"``, ``"augment"`` or ``"orbit"``
            (the :class:`CrystalDiffusionLoss` mode).
        hidden, layers, n_freq, time_dim: CSPNet size (``n_freq`` Fourier frequencies).
        pretrain_steps, finetune_steps: optimizer steps of each stage (``pretrain_steps`` is ignored
            when ``pretrain`` is off).
        batch_size, lr, weight_decay, grad_clip, ema_decay: optimisation (Adam; fine-tuning uses a
            cosine schedule; EMA weights are used for prediction).
        translations, proposal, lattice_orbit: the orbit of the ``"orbit"`` / ``"augment"``
            objectives (K torus translations, ``"uniform"`` / ``"wrapped_normal"``, optional
            basis-relabelling orbit); diffusion_steps: ``T``.
        head_hidden, dropout: the MLP head.
        niggli: Niggli-reduce cells before encoding; max_atoms: refuse larger structures.
        seed: seeds initialization, data order and every noise draw (the same seed gives the same
            model). dtype: ``torch.float32`` or ``torch.float64``. device: ``None`` = CUDA when
            available. progress: tqdm bars for both stages.

    Attributes after ``fit``: ``model_`` (:class:`PropertyModel`), ``y_mean_`` / ``y_std_``,
    ``history_`` (``{"pretrain": [...], "finetune": [...]}`` logged losses).
    """

    def __init__(self, task_type: str = "regression", pretrain: Optional[str] = "orbit", *, hidden: int = 128,
                 layers: int = 3, n_freq: int = 16, time_dim: int = 64, pretrain_steps: int = 1000,
                 finetune_steps: int = 1000, batch_size: int = 64, lr: float = 1e-3, finetune_lr: Optional[float] = None,
                 weight_decay: float = 0.0, grad_clip: Optional[float] = 1.0, ema_decay: Optional[float] = 0.999,
                 translations: int = 256, proposal: str = "uniform", lattice_orbit: Any = False,
                 diffusion_steps: int = 1000, head_hidden: Optional[int] = None, dropout: float = 0.0,
                 niggli: bool = True, max_atoms: Optional[int] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = False):
        if task_type not in TASK_TYPES:
            raise ValueError(f"`task_type` must be one of {TASK_TYPES}, got {task_type!r}")
        if pretrain in ("off", "none", "None", False):
            pretrain = None
        if pretrain not in PRETRAIN_MODES:
            raise ValueError(f"`pretrain` must be one of {PRETRAIN_MODES} (or 'off'), got {pretrain!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
        for name, value in (("pretrain_steps", pretrain_steps), ("finetune_steps", finetune_steps),
                            ("batch_size", batch_size)):
            if int(value) < (1 if name == "batch_size" else 0):
                raise ValueError(f"`{name}` must be a non-negative integer (batch_size >= 1), got {value}")
        self.task_type, self.pretrain = task_type, pretrain
        self.hidden, self.layers, self.n_freq, self.time_dim = int(hidden), int(layers), int(n_freq), int(time_dim)
        self.pretrain_steps, self.finetune_steps = int(pretrain_steps), int(finetune_steps)
        self.batch_size, self.lr, self.finetune_lr = int(batch_size), float(lr), finetune_lr
        self.weight_decay, self.grad_clip, self.ema_decay = float(weight_decay), grad_clip, ema_decay
        self.translations, self.proposal, self.lattice_orbit = int(translations), proposal, lattice_orbit
        self.diffusion_steps, self.head_hidden, self.dropout = int(diffusion_steps), head_hidden, float(dropout)
        self.niggli, self.max_atoms, self.seed = bool(niggli), max_atoms, int(seed)
        self.dtype, self.device, self.progress = dtype, device, bool(progress)
        self.model_: Optional[PropertyModel] = None

    # ------------------------------------------------------------------ parameters
    _PARAMS = ("task_type", "pretrain", "hidden", "layers", "n_freq", "time_dim", "pretrain_steps",
               "finetune_steps", "batch_size", "lr", "finetune_lr", "weight_decay", "grad_clip", "ema_decay",
               "translations", "proposal", "lattice_orbit", "diffusion_steps", "head_hidden", "dropout",
               "niggli", "max_atoms", "seed")

    def get_params(self) -> dict:
        """The settings as JSON-friendly values (matbench stores them per fold with ``record(params=...)``)."""
        params = {k: getattr(self, k) for k in self._PARAMS}
        params["pretrain"] = params["pretrain"] or "off"
        params["dtype"] = str(self.dtype).replace("torch.", "")
        return {k: v for k, v in params.items() if v is not None}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._PARAMS)
        return f"OrbitPretrainedEstimator({args})"

    # ------------------------------------------------------------------ helpers
    def _trainer(self, model: nn.Module, loss: Any, data: list, steps: int, lr: float, scheduler: Optional[str]) -> Trainer:
        return Trainer(model, loss, data, batch_size=min(self.batch_size, len(data)), lr=lr,
                       weight_decay=self.weight_decay, grad_clip=self.grad_clip, ema_decay=self.ema_decay,
                       max_steps=steps, log_every=max(1, min(50, steps)), seed=self.seed, scheduler=scheduler,
                       normalizer="graphs", progress=self.progress, device=self.device)

    def _targets(self, targets: Any, n: int) -> np.ndarray:
        y = np.asarray(getattr(targets, "values", targets))
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"`targets` must be one value per structure ({n}), got shape {list(y.shape)}")
        if self.task_type == "classification":
            if y.dtype == bool:
                return y.astype(np.float64)
            y = y.astype(np.float64)
            if not np.isin(y, (0.0, 1.0)).all():
                raise ValueError("classification `targets` must be booleans or 0 / 1")
            return y
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"regression `targets` must be numbers, got dtype {y.dtype}") from err
        if not np.isfinite(y).all():
            raise ValueError(f"`targets` contains {int((~np.isfinite(y)).sum())} NaN / Inf values")
        return y

    # ------------------------------------------------------------------ API
    def fit(self, structures: Sequence[Any], targets: Sequence[float]) -> "OrbitPretrainedEstimator":
        """Pretrain (unless off) on ``structures``, then fine-tune the head on ``targets``; returns ``self``.

        Seeded by ``seed``; the caller's global torch RNG state is left as it was.
        """
        data = structures_to_data(structures, niggli=self.niggli, max_atoms=self.max_atoms, dtype=self.dtype)
        if not data:
            raise ValueError("`structures` is empty")
        y = self._targets(targets, len(data))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = self._fit(data, y)
        return self

    def _fit(self, data: list, y: np.ndarray) -> PropertyModel:
        net = CSPNet(hidden=self.hidden, num_layers=self.layers, n_freq=self.n_freq, time_dim=self.time_dim).to(self.dtype)
        self.history_ = {"pretrain": [], "finetune": []}
        if self.pretrain is not None and self.pretrain_steps > 0:
            diffusion = CrystalDiffusion(num_steps=self.diffusion_steps)
            loss = CrystalDiffusionLoss(self.pretrain, crystal_orbit(self.translations, self.proposal, self.lattice_orbit),
                                        diffusion)
            trainer = self._trainer(net, loss, data, self.pretrain_steps, self.lr, None)
            self.history_["pretrain"] = trainer.fit()
            if trainer.ema is not None:
                trainer.ema.copy_to(trainer.model)
            net = trainer.model
        if self.task_type == "regression":
            self.y_mean_ = float(y.mean())
            std = float(y.std())
            self.y_std_ = std if std > 0 else 1.0
            y_fit = (y - self.y_mean_) / self.y_std_
            loss_fn = _regression_loss
        else:
            self.y_mean_, self.y_std_ = 0.0, 1.0
            y_fit = y
            loss_fn = _classification_loss
        labelled = []
        for d, value in zip(data, y_fit):
            d = d.clone()
            d.y = torch.tensor([value], dtype=self.dtype)
            labelled.append(d)
        model = PropertyModel(net, 1, self.head_hidden, t=1.0 / self.diffusion_steps, dropout=self.dropout).to(self.dtype)
        if self.finetune_steps > 0:
            trainer = self._trainer(model, loss_fn, labelled, self.finetune_steps, self.finetune_lr or self.lr, "cosine")
            self.history_["finetune"] = trainer.fit()
            if trainer.ema is not None:
                trainer.ema.copy_to(trainer.model)
            model = trainer.model
        return model.eval()

    @torch.no_grad()
    def predict(self, structures: Sequence[Any], batch_size: int = 256) -> np.ndarray:
        """Predictions ``[n]`` (float64): targets in their units, or ``P(y = 1)`` for classification."""
        if self.model_ is None:
            raise RuntimeError("call fit(structures, targets) before predict(structures)")
        data = structures_to_data(structures, niggli=self.niggli, max_atoms=self.max_atoms, dtype=self.dtype)
        if not data:
            return np.zeros(0)
        device = next(self.model_.parameters()).device
        self.model_.eval()
        outs = []
        for start in range(0, len(data), batch_size):
            batch = Batch.from_data_list(data[start:start + batch_size]).to(device)
            outs.append(self.model_(batch).squeeze(-1).double().cpu())
        out = torch.cat(outs)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{int((~torch.isfinite(out)).sum())} of {out.numel()} predictions are NaN / Inf: "
                                     "the fit diverged (lower `lr` / `finetune_lr`, or keep `grad_clip`)")
        if self.task_type == "classification":
            return torch.sigmoid(out).numpy()
        return out.numpy() * self.y_std_ + self.y_mean_
