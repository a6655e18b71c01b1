r"""Shared training harness: one :class:`Trainer` for the crystal and molecule integrations.

What it does for any ``model`` and any loss ``loss_fn(model, batch, generator) -> Tensor`` (or
``(Tensor, {name: value})``) — :class:`~orbit_pyg.OrbitDiffusionLoss` has exactly this signature:

* **Determinism.** The data order comes from :class:`DeterministicBatchSampler`: the *global*
  batch of step ``s`` is a slice of a permutation seeded by ``(seed, epoch)`` only, so it is the
  same for any number of processes; each process takes a contiguous shard of it. The loss's
  randomness (noise, times, orbit elements) comes from a ``torch.Generator`` seeded by
  ``derive_seed(seed, step, rank)``, and the global torch / ``random`` / numpy generators are
  reseeded the same way at the start of every step (dropout, random transforms). Nothing random
  is carried from one step to the next, so a run resumed at step ``k`` draws exactly what an
  uninterrupted run draws from step ``k + 1`` on.
* **Checkpoint and resume.** ``out_dir/last.pt`` (and ``best.pt`` on the monitored validation
  metric) hold model, optimizer, scheduler, EMA, step, the open logging window and the best
  value; they are written atomically (:func:`atomic_save`: temporary file in the same folder,
  flush + fsync, ``os.replace``), so a kill at any instant leaves the previous checkpoint intact.
  ``fit()`` resumes from ``last.pt`` when it exists (``resume="auto"``) and truncates the metrics
  log back to the checkpoint's step, so no step is ever logged twice.
* **EMA** of the weights (:class:`ExponentialMovingAverage`), used for validation and saved.
* **Gradient clipping** (global L2 norm; the pre-clip norm is logged), **learning-rate schedule**
  (linear warmup + constant or cosine, ``ReduceLROnPlateau`` on a validation metric, or any
  scheduler you build), **progress bar** (tqdm, only on a TTY and on rank 0), **metrics log**
  ``out_dir/metrics.jsonl`` (JSON lines, rank 0).
* **Data parallel** with plain ``torch.distributed`` DDP launched by ``torchrun``: when
  ``WORLD_SIZE > 1`` the trainer joins the process group (gloo on CPU, nccl on CUDA), wraps the
  model in ``DistributedDataParallel`` and shards every global batch. Only rank 0 writes files.

**Loss normalization across processes.** A loss that is a mean over the nodes of its batch is
*not* the mean of the per-shard means when shards hold different numbers of nodes, and DDP
averages gradients with equal weight ``1/W`` per process. With per-shard weights ``w_r`` (nodes by
default, see ``normalizer``) each process back-propagates ``c_r L_r`` with
``c_r = W w_r / sum_q w_q`` (:func:`loss_scale`), so the averaged gradient is
``sum_r (w_r / sum_q w_q) grad L_r``: exactly the gradient of the global-batch loss. The logged
loss is the same weighted combination, i.e. the loss of the global batch.

Example:
    >>> import torch
    >>> from torch_geometric.data import Data
    >>> from orbit_pyg import OrbitDiffusionLoss, SO3, VPSchedule
    >>> from orbit_pyg.nn import PositionTransformer
    >>> from orbit_pyg.training import Trainer
    >>> data = [Data(pos=torch.randn(5, 3), z=torch.tensor([6, 1, 1, 1, 1])) for _ in range(8)]
    >>> loss = OrbitDiffusionLoss(VPSchedule(), orbit=SO3(16), mode="orbit")
    >>> trainer = Trainer(PositionTransformer(hidden=16, num_layers=1), loss, data, batch_size=4,
    ...                   max_steps=4, log_every=2, progress=False)
    >>> history = trainer.fit()
    >>> [r["step"] for r in history]
    [2, 4]
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .io import atomic_open, atomic_save

__all__ = [
    "Trainer",
    "ExponentialMovingAverage",
    "DeterministicBatchSampler",
    "atomic_save",
    "load_checkpoint",
    "read_metrics",
    "derive_seed",
    "seed_everything",
    "loss_scale",
    "shard_indices",
]

CHECKPOINT_FORMAT = "orbit_pyg.training/1"
METRICS_FILE = "metrics.jsonl"
LAST, BEST = "last.pt", "best.pt"


# --- seeding ---------------------------------------------------------------------------------
def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the integers ``keys`` (BLAKE2b of their decimal text).

    Used as ``derive_seed(seed, step, rank, stream)``: independent streams per step and process,
    identical across runs and machines.

    Example:
        >>> derive_seed(0, 1, 0) == derive_seed(0, 1, 0) != derive_seed(0, 1, 1)
        True
    """
    text = ",".join(str(int(k)) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy (when installed) and torch (CPU and every CUDA device).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(torch.rand(1) == a)
        True
    """
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (1 << 32))
    except ImportError:  # pragma: no cover - numpy ships with torch_geometric
        pass


# --- data order --------------------------------------------------------------------------------
def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Contiguous shard ``rank`` of ``indices`` split into ``world_size`` near-equal parts.

    The first ``len % world_size`` shards get one extra element (like ``torch.tensor_split``).

    Example:
        >>> [shard_indices(list(range(5)), r, 2) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    q, r = divmod(len(indices), world_size)
    start = rank * q + min(rank, r)
    return list(indices[start:start + q + (1 if rank < r else 0)])


class DeterministicBatchSampler:
    """Yields, step after step, this process's shard of the global batch.

    Epoch ``e`` visits the samples in the order ``randperm(num_samples)`` drawn from a generator
    seeded by ``derive_seed(seed, e)`` (or in index order when ``shuffle=False``). Global step
    ``s`` (0-based) is batch ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. The
    global batch therefore depends on ``(seed, epoch)`` only — not on the number of processes —
    and the position of a run is its step count alone (nothing to save for resume).

    Args:
        num_samples: dataset length; batch_size: the *global* batch size (all processes);
        seed: data-order seed; shuffle: permute every epoch;
        drop_last: drop an epoch's last, incomplete batch. Without it, a last batch smaller than
            ``world_size`` is dropped anyway (every process needs at least one sample);
        rank, world_size: this process and the number of processes;
        start_step, num_steps: iterate over global steps ``start_step .. num_steps - 1``.

    Example:
        >>> s = DeterministicBatchSampler(10, 4, seed=0, rank=1, world_size=2, num_steps=3)
        >>> s.steps_per_epoch, len(s), [len(b) for b in s]
        (2, 3, [2, 2, 2])
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, *, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, num_steps: Optional[int] = None):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}")
        if batch_size < world_size:
            raise ValueError(f"the global `batch_size` ({batch_size}) must be at least the number of processes ({world_size})")
        self.num_samples, self.batch_size, self.seed = int(num_samples), int(batch_size), int(seed)
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        full, rest = divmod(self.num_samples, self.batch_size)
        self.steps_per_epoch = full + (1 if (not drop_last and rest >= world_size) else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset ({self.num_samples} samples) is smaller than one global batch ({self.batch_size}); "
                "lower `batch_size` or use drop_last=False")
        self.start_step = int(start_step)
        self.num_steps = int(num_steps) if num_steps is not None else self.start_step + self.steps_per_epoch
        self._cache: tuple[int, list[int]] = (-1, [])

    def epoch_order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``."""
        if self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
                order = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                order = list(range(self.num_samples))
            self._cache = (epoch, order)
        return self._cache[1]

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of global step ``step`` (0-based), all processes together."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self.epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.num_steps):
            yield shard_indices(self.global_batch(step), self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)


def loss_scale(local_weight: float, total_weight: float, world_size: int) -> float:
    r"""Factor ``c_r = W w_r / sum_q w_q`` by which process ``r`` multiplies its loss before backward.

    DDP averages gradients over the ``W`` processes, so the synchronized gradient is
    ``(1/W) sum_r c_r grad L_r = sum_r (w_r / sum_q w_q) grad L_r``: the gradient of the loss of the
    whole global batch when ``L_r`` is a mean over ``w_r`` items (nodes, graphs, ...).

    Example:
        >>> loss_scale(3.0, 4.0, 2)   # a shard holding 3 of the batch's 4 nodes
        1.5
    """
    if total_weight <= 0:
        raise ValueError(f"the total normalizer weight must be positive, got {total_weight}")
    return float(world_size) * float(local_weight) / float(total_weight)


# --- checkpoints -----------------------------------------------------------------------------
def _remove_stale_temporaries(folder: str) -> list[str]:
    stale = glob.glob(os.path.join(folder, f".{LAST}.*.tmp")) + glob.glob(os.path.join(folder, f".{BEST}.*.tmp"))
    stale += glob.glob(os.path.join(folder, f".{METRICS_FILE}.*.tmp"))
    for path in stale:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return stale


def load_checkpoint(path: str, model: Optional[nn.Module] = None, ema: bool = True, map_location: Any = "cpu") -> dict:
    """Load a :class:`Trainer` checkpoint; with ``model``, copy its weights in (EMA ones by default).

    Returns the checkpoint dictionary (keys ``step``, ``model``, ``ema``, ``optimizer``, ...).
    ``ema=True`` falls back to the raw weights when the run kept no EMA.

    Example:
        >>> # model = MyModel(); load_checkpoint("runs/x/last.pt", model)   # EMA weights for sampling
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an orbit_pyg training checkpoint (format {CHECKPOINT_FORMAT!r})")
    if model is not None:
        state = ckpt["ema"]["shadow"] if (ema and ckpt.get("ema") is not None) else ckpt["model"]
        model.load_state_dict(state)
    return ckpt


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics log (JSON lines); a torn last line from a killed writer is skipped.

    Example:
        >>> # [r["loss"] for r in read_metrics("runs/x/metrics.jsonl") if r["kind"] == "train"]
    """
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write at the end of the file
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" in rec:
                    out.append(rec)
    return out


# --- EMA ---------------------------------------------------------------------------------------
class ExponentialMovingAverage:
    r"""Exponential moving average of a model's state: ``s <- d s + (1 - d) theta`` after each step.

    With ``warmup`` the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))`` so early,
    untrained weights are forgotten quickly. Floating entries of the state dict are averaged;
    integer buffers (counters) are copied.

    Example:
        >>> net = nn.Linear(2, 1); ema = ExponentialMovingAverage(net, decay=0.9, warmup=False)
        >>> with torch.no_grad(): _ = net.bias.fill_(1.0)
        >>> old = float(ema.shadow["bias"]); ema.update(net)
        >>> abs(float(ema.shadow["bias"]) - (0.9 * old + 0.1)) < 1e-6
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """Decay the next :meth:`update` applies."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """Context in which ``model`` holds the averaged weights; the live ones come back after."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.num_updates = float(state["decay"]), bool(state["warmup"]), int(state["num_updates"])
        for k, v in state["shadow"].items():
            if k not in self.shadow:
                raise KeyError(f"EMA state has an entry {k!r} that the model does not have")
            self.shadow[k].copy_(v)


