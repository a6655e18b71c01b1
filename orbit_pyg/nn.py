r"""Small reference denoisers (pure torch + PyG) used by the demo, tests and benchmarks.

:class:`PositionTransformer` reads raw Cartesian coordinates, so it is *not* rotation-equivariant:
the setting where data augmentation is needed and Orbit Diffusion helps most. Any model with the
signature ``model(x_t, t, data) -> [N, 3]`` works with :class:`~orbit_pyg.OrbitDiffusionLoss`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch_geometric.utils import to_dense_batch


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t [B]`` in ``[0, 1]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    angles = 1000.0 * t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class PositionTransformer(nn.Module):
    r"""Transformer over the atoms of each graph that predicts one 3-vector per atom.

    Input per atom: ``[x_t (3), embedding(z), embedding(t)]``; ``num_layers`` pre-norm encoder layers
    with attention restricted to the atom's own graph (dense per-graph padding via
    :func:`torch_geometric.utils.to_dense_batch`); a linear head to 3 outputs.

    Args:
        hidden: width; num_layers: encoder layers; heads: attention heads;
        num_species: size of the species embedding table (atomic numbers below it);
        species_key: node attribute with species (``None``: no species input).

    Example:
        >>> from torch_geometric.data import Batch, Data
        >>> net = PositionTransformer(hidden=32, num_layers=1)
        >>> b = Batch.from_data_list([Data(pos=torch.randn(4, 3), z=torch.tensor([6, 1, 1, 1]))])
        >>> net(b.pos, torch.zeros(1), b).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        hidden: int = 64,
        num_layers: int = 2,
        heads: int = 4,
        num_species: int = 100,
        species_key: Optional[str] = "z",
    ):
        super().__init__()
        self.hidden, self.num_layers, self.heads = hidden, num_layers, heads
        self.species_key = species_key
        self.coord_in = nn.Linear(3, hidden)
        self.species = nn.Embedding(num_species, hidden) if species_key else None
        self.time_in = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 3))

    def forward(self, xt: Tensor, t: Tensor, data: Any) -> Tensor:
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(xt.size(0), dtype=torch.long, device=xt.device)
        h = self.coord_in(xt.float())
        if self.species is not None:
            z = getattr(data, self.species_key)
            h = h + self.species(z.long())
        h = h + self.time_in(time_embedding(t, self.hidden))[batch]
        dense, mask = to_dense_batch(h, batch)
        out = self.encoder(dense, src_key_padding_mask=~mask)
        return self.head(out[mask]).to(xt.dtype)

    def __repr__(self) -> str:
        return f"PositionTransformer(hidden={self.hidden}, num_layers={self.num_layers}, heads={self.heads})"
