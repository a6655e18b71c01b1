r"""Reference conformer denoisers: ``model(x_t, t, data) -> [N, 3]`` (the core loss's signature).

* :class:`MoleculeTransformer` reads raw Cartesian coordinates: **not** rotation-equivariant, the
  data-augmentation setting where Orbit Diffusion matters most. Attention within each molecule,
  with a learned per-head bias for the bond type between two atoms (none / single / double /
  triple / aromatic), so the network sees the molecular graph.
* :class:`EGNNDenoiser`: E(n)-equivariant graph network (Satorras et al. 2021) on the complete
  graph of each molecule, edge features = bond type and squared distance; its output
  ``sum_j (x_i - x_j) φ(m_ij)`` rotates with the input and ignores translations.

Both are vectorized over the batch (dense per-graph padding, or edge lists built with tensor ops).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter, to_dense_adj, to_dense_batch

from orbit_pyg.nn import time_embedding

__all__ = ["MoleculeTransformer", "EGNNDenoiser", "complete_graph", "build_model", "MODEL_KINDS"]

#: bond-type codes are shifted by one so that 0 means "no bond"
NUM_PAIR_TYPES = 5


def _batch_of(data: Any, n: int, device) -> Tensor:
    batch = getattr(data, "batch", None)
    return torch.zeros(n, dtype=torch.long, device=device) if batch is None else batch


def _pair_types(data: Any, batch: Tensor, max_nodes: int) -> Tensor:
    """Dense ``[B, M, M]`` pair codes: 0 = no bond, ``1 + edge_attr`` for bonded pairs."""
    ei = data.edge_index
    attr = data.edge_attr.long() + 1 if ei.numel() else None
    dense = to_dense_adj(ei, batch, edge_attr=attr, max_num_nodes=max_nodes, batch_size=int(batch.max()) + 1)
    return dense.long()


class MoleculeTransformer(nn.Module):
    r"""Transformer denoiser over raw coordinates, atom types and bonds (not equivariant).

    Atom ``i`` enters as ``W_x x_t,i + E_z[z_i] + MLP(emb(t))``; each of ``num_layers`` pre-norm
    encoder layers attends within the molecule with logits ``q_i·k_j / sqrt(d) + b_h[type(i, j)]``
    (``type`` = bond type or "none", ``b`` learned per head and layer); a linear head gives 3 numbers.

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> from torch_geometric.data import Batch
        >>> b = Batch.from_data_list([smiles_to_data("CO"), smiles_to_data("O")])
        >>> MoleculeTransformer(hidden=16, num_layers=1, heads=2)(torch.randn(9, 3), torch.rand(2), b).shape
        torch.Size([9, 3])
    """

    def __init__(self, hidden: int = 64, num_layers: int = 3, heads: int = 4, num_species: int = 100):
        super().__init__()
        self.hidden, self.num_layers, self.heads = hidden, num_layers, heads
        self.coord_in = nn.Linear(3, hidden)
        self.species = nn.Embedding(num_species, hidden)
        self.time_in = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.pair_bias = nn.Parameter(torch.zeros(num_layers, NUM_PAIR_TYPES, heads))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 3))

    def forward(self, xt: Tensor, t: Tensor, data: Any) -> Tensor:
        batch = _batch_of(data, xt.size(0), xt.device)
        h = self.coord_in(xt.to(self.coord_in.weight.dtype)) + self.species(data.z.long())
        h = h + self.time_in(time_embedding(t, self.hidden).to(h.dtype))[batch]
        dense, mask = to_dense_batch(h, batch)
        b, m = mask.shape
        pairs = _pair_types(data, batch, m)  # [B, M, M]
        pad = torch.zeros(b, 1, 1, m, device=xt.device).masked_fill(~mask.view(b, 1, 1, m), -1e9)  # finite: the eval fast path NaNs on -inf rows
        # PyTorch's inference fast path mishandles a per-head float mask (NaN outputs): use the
        # regular path in eval mode too, and restore the global flag afterwards.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for layer, bias in zip(self.layers, self.pair_bias):
                attn = bias[pairs].permute(0, 3, 1, 2) + pad  # [B, H, M, M]
                dense = layer(dense, src_mask=attn.reshape(b * self.heads, m, m))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return self.head(dense[mask]).to(xt.dtype)

    def __repr__(self) -> str:
        return f"MoleculeTransformer(hidden={self.hidden}, num_layers={self.num_layers}, heads={self.heads})"


def complete_graph(batch: Tensor) -> Tensor:
    """Directed edges ``[2, E]`` between every ordered pair of distinct nodes of the same graph.

    Example:
        >>> complete_graph(torch.tensor([0, 0, 1])).tolist()
        [[0, 1], [1, 0]]
    """
    ids, mask = to_dense_batch(torch.arange(batch.numel(), device=batch.device), batch, fill_value=-1)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    pair &= ~torch.eye(mask.size(1), dtype=torch.bool, device=batch.device).unsqueeze(0)
    g, i, j = pair.nonzero(as_tuple=True)
    return torch.stack([ids[g, i], ids[g, j]])


class _EGNNLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.edge = nn.Sequential(nn.Linear(2 * hidden + 1 + NUM_PAIR_TYPES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h, x, src, dst, pair_onehot):
        diff = x[dst] - x[src]  # x_i - x_j with i = dst
        d2 = (diff**2).sum(-1, keepdim=True)
        m = self.edge(torch.cat([h[dst], h[src], d2, pair_onehot], -1))
        agg = scatter(m, dst, 0, dim_size=h.size(0), reduce="sum")
        h = self.norm(h + self.node(torch.cat([h, agg], -1)))
        shift = scatter(diff / (d2.sqrt() + 1.0) * self.coord(m), dst, 0, dim_size=h.size(0), reduce="sum")
        return h, shift


class EGNNDenoiser(nn.Module):
    r"""E(3)-equivariant denoiser: EGNN on the complete graph of each molecule.

    ``m_ij = φ_e(h_i, h_j, |x_i - x_j|², onehot(type(i, j)))``, ``h_i ← LN(h_i + φ_h(h_i, Σ_j m_ij))``,
    output ``Σ_layers Σ_j (x_i - x_j) / (|x_i - x_j| + 1) · φ_x(m_ij)`` (equivariant, translation-free).

    Example:
        >>> from orbit_pyg.integrations.molecule.convert import smiles_to_data
        >>> d = smiles_to_data("CO")
        >>> net = EGNNDenoiser(hidden=16, num_layers=2)
        >>> from orbit_pyg.orbits.rotation import random_rotations
        >>> r = random_rotations((), dtype=torch.float32); x = torch.randn(6, 3); t = torch.rand(1)
        >>> bool(torch.allclose(net(x @ r.T, t, d), net(x, t, d) @ r.T, atol=1e-4))
        True
    """

    def __init__(self, hidden: int = 64, num_layers: int = 4, num_species: int = 100):
        super().__init__()
        self.hidden, self.num_layers = hidden, num_layers
        self.species = nn.Embedding(num_species, hidden)
        self.time_in = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(_EGNNLayer(hidden) for _ in range(num_layers))

    def forward(self, xt: Tensor, t: Tensor, data: Any) -> Tensor:
        batch = _batch_of(data, xt.size(0), xt.device)
        x = xt.to(self.species.weight.dtype)
        h = self.species(data.z.long())
        h = h + self.time_in(time_embedding(t, self.hidden).to(h.dtype))[batch]
        src, dst = complete_graph(batch)
        _, mask = to_dense_batch(x, batch)
        dense_types = _pair_types(data, batch, mask.size(1))
        local = torch.arange(x.size(0), device=x.device) - _ptr(batch)[batch]
        types = dense_types[batch[src], local[dst], local[src]]
        onehot = nn.functional.one_hot(types, NUM_PAIR_TYPES).to(x.dtype)
        out = torch.zeros_like(x)
        for layer in self.layers:
            h, shift = layer(h, x, src, dst, onehot)
            out = out + shift
        return out.to(xt.dtype)

    def __repr__(self) -> str:
        return f"EGNNDenoiser(hidden={self.hidden}, num_layers={self.num_layers})"


def _ptr(batch: Tensor) -> Tensor:
    counts = torch.bincount(batch)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])


MODEL_KINDS = ("transformer", "egnn")


def build_model(kind: str = "transformer", hidden: int = 64, layers: int = 3, heads: int = 4) -> nn.Module:
    """A denoiser by name: ``"transformer"`` (:class:`MoleculeTransformer`) or ``"egnn"`` (:class:`EGNNDenoiser`).

    Example:
        >>> build_model("egnn", hidden=8, layers=1)
        EGNNDenoiser(hidden=8, num_layers=1)
    """
    if kind == "transformer":
        return MoleculeTransformer(hidden=hidden, num_layers=layers, heads=heads)
    if kind == "egnn":
        return EGNNDenoiser(hidden=hidden, num_layers=layers)
    raise ValueError(f"unknown model kind {kind!r}: use one of {MODEL_KINDS}")
