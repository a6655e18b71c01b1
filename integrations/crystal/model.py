r"""CSPNet: the periodic crystal denoiser of DiffCSP (Jiao et al., NeurIPS 2023), in pure torch + PyG.

A crystal is ``(A, F, L)``: atomic numbers ``z [N]``, fractional coordinates ``F [N, 3]`` in
``[0, 1)`` and a lattice ``L [3, 3]`` whose **rows** are the lattice vectors (Cartesian positions
``X = F L``). The network predicts one 3-vector per atom (the fractional-coordinate score or
velocity) and one ``3 x 3`` matrix per crystal (the lattice noise), as DiffCSP's CSPNet does.

Architecture (``l = 1..num_layers``; all activations SiLU)::

    h_i^0  = W_in [ embed(z_i) , temb(t_b) ]                                  (atom + time)
    m_ij   = phi_e( [ LN(h_i), LN(h_j), flat(G_b), fourier(f_j - f_i) ] )     (edge MLP)
    h_i^l  = h_i^{l-1} + phi_n( [ LN(h_i), mean_{j in N(i)} m_ij ] )          (node MLP, residual)
    coord_out_i   = W_x LN(h_i^L)                       (no bias)             [N, 3]
    lattice_out_b = reshape_{3x3}( W_L mean_{i in b} LN(h_i^L) ) @ L_b        [B, 3, 3]

with ``fourier(d) = [sin(2 pi k d_c), cos(2 pi k d_c)]`` for ``k = 1..n_freq`` and each coordinate
``c``, and ``N(i)`` all atoms ``j`` of the same crystal (the fully connected graph; ``j = i``
included when ``self_loops=True``, as in DiffCSP, whose block-diagonal all-ones adjacency keeps the
diagonal). ``LN`` is a pre-norm LayerNorm (DiffCSP's ``ln=True``) and a final LayerNorm precedes the
heads.

Lattice input ``G_b`` (option ``lattice_input``):

* ``"gram"`` (default, DiffCSP ``ip=True``): ``G = L L^T``, the Gram matrix. Under a rotation or
  reflection of the lattice ``L -> L R^T`` (``R`` in O(3)), ``G`` is unchanged, so ``coord_out`` is
  **invariant** and ``lattice_out = M L`` is **equivariant**: ``lattice_out -> lattice_out R^T``.
  Only differences ``f_j - f_i`` enter, through 1-periodic features, so both outputs are invariant
  to a periodic translation ``F -> (F + s) mod 1``, and ``coord_out`` is equivariant to permuting
  atoms. The model is **not** invariant to relabelling the basis vectors (``L -> P L``,
  ``F -> F P^T`` with ``P`` a permutation, the same crystal): it reads the Gram entries and the
  Fourier columns in a fixed order (EquiCSP's observation). That is the non-invariance the
  lattice-permutation orbit of :mod:`orbit_pyg.integrations.crystal` Rao-Blackwellizes.
* ``"fixed_basis"`` (DiffCSP ``ip=False``): ``G = L`` itself, the 9 raw Cartesian entries of the
  lattice vectors in their stored order, and ``lattice_out = M`` (predicted directly, not multiplied
  onto ``L``). Neither rotation-invariant nor basis-relabelling-invariant: the fully
  non-invariant network of the orbit-diffusion setting where augmentation or Rao-Blackwellization
  has to supply the symmetry.

Condition (``cond_dim > 0``; off by default, and then the module, its parameters and its outputs
are exactly the unconditioned network above). A per-crystal vector ``c_b [B, cond_dim]`` (a text
embedding, normalized properties, or both concatenated) enters **every** layer by FiLM on the
pre-normalized features (adaptive LayerNorm, as DiT's adaLN-Zero)::

    e_b = phi_c(c_b)                      [gamma_b^l, beta_b^l]_l = W_f e_b   (l = 1..L, and the final norm)
    LN(h_i) -> LN(h_i) * (1 + gamma_{b(i)}^l) + beta_{b(i)}^l

Why FiLM rather than concatenation: the condition is per crystal, so FiLM costs ``O(B · hidden)`` per
layer (gathered onto atoms), whereas concatenating it into the edge input costs ``O(E · cond_dim)``
for a ``sum_b n_b^2``-edge graph; and with ``W_f`` zero-initialized the conditional network starts as
exactly the unconditioned one, so conditioning is learned as a correction. ``gamma, beta`` are
scalars per channel, so the symmetry properties listed above are unchanged (the condition is a
per-crystal invariant). Classifier-free guidance needs a "no condition" input: a learned null
vector ``c_null`` (initialized at 0) replaces ``c_b`` where ``cond_drop[b]`` is true, and everywhere
when ``cond=None`` -- the unconditioned prediction is the same code path fed the null condition.

Cost: the fully connected graph has ``sum_b n_b^2`` edges (memory ``O(sum_b n_b^2)``), built
vectorized from the per-graph counts (:func:`fully_connected_edges`). The first edge linear layer
acts on the concatenation above but is evaluated by splitting its weight, so the node and lattice
parts are projected once per node / per graph and gathered, never concatenated per edge; this is
mathematically the same layer.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from orbit_pyg.nn import time_embedding

__all__ = ["CSPNet", "fully_connected_edges", "fourier_features"]

LATTICE_INPUTS = ("gram", "fixed_basis")


def fully_connected_edges(ptr: Tensor, self_loops: bool = True) -> tuple[Tensor, Tensor]:
    r"""All ordered atom pairs ``(i, j)`` of the same graph, vectorized (no loop over graphs).

    For graph ``b`` with ``n_b = ptr[b+1] - ptr[b]`` atoms, edges are enumerated row-major:
    edge ``e`` of the graph's ``n_b^2`` block has ``i = ptr[b] + e // n_b`` and
    ``j = ptr[b] + e % n_b`` (the order of ``dense_to_sparse(block_diag(ones(n_b, n_b)))``, as in
    DiffCSP). With ``self_loops=False`` the ``n_b`` pairs ``i = j`` are dropped.

    Args:
        ptr: ``[B + 1]`` long, the PyG ``ptr`` (cumulative atom counts starting at 0).
        self_loops: keep the pairs ``(i, i)``.

    Returns:
        ``(edge_index [2, E], edge_graph [E])`` with ``edge_index[0] = i`` (the receiving atom, the
        one messages are averaged onto), ``edge_index[1] = j``, and ``E = sum_b n_b^2`` (or
        ``sum_b n_b (n_b - 1)``).

    Example:
        >>> fully_connected_edges(torch.tensor([0, 1, 3]))[0]
        tensor([[0, 1, 1, 2, 2],
                [0, 1, 2, 1, 2]])
    """
    if ptr.dim() != 1 or ptr.numel() < 1:
        raise ValueError(f"`ptr` must have shape [B + 1], got {list(ptr.shape)}")
    ptr = ptr.long()
    counts = ptr[1:] - ptr[:-1]
    if bool((counts < 0).any()):
        raise ValueError("`ptr` must be non-decreasing")
    per_graph = counts * counts
    num_edges = int(per_graph.sum())
    device = ptr.device
    graph = torch.repeat_interleave(
        torch.arange(counts.numel(), device=device), per_graph, output_size=num_edges
    )
    start = torch.cumsum(per_graph, 0) - per_graph
    local = torch.arange(num_edges, device=device) - start[graph]
    n = counts[graph]  # >= 1 wherever an edge exists
    i = ptr[:-1][graph] + torch.div(local, n, rounding_mode="floor")
    j = ptr[:-1][graph] + torch.remainder(local, n)
    if not self_loops:
        keep = i != j
        i, j, graph = i[keep], j[keep], graph[keep]
    return torch.stack([i, j]), graph


def fourier_features(d: Tensor, n_freq: int) -> Tensor:
    r"""Periodic features ``[sin(2 pi k d), cos(2 pi k d)]``, ``k = 1..n_freq``, of ``d [E, 3]``.

    ``d`` is first reduced mod 1, so a shift of ``d`` by an integer vector gives the same features
    (up to float rounding). Output ``[E, 6 n_freq]``: all sines (coordinate-major, then frequency),
    then all cosines, as DiffCSP's ``SinusoidsEmbedding``.

    Example:
        >>> fourier_features(torch.zeros(2, 3), 4).shape
        torch.Size([2, 24])
    """
    k = torch.arange(1, n_freq + 1, device=d.device, dtype=d.dtype)
    angles = (2.0 * math.pi) * torch.remainder(d, 1.0).unsqueeze(-1) * k  # [E, 3, n_freq]
    angles = angles.reshape(d.size(0), 3 * n_freq)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class _CSPLayer(nn.Module):
    """One message-passing layer of :class:`CSPNet` (pre-norm, residual)."""

    def __init__(self, hidden: int, fourier_dim: int, layer_norm: bool):
        super().__init__()
        self.hidden = hidden
        # Acts on [h_i, h_j, G (9), fourier]; applied by weight slices (see CSPNet docstring).
        self.edge_in = nn.Linear(2 * hidden + 9 + fourier_dim, hidden)
        self.edge_out = nn.Linear(hidden, hidden)
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()

    def forward(self, h: Tensor, lat: Tensor, four: Tensor, edge_index: Tensor, edge_graph: Tensor,
                film: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        x = self.norm(h)
        if film is not None:  # per-atom (gamma, beta) of the crystal's condition
            x = x * (1 + film[0]) + film[1]
        hd = self.hidden
        w, b = self.edge_in.weight, self.edge_in.bias
        src, dst = edge_index[0], edge_index[1]
        pre = (
            F.linear(x, w[:, :hd])[src]
            + F.linear(x, w[:, hd : 2 * hd])[dst]
            + F.linear(lat, w[:, 2 * hd : 2 * hd + 9], b)[edge_graph]
            + F.linear(four, w[:, 2 * hd + 9 :])
        )
        m = F.silu(self.edge_out(F.silu(pre)))
        agg = scatter(m, src, dim=0, dim_size=h.size(0), reduce="mean")
        return h + self.node_mlp(torch.cat([x, agg], dim=-1))


class CSPNet(nn.Module):
    r"""DiffCSP's periodic E(3)-aware crystal denoiser (see the module docstring for the math).

    ``forward(z, frac_t, cell_t, t, batch)`` returns ``(lattice_out [B, 3, 3], coord_out [N, 3])``.
    With ``lattice_input="gram"``: ``coord_out`` is invariant and ``lattice_out`` is O(3)-equivariant
    (``L -> L R^T`` gives ``lattice_out -> lattice_out R^T``); both are invariant to periodic
    translations of ``F``; ``coord_out`` is permutation-equivariant over atoms; neither is invariant
    to relabelling the basis vectors (EquiCSP). ``lattice_input="fixed_basis"`` reads the raw
    lattice entries and is not rotation-invariant.

    Args:
        hidden: node / edge width (DiffCSP: 512; 256 reported for Perov-5).
        num_layers: message-passing layers (DiffCSP: 6; 4 for Perov-5).
        n_freq: Fourier frequencies ``k = 1..n_freq`` per coordinate (DiffCSP's ``num_freqs``
            default is 128; small values such as 8-32 are fine for small models).
        time_dim: width of the sinusoidal time embedding (DiffCSP's ``latent_dim``: 256).
        num_species: size of the species table, indexed by atomic number ``z`` directly
            (``0 <= z < num_species``; ``0`` may serve as a mask / unknown token).
        lattice_input: ``"gram"`` (read ``L L^T``, output ``M L``) or ``"fixed_basis"`` (read the
            raw ``L``, output ``M``).
        self_loops: include ``(i, i)`` edges (DiffCSP does; they also give a 1-atom crystal a
            message).
        layer_norm: pre-norm LayerNorm in each layer and before the heads (DiffCSP ``ln=True``).
        cond_dim: width of the per-crystal condition vector (keyword only; ``0``, the default, builds
            the unconditioned network with no extra parameters). See the module docstring (FiLM,
            null condition for classifier-free guidance).

    Dtypes and devices: computation runs in the parameters' dtype on their device (float32 unless
    the module is converted, e.g. ``.double()``); inputs are cast to it and outputs are returned in
    the dtype of ``frac_t`` (coordinates) and ``cell_t`` (lattice).

    Example:
        >>> from torch_geometric.data import Batch, Data
        >>> net = CSPNet(hidden=32, num_layers=2, n_freq=4, time_dim=16)
        >>> data = Batch.from_data_list([
        ...     Data(z=torch.tensor([8, 22, 8]), frac_coords=torch.rand(3, 3), cell=4 * torch.eye(3)[None], num_nodes=3),
        ...     Data(z=torch.tensor([11]), frac_coords=torch.rand(1, 3), cell=3 * torch.eye(3)[None], num_nodes=1)])
        >>> lat, coord = net.forward_batch(data, data.frac_coords, data.cell, torch.tensor([0.3, 0.9]))
        >>> lat.shape, coord.shape
        (torch.Size([2, 3, 3]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        hidden: int = 512,
        num_layers: int = 6,
        n_freq: int = 128,
        time_dim: int = 256,
        num_species: int = 119,
        lattice_input: str = "gram",
        self_loops: bool = True,
        layer_norm: bool = True,
        *,
        cond_dim: int = 0,
    ):
        super().__init__()
        if lattice_input not in LATTICE_INPUTS:
            raise ValueError(f"`lattice_input` must be one of {LATTICE_INPUTS}, got {lattice_input!r}")
        for name, value in (("hidden", hidden), ("num_layers", num_layers), ("n_freq", n_freq),
                            ("time_dim", time_dim), ("num_species", num_species)):
            if int(value) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value}")
        self.hidden, self.num_layers, self.n_freq, self.time_dim = hidden, num_layers, n_freq, time_dim
        self.num_species, self.lattice_input = num_species, lattice_input
        self.self_loops, self.layer_norm = self_loops, layer_norm
        self.species = nn.Embedding(num_species, hidden)
        self.atom_time = nn.Linear(hidden + time_dim, hidden)
        self.layers = nn.ModuleList(_CSPLayer(hidden, 6 * n_freq, layer_norm) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.coord_head = nn.Linear(hidden, 3, bias=False)
        self.lattice_head = nn.Linear(hidden, 9, bias=False)
        if int(cond_dim) < 0:
            raise ValueError(f"`cond_dim` must be >= 0, got {cond_dim}")
        self.cond_dim = int(cond_dim)
        if self.cond_dim:  # registered only when conditioned: unconditioned state dicts are unchanged
            self.cond_null = nn.Parameter(torch.zeros(self.cond_dim))
            self.cond_mlp = nn.Sequential(nn.Linear(self.cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
            self.cond_film = nn.Linear(hidden, 2 * hidden * (num_layers + 1))
            nn.init.zeros_(self.cond_film.weight)  # adaLN-Zero: starts as the unconditioned network
            nn.init.zeros_(self.cond_film.bias)

    # ------------------------------------------------------------------ inputs
    def _check(self, z: Tensor, frac_t: Tensor, cell_t: Tensor, batch: Optional[Tensor],
               num_graphs: Optional[int]) -> tuple[Tensor, int]:
        if not isinstance(z, Tensor) or z.dim() != 1:
            raise ValueError(f"`z` must be a 1-D long tensor [N] of atomic numbers, got "
                             f"{list(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if z.is_floating_point() or z.dtype == torch.bool:
            raise TypeError(f"`z` must be an integer tensor of atomic numbers, got {z.dtype}")
        n = z.numel()
        if n == 0:
            raise ValueError("`z` is empty: the batch has no atoms")
        if bool((z < 0).any()) or bool((z >= self.num_species).any()):
            raise ValueError(f"`z` must lie in [0, {self.num_species}) (num_species), got range "
                             f"[{int(z.min())}, {int(z.max())}]")
        if not isinstance(frac_t, Tensor) or frac_t.dim() != 2 or frac_t.shape != (n, 3):
            raise ValueError(f"`frac_t` must have shape [{n}, 3], got "
                             f"{list(frac_t.shape) if isinstance(frac_t, Tensor) else type(frac_t).__name__}")
        if not frac_t.is_floating_point() or not bool(torch.isfinite(frac_t).all()):
            raise ValueError("`frac_t` must be a finite floating tensor")
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=z.device)
        if batch.dim() != 1 or batch.numel() != n:
            raise ValueError(f"`batch` must have shape [{n}], got {list(batch.shape)}")
        if batch.dtype != torch.long:
            raise TypeError(f"`batch` must be a long tensor, got {batch.dtype}")
        if n > 1 and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("`batch` must be sorted (atoms of a crystal contiguous), as PyG batches are")
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1
        if int(batch.min()) < 0 or int(batch.max()) >= num_graphs:
            raise ValueError(f"`batch` values must lie in [0, {num_graphs}) (num_graphs)")
        if not isinstance(cell_t, Tensor) or cell_t.shape != (num_graphs, 3, 3):
            raise ValueError(f"`cell_t` must have shape [{num_graphs}, 3, 3] (rows = lattice vectors), got "
                             f"{list(cell_t.shape) if isinstance(cell_t, Tensor) else type(cell_t).__name__}")
        if not cell_t.is_floating_point() or not bool(torch.isfinite(cell_t).all()):
            raise ValueError("`cell_t` must be a finite floating tensor")
        return batch, num_graphs

    def _film(self, cond: Optional[Tensor], cond_drop: Optional[Tensor], num_graphs: int, batch: Tensor,
              dtype: torch.dtype) -> Optional[list[tuple[Tensor, Tensor]]]:
        """Per-layer per-atom ``(gamma, beta)`` from the condition (``None`` for an unconditioned net)."""
        if not self.cond_dim:
            if cond is not None or cond_drop is not None:
                raise ValueError("this CSPNet has no condition (cond_dim=0): build it with cond_dim > 0 to pass `cond`")
            return None
        null = self.cond_null.to(dtype).expand(num_graphs, self.cond_dim)
        if cond is None:
            c = null
        else:
            if not isinstance(cond, Tensor) or cond.shape != (num_graphs, self.cond_dim):
                raise ValueError(f"`cond` must have shape [{num_graphs}, {self.cond_dim}] (one condition per crystal), got "
                                 f"{list(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__}")
            if not cond.is_floating_point() or not bool(torch.isfinite(cond).all()):
                raise ValueError("`cond` must be a finite floating tensor (mark missing conditions with `cond_drop`)")
            c = cond.to(device=null.device, dtype=dtype)
            if cond_drop is not None:
                cond_drop = torch.as_tensor(cond_drop, device=null.device)
                if cond_drop.dtype != torch.bool or cond_drop.shape != (num_graphs,):
                    raise ValueError(f"`cond_drop` must be a bool tensor of shape [{num_graphs}], got "
                                     f"{cond_drop.dtype} {list(cond_drop.shape)}")
                c = torch.where(cond_drop.unsqueeze(-1), null, c)
        film = self.cond_film(self.cond_mlp(c))[batch].view(batch.numel(), self.num_layers + 1, 2, self.hidden)
        return [(film[:, k, 0], film[:, k, 1]) for k in range(self.num_layers + 1)]

    # ------------------------------------------------------------------ forward
    def _prepare(self, z: Tensor, frac_t: Tensor, cell_t: Tensor, t: Tensor | float, batch: Optional[Tensor],
                 num_graphs: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """Validate the inputs and cast them to the parameters' device / dtype: ``(z, frac, cell, t [B], batch, B)``."""
        batch, num_graphs = self._check(z, frac_t, cell_t, batch, num_graphs)
        dtype, device = self.coord_head.weight.dtype, self.coord_head.weight.device
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            t = t.expand(num_graphs)
        t = t.reshape(-1)
        if t.numel() != num_graphs:
            raise ValueError(f"`t` must be a scalar or have shape [{num_graphs}], got {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("`t` contains NaN or Inf values")
        z, batch = z.to(device), batch.to(device)
        frac = frac_t.to(device=device, dtype=dtype)
        cell = cell_t.to(device=device, dtype=dtype)
        return z, frac, cell, t, batch, num_graphs

    def _trunk(self, z: Tensor, frac: Tensor, cell: Tensor, t: Tensor, batch: Tensor, num_graphs: int,
               cond: Optional[Tensor], cond_drop: Optional[Tensor]) -> Tensor:
        """Node features after the final norm (and its FiLM) of prepared inputs (:meth:`_prepare`)."""
        dtype = frac.dtype
        counts = torch.bincount(batch, minlength=num_graphs)
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        edge_index, edge_graph = fully_connected_edges(ptr, self.self_loops)

        lat = (cell @ cell.transpose(-1, -2) if self.lattice_input == "gram" else cell).reshape(num_graphs, 9)
        four = fourier_features(frac[edge_index[1]] - frac[edge_index[0]], self.n_freq)

        temb = time_embedding(t, self.time_dim).to(dtype)
        h = self.atom_time(torch.cat([self.species(z.long()), temb[batch]], dim=-1))
        film = self._film(cond, cond_drop, num_graphs, batch, dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, lat, four, edge_index, edge_graph, None if film is None else film[i])
        h = self.final_norm(h)
        if film is not None:
            h = h * (1 + film[-1][0]) + film[-1][1]
        return h

    def encode(
        self,
        z: Tensor,
        frac_t: Tensor,
        cell_t: Tensor,
        t: Tensor | float,
        batch: Optional[Tensor] = None,
        num_graphs: Optional[int] = None,
        *,
        cond: Optional[Tensor] = None,
        cond_drop: Optional[Tensor] = None,
    ) -> Tensor:
        r"""The trunk: node features ``h^L [N, hidden]`` after the final LayerNorm (and its FiLM), before the heads.

        Arguments as :meth:`forward`, which reads its outputs from exactly these features:
        ``coord_out = W_x h``, ``lattice_out = reshape(W_L mean_{i in b} h_i) @ L_b`` (Gram input).
        Features are in the parameters' dtype. With the Gram input they are invariant to rotating
        the lattice and to periodic translations of ``frac_t``, and equivariant to permuting atoms.

        Example:
            >>> net = CSPNet(hidden=8, num_layers=1, n_freq=2, time_dim=4)
            >>> z, f, l = torch.tensor([11, 17]), torch.rand(2, 3), 4 * torch.eye(3)[None]
            >>> h = net.encode(z, f, l, 0.5)
            >>> h.shape, torch.equal(net.coord_head(h), net(z, f, l, 0.5)[1])
            (torch.Size([2, 8]), True)
        """
        z, frac, cell, t, batch, num_graphs = self._prepare(z, frac_t, cell_t, t, batch, num_graphs)
        return self._trunk(z, frac, cell, t, batch, num_graphs, cond, cond_drop)

    def forward(
        self,
        z: Tensor,
        frac_t: Tensor,
        cell_t: Tensor,
        t: Tensor | float,
        batch: Optional[Tensor] = None,
        num_graphs: Optional[int] = None,
        *,
        cond: Optional[Tensor] = None,
        cond_drop: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(lattice_out [B, 3, 3], coord_out [N, 3])`` for noisy ``(frac_t, cell_t)`` at time ``t``.

        The heads read the trunk features of :meth:`encode`.

        Args:
            z: ``[N]`` atomic numbers; frac_t: ``[N, 3]`` fractional coordinates (any real values:
            only differences mod 1 enter); cell_t: ``[B, 3, 3]`` lattices, rows = lattice vectors;
            t: ``[B]`` times in ``[0, 1]`` (or a scalar, broadcast); batch: ``[N]`` sorted graph
            index (``None``: one crystal); num_graphs: ``B`` (inferred from ``batch`` if omitted);
            cond: ``[B, cond_dim]`` per-crystal condition (conditioned nets only; ``None``: the null
            condition); cond_drop: ``[B]`` bool, rows that get the null condition instead.
        """
        z, frac, cell, t, batch, num_graphs = self._prepare(z, frac_t, cell_t, t, batch, num_graphs)
        h = self._trunk(z, frac, cell, t, batch, num_graphs, cond, cond_drop)
        coord_out = self.coord_head(h)
        pooled = scatter(h, batch, dim=0, dim_size=num_graphs, reduce="mean")
        m = self.lattice_head(pooled).view(num_graphs, 3, 3)
        lattice_out = m @ cell if self.lattice_input == "gram" else m
        return lattice_out.to(cell_t.dtype), coord_out.to(frac_t.dtype)

    def forward_batch(self, data: Any, frac_t: Tensor, cell_t: Tensor, t: Tensor | float, *,
                      cond: Optional[Tensor] = None, cond_drop: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` reading ``z``, ``batch`` and ``num_graphs`` from a PyG ``Batch`` (or ``Data``)."""
        z = getattr(data, "z", None)
        if z is None:
            raise ValueError("`data` has no `z` field (atomic numbers [N])")
        batch = getattr(data, "batch", None)
        if batch is None:
            if isinstance(cell_t, Tensor) and cell_t.dim() == 3 and cell_t.size(0) != 1:
                raise ValueError(
                    f"`data` has no `batch` vector but `cell_t` holds {cell_t.size(0)} lattices: build the "
                    "batch with Batch.from_data_list from Data objects that know their number of atoms "
                    "(set `num_nodes`, or store coordinates under `pos`/`x`)")
            num_graphs = 1
        else:
            num_graphs = int(getattr(data, "num_graphs", int(batch.max()) + 1))
        return self.forward(z, frac_t, cell_t, t, batch, num_graphs, cond=cond, cond_drop=cond_drop)

    def __repr__(self) -> str:
        return (f"CSPNet(hidden={self.hidden}, num_layers={self.num_layers}, n_freq={self.n_freq}, "
                f"time_dim={self.time_dim}, lattice_input={self.lattice_input!r}, "
                f"self_loops={self.self_loops}, layer_norm={self.layer_norm}"
                + (f", cond_dim={self.cond_dim})" if self.cond_dim else ")"))
