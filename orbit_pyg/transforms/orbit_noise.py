"""Noise a sample and attach its Rao-Blackwell target, so that an unchanged loop only regresses."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import get_worker_info
from torch_geometric.data.datapipes import functional_transform
from torch_geometric.transforms import BaseTransform

from ..losses import NoisyBatch, OrbitDiffusionLoss
from ..orbits.base import Orbit
from ..schedules import NoiseSchedule

_DEFAULT_KEYS = {"xt": "xt", "t": "t", "target": "target", "ess": "ess", "x0": "x0"}


def write_noisy(data: Any, noisy: NoisyBatch, keys: dict[str, str]) -> Any:
    """Store the fields of ``noisy`` on ``data`` under ``keys`` (per node: xt, target, x0; per graph: t, ess)."""
    setattr(data, keys["xt"], noisy.xt)
    setattr(data, keys["t"], noisy.t)
    setattr(data, keys["target"], noisy.target)
    setattr(data, keys["ess"], noisy.ess.to(noisy.xt.dtype))
    setattr(data, keys["x0"], noisy.x0)
    return data


class _NoiseBase(BaseTransform):
    def __init__(
        self,
        schedule: Optional[NoiseSchedule] = None,
        orbit: Optional[Orbit] = None,
        mode: str = "orbit",
        parameterization: str = "eps",
        kernel: Any = None,
        pos_key: str = "pos",
        center: Optional[bool] = None,
        keys: Optional[dict[str, str]] = None,
        generator: Optional[torch.Generator] = None,
        loss: Optional[OrbitDiffusionLoss] = None,
    ):
        if loss is None:
            if schedule is None:
                raise ValueError("give a `schedule` (and orbit, mode, ...) or a ready `loss`")
            loss = OrbitDiffusionLoss(schedule, orbit, mode, parameterization, kernel, pos_key, center)
        self.loss = loss
        self.keys = {**_DEFAULT_KEYS, **(keys or {})}
        if self.keys["xt"] == loss.pos_key:
            raise ValueError("the noisy positions must not overwrite the clean ones: choose another `xt` key")
        self.generator = generator

    def _generator(self) -> Optional[torch.Generator]:
        """``self.generator``, except inside a ``DataLoader`` worker: there a copy of the generator
        would repeat the same stream in every worker and every epoch, so each worker draws from its
        own generator seeded with ``initial_seed ^ worker seed`` (the worker seed derives from the main
        process's RNG per epoch, so runs stay reproducible under ``torch.manual_seed``)."""
        info = get_worker_info()
        if self.generator is None or info is None:
            return self.generator
        key = (info.id, info.seed)
        if getattr(self, "_worker_key", None) != key:
            gen = torch.Generator(device=self.generator.device)
            gen.manual_seed((self.generator.initial_seed() ^ info.seed) % 2**64)
            self._worker_key, self._worker_generator = key, gen
        return self._worker_generator

    def forward(self, data: Any) -> Any:
        return write_noisy(data, self.loss.corrupt(data, self._generator()), self.keys)

    def __repr__(self) -> str:
        l = self.loss
        return (f"{self.__class__.__name__}(schedule={l.schedule!r}, orbit={l.orbit!r}, mode={l.mode!r}, "
                f"parameterization={l.parameterization!r}, kernel={l.kernel!r}, pos_key={l.pos_key!r})")


@functional_transform("orbit_noise")
class OrbitNoise(_NoiseBase):
    r"""Per-sample transform: draw ``t`` and noise, write the noisy positions, ``t``, the regression
    target and its ESS into the ``Data`` (functional name: ``orbit_noise``).

    The target is that of :class:`~orbit_pyg.OrbitDiffusionLoss` with the same arguments
    (``plain`` / ``augment`` / ``orbit`` × ``eps`` / ``x0`` / ``score`` / ``velocity``): in ``orbit``
    mode, ``target = E[target(g ∘ x0) | x_t]`` over the orbit. An unchanged training loop then
    computes ``mse(model(batch.xt, batch.t, batch), batch.target)``.

    Written keys (configurable with ``keys=``): ``xt`` ``[n, 3]``, ``t`` ``[1]``, ``target`` ``[n, 3]``,
    ``ess`` ``[1]`` and ``x0`` ``[n, 3]`` (the centred / augmented clean positions ``x_t`` was made
    from). Per-graph ``t`` and ``ess`` concatenate to ``[B]`` in a batch.

    Runs inside ``DataLoader`` workers; each worker draws from its own seeded global RNG, or, when a
    ``generator`` is given, from a per-worker generator seeded from it and the worker's seed (so
    workers and epochs never repeat each other's noise). For whole batches on the training device
    use :class:`BatchedOrbitNoise`.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from orbit_pyg import SO3, VPSchedule
        >>> d = OrbitNoise(VPSchedule(), SO3(100))(Data(pos=torch.randn(5, 3)))
        >>> d.xt.shape, d.t.shape, d.target.shape
        (torch.Size([5, 3]), torch.Size([1]), torch.Size([5, 3]))
    """


class BatchedOrbitNoise(_NoiseBase):
    r"""The batched twin of :class:`OrbitNoise`: the same keys and targets computed on a whole
    ``Batch`` at once, on whatever device the batch lives (GPU when there is one), vectorized over
    graphs. Call it on each batch in the training loop: ``batch = noise(batch.to(device))``.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Batch, Data
        >>> from orbit_pyg import SO3, VPSchedule
        >>> b = Batch.from_data_list([Data(pos=torch.randn(5, 3)), Data(pos=torch.randn(3, 3))])
        >>> BatchedOrbitNoise(VPSchedule(), SO3(100))(b).t.shape
        torch.Size([2])
    """
