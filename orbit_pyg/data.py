"""Small dataset helpers."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch_geometric.data import Data, Dataset


class ListDataset(Dataset):
    """A PyG ``Dataset`` over an in-memory list of ``Data``; ``transform`` runs per item on access
    (on a copy, as PyG datasets do), so a per-sample :class:`~orbit_pyg.transforms.OrbitNoise`
    draws fresh noise every epoch and inside ``DataLoader`` workers.

    Example:
        >>> import torch
        >>> ds = ListDataset([Data(pos=torch.zeros(2, 3))] * 3)
        >>> len(ds), ds[0].pos.shape
        (3, torch.Size([2, 3]))
    """

    def __init__(self, items: Sequence[Data], transform: Optional[Callable[[Data], Data]] = None):
        super().__init__(None, transform)
        self.items = list(items)

    def len(self) -> int:
        return len(self.items)

    def get(self, idx: int) -> Data:
        return self.items[idx]
