"""Centre positions per graph (projection onto the zero centre-of-mass subspace)."""
from __future__ import annotations

from torch_geometric.data import Data
from torch_geometric.data.datapipes import functional_transform
from torch_geometric.transforms import BaseTransform

from .._utils import center, check_positions
from ..losses import graph_batch


@functional_transform("orbit_center")
class CenterPositions(BaseTransform):
    r"""Subtract each graph's mean position: ``x_i <- x_i - (1/n) sum_j x_j``
    (functional name: ``orbit_center``).

    Works on a single ``Data`` and on a ``Batch`` (per graph, via ``batch``). Unweighted mean: the
    zero-mean subspace is the one the orbit estimator's kernels live on.

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> CenterPositions()(Data(pos=torch.tensor([[0., 0., 0.], [2., 0., 0.]]))).pos[:, 0].tolist()
        [-1.0, 1.0]
    """

    def __init__(self, pos_key: str = "pos"):
        self.pos_key = pos_key

    def forward(self, data: Data) -> Data:
        pos = getattr(data, self.pos_key, None)
        if pos is None:
            raise KeyError(f"CenterPositions: the data has no `{self.pos_key}`")
        check_positions(pos, self.pos_key)
        batch, b = graph_batch(data, pos)
        setattr(data, self.pos_key, center(pos, batch, b))
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(pos_key={self.pos_key!r})"
