"""Shared helpers: input checks and per-graph reductions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.utils import scatter


def check_positions(x: Tensor, name: str = "pos") -> None:
    """Raise a clear error unless ``x`` is a finite floating ``[N, 3]`` tensor with ``N >= 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [N, 3], got {type(x).__name__}")
    if x.dim() != 2 or x.size(-1) != 3:
        raise ValueError(f"`{name}` must have shape [N, 3], got {list(x.shape)}")
    if x.size(0) == 0:
        raise ValueError(f"`{name}` is empty: the batch has no nodes")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor (float32 or float64), got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` contains NaN or Inf values")


def check_batch(batch: Optional[Tensor], num_nodes: int, device: torch.device) -> tuple[Tensor, int]:
    """Return ``(batch, num_graphs)``; ``None`` means one graph. Validates shape and ordering."""
    if batch is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=device), 1
    if batch.dim() != 1 or batch.numel() != num_nodes:
        raise ValueError(f"`batch` must have shape [{num_nodes}], got {list(batch.shape)}")
    if batch.dtype != torch.long:
        raise TypeError(f"`batch` must be a long tensor, got {batch.dtype}")
    if num_nodes > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("`batch` must be sorted (nodes of a graph contiguous), as PyG batches are")
    return batch, int(batch.max()) + 1


def per_graph(value: Tensor | float, num_graphs: int, like: Tensor, name: str) -> Tensor:
    """Broadcast a scalar or ``[B]`` tensor to a float64 ``[B]`` tensor on ``like``'s device."""
    v = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if v.dim() == 0:
        v = v.expand(num_graphs)
    v = v.reshape(-1)
    if v.numel() != num_graphs:
        raise ValueError(f"`{name}` must be a scalar or have shape [{num_graphs}], got {list(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"`{name}` contains NaN or Inf values")
    return v


def center(x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Subtract each graph's mean position (projection onto the zero centre-of-mass subspace)."""
    mean = scatter(x, batch, dim=0, dim_size=num_graphs, reduce="mean")
    return x - mean[batch]


def sum_per_graph(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Sum ``values`` (nodes on dim ``-1``) per graph: ``[..., N] -> [..., B]``."""
    out = values.new_zeros(values.shape[:-1] + (num_graphs,))
    return out.index_add_(values.dim() - 1, batch, values)


def nodes_per_graph(batch: Tensor, num_graphs: int) -> Tensor:
    """Number of nodes of each graph, ``[B]`` long."""
    return torch.bincount(batch, minlength=num_graphs)
