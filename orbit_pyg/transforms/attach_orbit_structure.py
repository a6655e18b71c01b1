"""Precompute per-graph orbit structure (automorphism table, species group order) on a ``Data``."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch_geometric.data import Data
from torch_geometric.data.datapipes import functional_transform
from torch_geometric.transforms import BaseTransform


@functional_transform("orbit_structure")
class AttachOrbitStructure(BaseTransform):
    r"""Attach the orbit structure of one graph so that it batches correctly (functional name:
    ``orbit_structure``).

    Writes:

    * ``orbit_perm`` ``[n, A]`` (long): column ``a`` lists, for each node, the local index of the
      node it takes its position from under the ``a``-th permutation; column 0 is the identity,
      ``-1`` pads graphs with fewer than ``A = max_permutations`` elements. Local indices need no
      offset when PyG batches (the key has no ``index`` in it, so PyG does not shift it);
      :class:`~orbit_pyg.orbits.ExplicitPermutations` turns them into batch indices with ``ptr``.
      Repeated permutations are listed once. Groups larger than ``A`` keep the identity and the
      first ``A - 1`` others (a warning-free truncation: pass a larger ``A`` or sample upstream if
      that matters).
    * ``orbit_log_order`` ``[1]`` (float): ``log |G|`` of the species-permutation group
      ``prod_c n_c!``, useful to decide between enumeration and sampling.

    Args:
        permutations: a callable ``data -> sequence of permutations`` (each a sequence of ``n``
            local indices), or the name of a ``Data`` attribute holding such a sequence or an
            ``[A', n]`` tensor; ``None`` attaches the identity only.
        max_permutations: ``A``.
        species_key: node attribute with species for ``orbit_log_order`` (skipped when absent).

    Example:
        >>> import torch
        >>> from torch_geometric.data import Data
        >>> t = AttachOrbitStructure(lambda d: [[0, 1, 2], [0, 2, 1]], max_permutations=3)
        >>> t(Data(z=torch.tensor([8, 1, 1]), pos=torch.zeros(3, 3))).orbit_perm.tolist()
        [[0, 0, -1], [1, 2, -1], [2, 1, -1]]
    """

    def __init__(
        self,
        permutations: Optional[Callable[[Data], Sequence[Sequence[int]]] | str] = None,
        max_permutations: int = 50,
        species_key: str = "z",
    ):
        if int(max_permutations) < 1:
            raise ValueError(f"`max_permutations` must be >= 1, got {max_permutations}")
        self.permutations, self.max_permutations, self.species_key = permutations, int(max_permutations), species_key

    def _perms(self, data: Data, n: int) -> torch.Tensor:
        source = self.permutations
        if source is None:
            perms = torch.arange(n).view(1, n)
        else:
            raw = source(data) if callable(source) else getattr(data, source)
            try:
                perms = torch.as_tensor(raw, dtype=torch.long) if len(raw) else torch.arange(n).view(1, n)
            except (TypeError, ValueError) as err:
                raise ValueError(f"permutations must be a list of equal-length index lists or an [A, {n}] tensor: {err}") from None
            if perms.dim() == 1:  # a single permutation
                perms = perms.view(1, -1)
            if perms.dim() != 2 or perms.size(1) != n:
                raise ValueError(f"permutations must have shape [A, {n}] (one entry per node), got {list(perms.shape)}")
        ident = torch.arange(n)
        if bool(((perms < 0) | (perms >= n)).any()) or bool((perms.sort(1).values != ident).any()):
            raise ValueError("each permutation must be a rearrangement of range(num_nodes)")
        others = perms[(perms != ident).any(1)]
        if others.size(0) > 1:  # list each element once (ExplicitPermutations weighs every column)
            _, inverse = torch.unique(others, dim=0, return_inverse=True)
            first = torch.full((int(inverse.max()) + 1,), others.size(0)).scatter_reduce(
                0, inverse, torch.arange(others.size(0)), "amin"
            )
            others = others[first.sort().values]
        return torch.cat([ident.view(1, n), others])[: self.max_permutations]

    def forward(self, data: Data) -> Data:
        n = data.num_nodes
        if n is None or n < 1:
            raise ValueError("AttachOrbitStructure: the data has no nodes")
        perms = self._perms(data, n)
        table = torch.full((n, self.max_permutations), -1, dtype=torch.long)
        table[:, : perms.size(0)] = perms.t()
        data.orbit_perm = table
        z = getattr(data, self.species_key, None)
        if z is not None:
            if z.numel() != n:
                raise ValueError(f"`{self.species_key}` has {z.numel()} entries but the graph has {n} nodes")
            counts = torch.unique(z, return_counts=True)[1]
            data.orbit_log_order = torch.tensor([sum(math.lgamma(int(c) + 1) for c in counts)])
        return data

    def __repr__(self) -> str:
        src = self.permutations if isinstance(self.permutations, str) or self.permutations is None else "<callable>"
        return f"{self.__class__.__name__}(permutations={src!r}, max_permutations={self.max_permutations})"