# --- helpers -----------------------------------------------------------------------------------
def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _default_collate(items: list) -> Any:
    from torch_geometric.data import Batch, Data
    from torch_geometric.data.data import BaseData

    if items and isinstance(items[0], (Data, BaseData)):
        return Batch.from_data_list(items)
    return torch.utils.data.default_collate(items)


def _float(value: Any, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {list(value.shape)}")
        return float(value.detach())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} must be a number or a one-element tensor, got {type(value).__name__}") from None


class _DistEnv:
    """Rank / world size from the torchrun environment."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_available() and dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# --- the trainer -------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, Any, torch.Generator], Union[Tensor, tuple]]


class Trainer:
    r"""Train ``model`` on ``loss_fn`` with checkpoints, EMA, clipping, schedules, logs and DDP.

    One optimizer step per *global* batch of ``batch_size`` samples (split across processes under
    ``torchrun``). Step ``n`` (1-based) runs, in order: reseed (``derive_seed(seed, n, rank)``);
    fetch this process's shard; ``loss_fn(model, batch, generator)``; all-reduce the loss and
    metrics; backward of ``loss_scale(...) * loss``; clip the gradient norm; optimizer step;
    per-step scheduler step; EMA update; log (every ``log_every``); validation with EMA weights
    (every ``val_every``, ``ReduceLROnPlateau`` steps here, ``best.pt`` on improvement); checkpoint
    (every ``checkpoint_every``); callbacks (:meth:`attach`).

    Args:
        model: any ``nn.Module``; moved to ``device``. Under DDP the loss receives the
            ``DistributedDataParallel`` wrapper (use ``getattr(model, "module", model)`` for
            attributes); ``trainer.model`` is always the bare module.
        loss_fn: ``loss_fn(model, batch, generator) -> loss`` or ``-> (loss, {name: value})``;
            the extra values are averaged (over processes and the logging window) and logged.
        train_data: a PyG ``Dataset``, a list of ``Data``, or any indexable with ``len``.
        batch_size: the global batch size (all processes together).
        val_fn: ``val_fn(model) -> {name: float}``, called on rank 0 under ``torch.no_grad()``
            in eval mode with the EMA weights; the result is broadcast to every process.
        lr, weight_decay: Adam(W) settings; optimizer: ``"adam"``, ``"adamw"`` or a callable
            ``params -> torch.optim.Optimizer``.
        scheduler: ``None`` (constant), ``"cosine"`` (to ``min_lr_ratio * lr`` at ``max_steps``),
            both after ``warmup_steps`` of linear warmup; ``"plateau"`` (``ReduceLROnPlateau`` on
            ``monitor`` with ``plateau_factor`` / ``plateau_patience``, stepped at each validation);
            or a callable ``optimizer -> scheduler`` (stepped every step, or at validation when it
            is a ``ReduceLROnPlateau``).
        monitor, monitor_mode: validation metric (``"min"`` / ``"max"``) for ``best.pt`` and plateau.
        grad_clip: max global gradient L2 norm (``None``: no clipping; the norm is still logged).
        ema_decay: EMA decay (``None`` disables EMA); ema_warmup: see :class:`ExponentialMovingAverage`.
        max_steps, max_epochs: run length (the smaller when both are given; one epoch when neither).
        log_every, val_every, checkpoint_every: intervals in steps (the last step always logs,
            validates and checkpoints; ``val_every`` / ``checkpoint_every`` default to one epoch).
        out_dir: folder for ``last.pt``, ``best.pt`` and ``metrics.jsonl`` (``None``: nothing written).
        seed: seed of the data order and of every per-step generator.
        device: ``"cpu"``, ``"cuda"``, ... (default: ``cuda:LOCAL_RANK`` when CUDA is available).
        shuffle, drop_last: see :class:`DeterministicBatchSampler`.
        collate_fn: list of samples -> batch (default ``Batch.from_data_list``); num_workers:
            DataLoader workers (random dataset transforms are only reproducible with 0).
        normalizer: what each process's loss is a mean over, for the DDP weighting
            (:func:`loss_scale`): ``"nodes"`` (``batch.num_nodes``; :class:`OrbitDiffusionLoss`
            with ``reduction="mean"``), ``"graphs"``, ``"equal"`` (every process weighs the
            same), ``"sum"`` (the loss is a sum: shard losses add up), or ``callable(batch)``.
        nonfinite: ``"raise"`` (``FloatingPointError`` naming the step) or ``"skip"`` the step.
        progress: tqdm bar (default: on when stderr is a TTY; never on ranks other than 0).
        ddp_kwargs: extra arguments of ``DistributedDataParallel`` (e.g. ``find_unused_parameters``).

    Example:
        >>> from torch_geometric.data import Data
        >>> data = [Data(pos=torch.randn(4, 3), y=torch.randn(4, 3)) for _ in range(6)]
        >>> def mse(model, batch, generator):
        ...     return ((model(batch.pos) - batch.y) ** 2).sum(-1).mean()
        >>> t = Trainer(nn.Linear(3, 3), mse, data, batch_size=3, max_steps=4, log_every=1, progress=False)
        >>> len(t.fit())
        4
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_data: Any,
        *,
        batch_size: int = 32,
        val_fn: Optional[Callable[[nn.Module], dict]] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: Union[str, Callable] = "adam",
        scheduler: Union[None, str, Callable] = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        monitor: str = "val_loss",
        monitor_mode: str = "min",
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        grad_clip: Optional[float] = 1.0,
        ema_decay: Optional[float] = 0.999,
        ema_warmup: bool = True,
        max_steps: Optional[int] = None,
        max_epochs: Optional[int] = None,
        log_every: int = 50,
        val_every: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        out_dir: Optional[str] = None,
        seed: int = 0,
        device: Any = None,
        shuffle: bool = True,
        drop_last: bool = True,
        collate_fn: Optional[Callable[[list], Any]] = None,
        num_workers: int = 0,
        normalizer: Union[str, Callable[[Any], float]] = "nodes",
        nonfinite: str = "raise",
        progress: Optional[bool] = None,
        ddp_kwargs: Optional[dict] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("`loss_fn` must be callable as loss_fn(model, batch, generator)")
        if not hasattr(train_data, "__len__") or not hasattr(train_data, "__getitem__"):
            raise TypeError("`train_data` must be indexable with a length (a PyG Dataset or a list of Data)")
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"`monitor_mode` must be 'min' or 'max', got {monitor_mode!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"`nonfinite` must be 'raise' or 'skip', got {nonfinite!r}")
        if not (callable(normalizer) or normalizer in ("nodes", "graphs", "equal", "sum")):
            raise ValueError(f"`normalizer` must be 'nodes', 'graphs', 'equal', 'sum' or a callable, got {normalizer!r}")
        for name, value in (("log_every", log_every), ("val_every", val_every), ("checkpoint_every", checkpoint_every)):
            if value is not None and int(value) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"`grad_clip` must be positive or None, got {grad_clip}")

        self.env = _DistEnv()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.is_main = self.rank == 0
        if device is None:
            device = f"cuda:{self.env.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.env.local_rank if self.env.distributed else torch.cuda.current_device())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_process_group = False
        if self.env.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self.is_main = self.rank == 0

        self.model = model.to(self.device)
        self.loss_fn, self.val_fn, self.train_data = loss_fn, val_fn, train_data
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.collate_fn = collate_fn or _default_collate
        self.num_workers = int(num_workers)
        self.normalizer, self.nonfinite = normalizer, nonfinite
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.out_dir = None if out_dir is None else os.path.abspath(out_dir)
        self.progress = progress

        probe = DeterministicBatchSampler(len(train_data), self.batch_size, self.seed, shuffle=self.shuffle,
                                          drop_last=self.drop_last, rank=self.rank, world_size=self.world_size)
        self.steps_per_epoch = probe.steps_per_epoch
        candidates = [s for s in (max_steps, None if max_epochs is None else int(max_epochs) * self.steps_per_epoch) if s is not None]
        self.max_steps = int(min(candidates)) if candidates else self.steps_per_epoch
        if self.max_steps < 0:
            raise ValueError(f"`max_steps` must be >= 0, got {self.max_steps}")
        self.log_every = int(log_every)
        self.val_every = int(val_every) if val_every is not None else self.steps_per_epoch
        self.checkpoint_every = int(checkpoint_every) if checkpoint_every is not None else self.steps_per_epoch

        self._train_model: nn.Module = self.model
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = DistributedDataParallel(self.model, device_ids=ids, **(ddp_kwargs or {}))

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if callable(optimizer):
            self.optimizer = optimizer(self.params)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)
        elif optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        else:
            raise ValueError(f"`optimizer` must be 'adam', 'adamw' or a callable, got {optimizer!r}")
        self.scheduler, self._plateau = self._make_scheduler(scheduler, int(warmup_steps), float(min_lr_ratio),
                                                             float(plateau_factor), int(plateau_patience))
        self.ema = ExponentialMovingAverage(self.model, ema_decay, ema_warmup) if ema_decay is not None else None

        self.step = 0
        self.best: Optional[float] = None
        self.history: list[dict] = []
        self.last_loss: Optional[float] = None
        self.should_stop = False
        self._callbacks: list[tuple[Callable, int]] = []
        self._window: dict = {}
        self._elapsed_before = 0.0
        self._t0 = time.time()
        self._log_file = None
        self._checkpoint_step = -1
        self._lr_of_step = 0.0
        self.config = {
            "seed": self.seed, "batch_size": self.batch_size, "num_samples": len(train_data), "shuffle": self.shuffle,
            "drop_last": self.drop_last, "world_size": self.world_size, "max_steps": self.max_steps,
        }

    # --- construction helpers ----------------------------------------------------------------
    def _make_scheduler(self, scheduler, warmup: int, min_ratio: float, factor: float, patience: int):
        plateau_cls = torch.optim.lr_scheduler.ReduceLROnPlateau
        if callable(scheduler) and not isinstance(scheduler, str):
            sched = scheduler(self.optimizer)
            return sched, isinstance(sched, plateau_cls)
        if scheduler == "plateau":
            if warmup:
                raise ValueError("`warmup_steps` is not supported with scheduler='plateau'")
            if self.val_fn is None:
                raise ValueError("scheduler='plateau' needs a `val_fn` that returns the `monitor` metric")
            return plateau_cls(self.optimizer, mode=self.monitor_mode, factor=factor, patience=patience), True
        if scheduler not in (None, "constant", "cosine"):
            raise ValueError(f"`scheduler` must be None, 'constant', 'cosine', 'plateau' or a callable, got {scheduler!r}")
        if scheduler in (None, "constant") and warmup <= 0:
            return None, False
        total, cosine = self.max_steps, scheduler == "cosine"

        def factor_at(s: int) -> float:  # s = number of completed steps; the lr of step s + 1
            if s < warmup:
                return (s + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (s - warmup) / max(1, total - warmup))
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor_at), False

    def attach(self, fn: Callable[["Trainer"], None], interval: int = 1) -> "Trainer":
        """Call ``fn(trainer)`` after every ``interval``-th step (after logging and checkpointing).

        Runs on every process. Set ``trainer.should_stop = True`` to end ``fit`` cleanly (a
        checkpoint is written); an exception propagates (the last checkpoint stays as it was).
        """
        if int(interval) < 1:
            raise ValueError(f"`interval` must be >= 1, got {interval}")
        self._callbacks.append((fn, int(interval)))
        return self

    # --- paths / files -------------------------------------------------------------------------
    def _path(self, name: str) -> Optional[str]:
        return None if self.out_dir is None else os.path.join(self.out_dir, name)

    @property
    def last_checkpoint(self) -> Optional[str]:
        return self._path(LAST)

    @property
    def metrics_path(self) -> Optional[str]:
        return self._path(METRICS_FILE)

    def _open_log(self, keep_until: Optional[int]) -> None:
        """Open the metrics log (rank 0): fresh, or truncated to the records of steps <= keep_until."""
        if not self.is_main or self.out_dir is None:
            return
        path = self.metrics_path
        if keep_until is None or not os.path.exists(path):
            self._log_file = open(path, "w")
            return
        kept = [r for r in read_metrics(path) if int(r["step"]) <= keep_until]
        with atomic_open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._log_file = open(path, "a")

    def _emit(self, record: dict) -> None:
        self.history.append(record)
        if self._log_file is not None:
            self._log_file.write(json.dumps(record) + "\n")
            self._log_file.flush()

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs (model, optimizer, scheduler, EMA, step, window, best)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "window": dict(self._window),
            "best": self.best,
            "elapsed": self._elapsed(),
            "config": dict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an orbit_pyg training checkpoint (format {state.get('format')!r})")
        saved = state.get("config", {})
        for key in ("seed", "batch_size", "num_samples", "shuffle", "drop_last"):
            if key in saved and saved[key] != self.config[key]:
                warnings.warn(f"resuming a checkpoint made with {key}={saved[key]!r} under {key}={self.config[key]!r}: "
                              "the run will not continue the same sequence", stacklevel=3)
        if saved.get("world_size", self.world_size) != self.world_size:
            warnings.warn(f"resuming a {saved['world_size']}-process checkpoint on {self.world_size} processes: the data "
                          "order is unchanged but per-process loss randomness differs", stacklevel=3)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self._window = dict(state.get("window") or {})
        self.best = state.get("best")
        self._elapsed_before = float(state.get("elapsed", 0.0))
        self._t0 = time.time()
        self._checkpoint_step = self.step

    def save_checkpoint(self, name: str = LAST) -> Optional[str]:
        """Atomically write the state to ``out_dir/name`` (rank 0 only); returns the path."""
        path = self._path(name)
        if path is None or not self.is_main:
            return None
        atomic_save(self.state_dict(), path)
        return path

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.time() - self._t0)

    # --- one step ------------------------------------------------------------------------------
    def _shard_weight(self, batch: Any) -> float:
        n = self.normalizer
        if callable(n):
            return float(n(batch))
        if n in ("equal", "sum"):
            return 1.0
        attr = "num_nodes" if n == "nodes" else "num_graphs"
        value = getattr(batch, attr, None)
        if value is None:
            raise TypeError(f"normalizer={n!r} needs batches with `{attr}` (PyG batches); pass normalizer='graphs', "
                            "'equal', 'sum' or a callable(batch) -> weight")
        return float(value)

    def _reseed(self, step: int) -> torch.Generator:
        seed_everything(derive_seed(self.seed, step, self.rank, 1))
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, step, self.rank, 0))

    def _train_step(self, batch: Any, generator: torch.Generator) -> tuple[float, float, dict, bool]:
        self._train_model.train()
        out = self.loss_fn(self._train_model, batch, generator)
        loss, metrics = (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor (or (tensor, dict)), got "
                             f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else list(loss.shape)}")
        names = sorted(metrics)
        local_w = self._shard_weight(batch) if self.world_size > 1 else 1.0
        vec = torch.tensor([local_w, local_w * float(loss.detach())] + [local_w * _float(metrics[k], k) for k in names],
                           dtype=torch.float64)
        if self.world_size > 1:
            vec = vec.to(self.device)
            dist.all_reduce(vec)
            vec = vec.cpu()
        total_w = float(vec[0])
        if self.normalizer == "sum":
            scale, global_loss = float(self.world_size), float(vec[1])
        else:
            scale, global_loss = loss_scale(local_w, total_w, self.world_size), float(vec[1]) / total_w
        global_metrics = {k: float(vec[2 + i]) / total_w for i, k in enumerate(names)}
        finite = math.isfinite(global_loss)
        if not finite and self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite loss {global_loss} at step {self.step + 1}: lower the learning rate, "
                                     "check the data, or pass nonfinite='skip'")
        self.optimizer.zero_grad(set_to_none=True)
        (loss if scale == 1.0 else loss * scale).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip else float("inf")))
        if finite and not math.isfinite(grad_norm) and self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {self.step + 1} (loss {global_loss}): "
                                     "lower the learning rate, check the model, or pass nonfinite='skip'")
        finite = finite and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return global_loss, grad_norm, global_metrics, finite

    # --- validation ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def averaged_weights(self):
        """Context in which ``trainer.model`` holds the EMA weights (no-op without EMA)."""
        if self.ema is None:
            yield self.model
        else:
            with self.ema.average_parameters(self.model) as m:
                yield m

    def validate(self) -> dict:
        """``val_fn`` on rank 0 with the EMA weights in eval mode; the result on every process."""
        if self.val_fn is None:
            return {}
        result = [None]
        if self.is_main:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), self.averaged_weights() as m:
                    raw = self.val_fn(m)
            finally:
                self.model.train(was_training)
            if not isinstance(raw, dict):
                raise TypeError(f"val_fn must return a dict of metrics, got {type(raw).__name__}")
            result = [{k: _float(v, k) for k, v in raw.items()}]
        if self.world_size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.monitor_mode == "min" else value > self.best

    # --- the loop ------------------------------------------------------------------------------
    def _progress_enabled(self) -> bool:
        if not self.is_main:
            return False
        return bool(self.progress) if self.progress is not None else sys.stderr.isatty()

    def fit(self, resume: Union[bool, str] = "auto") -> list[dict]:
        """Train until ``max_steps``; returns the records logged by this call.

        Args:
            resume: ``"auto"`` (resume from ``out_dir/last.pt`` when it exists), ``True`` (it must
                exist), ``False`` (start over: the metrics log is rewritten), or a checkpoint path.
        """
        self.history = []
        resumed_from = None
        if self.out_dir is not None and self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            _remove_stale_temporaries(self.out_dir)
        path = resume if isinstance(resume, str) and resume != "auto" else self.last_checkpoint
        if resume is True and (path is None or not os.path.exists(path)):
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {path}")
        if resume is not False and path is not None and os.path.exists(path):
            self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            resumed_from = path
        elif resume not in (False, "auto", True):
            raise FileNotFoundError(f"no checkpoint at {resume}")
        self._open_log(self.step if resumed_from else None)
        self._t0 = time.time()

        from torch.utils.data import DataLoader

        sampler = DeterministicBatchSampler(len(self.train_data), self.batch_size, self.seed, shuffle=self.shuffle,
                                            drop_last=self.drop_last, rank=self.rank, world_size=self.world_size,
                                            start_step=self.step, num_steps=self.max_steps)
        loader = DataLoader(self.train_data, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers)
        bar = None
        if self._progress_enabled():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            batches = iter(loader)
            while self.step < self.max_steps and not self.should_stop:
                n = self.step + 1
                generator = self._reseed(n)
                batch = _to_device(next(batches), self.device)
                self._lr_of_step = float(self.optimizer.param_groups[0]["lr"])
                loss, grad_norm, metrics, applied = self._train_step(batch, generator)
                if applied:
                    if self.scheduler is not None and not self._plateau:
                        self.scheduler.step()
                    if self.ema is not None:
                        self.ema.update(self.model)
                self.step, self.last_loss = n, loss
                self._accumulate(loss, grad_norm, metrics, applied)
                last = n == self.max_steps
                if n % self.log_every == 0 or last:
                    record = self._flush_window(n)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                if self.val_fn is not None and (n % self.val_every == 0 or last):
                    self._run_validation(n)
                if self.out_dir is not None and (n % self.checkpoint_every == 0 or last):
                    self.save_checkpoint(LAST)
                    self._checkpoint_step = n
                if bar is not None:
                    bar.update(1)
                for fn, interval in self._callbacks:
                    if n % interval == 0:
                        fn(self)
            if self.out_dir is not None and self._checkpoint_step != self.step:
                self.save_checkpoint(LAST)
                self._checkpoint_step = self.step
        finally:
            if bar is not None:
                bar.close()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return self.history

    def close(self) -> None:
        """Leave the process group if this trainer created it (call once, at the end, under DDP)."""
        if self._owns_process_group and dist.is_initialized():
            dist.barrier()  # every process is done with its collectives
            self._train_model = self.model  # drop the DDP wrapper (and its reducer) before the group goes
            dist.destroy_process_group()
            self._owns_process_group = False

    def _accumulate(self, loss: float, grad_norm: float, metrics: dict, applied: bool) -> None:
        w = self._window
        if not applied:
            w["skipped"] = w.get("skipped", 0) + 1
            return
        w["count"] = w.get("count", 0) + 1
        for k, v in [("loss", loss), ("grad_norm", grad_norm)] + list(metrics.items()):
            w[f"sum:{k}"] = w.get(f"sum:{k}", 0.0) + v

    def _flush_window(self, n: int) -> dict:
        w, self._window = self._window, {}
        count = w.get("count", 0)
        record = {"kind": "train", "step": n, "epoch": (n - 1) // self.steps_per_epoch, "lr": self._lr_of_step}
        for key, value in w.items():
            if key.startswith("sum:"):
                record[key[4:]] = value / count
        if "loss" not in record:
            record["loss"] = float("nan")
        if w.get("skipped"):
            record["skipped_steps"] = w["skipped"]
        record["elapsed"] = self._elapsed()
        self._emit(record)
        return record

    def _run_validation(self, n: int) -> dict:
        metrics = self.validate()
        record = {"kind": "val", "step": n, **metrics}
        value = metrics.get(self.monitor)
        if self._plateau:
            if value is None:
                raise KeyError(f"the plateau scheduler monitors {self.monitor!r} but val_fn returned {sorted(metrics)}")
            self.scheduler.step(value)
        if value is not None and math.isfinite(value) and self._improved(value):
            self.best = value
            record["best"] = True
            self.save_checkpoint(BEST)
        self._emit(record)
        return metrics
