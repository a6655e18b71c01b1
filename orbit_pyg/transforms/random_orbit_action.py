"""Apply one uniformly random element of an orbit: the data-augmentation baseline done right."""
from __future__ import annotations

from typing import Optional

import torch
from torch_geometric.data import Data
from torch_geometric.data.datapipes import functional_transform
from torch_geometric.transforms import BaseTransform
from torch_geometric.utils import scatter

from .._utils import check_positions
from ..losses import graph_batch
from ..orbits.base import Orbit, OrbitContext, apply_element


@functional_transform("orbit_random_action")
class RandomOrbitAction(BaseTransform):
    r"""Move positions by one element ``g`` drawn uniformly from ``orbit`` (Haar measure for SO(3) /
    O(3), uniform for finite groups), independently per graph (functional name:
    ``orbit_random_action``).

    For orbits that act about the origin (rotations), the action is taken about each graph's
    centroid: ``x_i <- c + g (x_i - c)``, so positions are not shifted. Unlike composing PyG's
    ``RandomRotate`` about three axes, ``RandomOrbitAction(SO3())`` is exactly Haar-uniform.

    Args:
        orbit: the orbit to sample from (``SO3()``, ``SpeciesPermutation()``, products, ...).
        pos_key: positions to move.
        generator: optional ``torch.Generator``.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> from orbit_pyg.orbits import SO3
        >>> d = Data(pos=torch.randn(4, 3))
        >>> out = RandomOrbitAction(SO3())(d)
        >>> bool(torch.allclose(torch.cdist(out.pos, out.pos), torch.cdist(d.pos, d.pos), atol=1e-5))
        True
    """

    def __init__(self, orbit: Orbit, pos_key: str = "pos", generator: Optional[torch.Generator] = None):
        if not isinstance(orbit, Orbit):
            raise TypeError(f"`orbit` must be an orbit_pyg Orbit, got {type(orbit).__name__}")
        self.orbit, self.pos_key, self.generator = orbit, pos_key, generator

    def forward(self, data: Data) -> Data:
        pos = getattr(data, self.pos_key, None)
        if pos is None:
            raise KeyError(f"RandomOrbitAction: the data has no `{self.pos_key}`")
        check_positions(pos, self.pos_key)
        batch, b = graph_batch(data, pos)
        centroid = scatter(pos, batch, dim=0, dim_size=b, reduce="mean")[batch] if self.orbit.needs_centering else 0.0
        x = pos - centroid
        ctx = OrbitContext(x0=x, xt=None, batch=batch, num_graphs=b, data=data)
        element = self.orbit.random_element(ctx, self.generator)
        setattr(data, self.pos_key, apply_element(element, x, batch) + centroid)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(orbit={self.orbit!r}, pos_key={self.pos_key!r})"
